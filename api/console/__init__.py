"""The web console: server-rendered pages under /ui for the people who submit jobs and the admins who run lmbatch.

The API's own app serves it (install_console), outside the OpenAPI document. Pages read through db/ functions and
the JSON routes' services, so a page shows what the API would answer; every /ui response carries the security
headers of api/console/headers.py, and every error there is an HTML page (api/console/error_pages.py).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from api.console import vendor
from api.console.error_pages import install_error_pages
from api.console.headers import ConsoleHeaders
from api.console.pages import admin, batches, fine_tunes, jobs, models, new_job, sign_in

STATIC_DIR = Path(__file__).resolve().parent / "static"
# Bodies the console takes as uploads (up to max_request_bytes, like POST /v1/files), not as small forms.
UPLOAD_PATHS = frozenset({new_job.PATH})


def install_console(app: FastAPI) -> None:
    """Serve the console on `app`: its pages, its static files, its headers and its error pages. Call it once,
    after the API's error handlers are installed (the console's pages answer /ui addresses only)."""
    install_error_pages(app)
    app.add_middleware(ConsoleHeaders)
    # The vendor router before the static mount: the mount would answer every /ui/static/… address.
    for module in (vendor, sign_in, new_job, jobs, batches, fine_tunes, models, admin):
        app.include_router(module.router)
    app.mount("/ui/static", StaticFiles(directory=STATIC_DIR), name="console-static")
