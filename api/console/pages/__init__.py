"""The console's pages, one module per section, each an APIRouter under /ui reading through db/ functions."""
