"""The vendor scripts the console serves (htmx, uPlot), straight from the npm packages `make install` puts in
api/console/node_modules (package.json and its lock pin them; the Docker image copies the same files).

Only the files in VENDOR_FILES are served, at /ui/static/vendor/<name>: nothing else under node_modules is
reachable. A checkout without node_modules still serves every page (they read without htmx, only they do not
refresh themselves, and a loss curve shows as its table): templates ask `vendor_available` before linking one.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from api.console.errors import PageNotFound

NODE_MODULES = Path(__file__).resolve().parent / "node_modules"

# Served name → (package, file within the package). Keep in step with deploy/Dockerfile and pyproject's package-data.
VENDOR_FILES = {
    "htmx.min.js": ("htmx", "htmx.org/dist/htmx.min.js"),
    "uPlot.iife.min.js": ("uplot", "uplot/dist/uPlot.iife.min.js"),
    "uPlot.min.css": ("uplot", "uplot/dist/uPlot.min.css"),
}
MEDIA_TYPES = {".js": "text/javascript", ".css": "text/css"}

router = APIRouter(prefix="/ui/static/vendor", include_in_schema=False)


@cache
def vendor_available(package: str) -> bool:
    """Whether every served file of `package` ("htmx", "uplot") is installed (asked once per process)."""
    return all((NODE_MODULES / path).is_file() for name, path in VENDOR_FILES.values() if name == package)


@router.get("/{name}")
async def vendor_file(name: str) -> FileResponse:
    entry = VENDOR_FILES.get(name)
    if entry is None or not (NODE_MODULES / entry[1]).is_file():
        raise PageNotFound("There is no such file.")
    path = NODE_MODULES / entry[1]
    # The files change only with package-lock.json: a day's caching spares a request per page view.
    headers = {"Cache-Control": "public, max-age=86400"}
    return FileResponse(path, media_type=MEDIA_TYPES[path.suffix], headers=headers)
