"""The HTTP contract: one module per resource, one model per direction (…Create in, …Public out)."""
