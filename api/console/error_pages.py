"""The console's error pages: HTML for every /ui address, never the API's JSON, never a traceback.

A ConsoleError (api/console/errors.py) gets its page; the API's own errors met on a /ui address (an ApiError a
reused service raised, an unknown path, a bad query parameter, a crash) get the same page with the API's message,
or for a crash only an id the operator finds in the log.
"""

from __future__ import annotations

import logging
import secrets
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import RedirectResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from api.console.errors import ConsoleError, SignInRequired
from api.console.headers import HEADERS
from api.console.templating import render
from api.errors import ApiError

log = logging.getLogger("lmbatch.api")

UI_PREFIX = "/ui"
TITLES = {400: "Bad request", 401: "Sign in", 403: "Refused", 404: "Not found", 405: "Not allowed", 413: "Too large"}


def error_page(request: Request, *, status_code: int, message: str, title: str | None = None) -> Response:
    title = title or TITLES.get(status_code, "Something went wrong")
    return render(request, "error.html", None, status_code=status_code, title=title, message=message)


def _on_console(request: Request) -> bool:
    path: str = request.url.path
    return path == UI_PREFIX or path.startswith(UI_PREFIX + "/")


def install_error_pages(app: FastAPI) -> None:
    """HTML error pages for /ui addresses; every other address keeps the API's JSON errors (api/errors.py, which
    must be installed first: its handlers answer whatever is not the console's)."""
    api_handlers = dict(app.exception_handlers)

    async def console_error(request: Request, error: Exception) -> Response:
        assert isinstance(error, ConsoleError)
        if isinstance(error, SignInRequired):
            if request.headers.get("hx-request") == "true":
                return Response(status_code=401, headers={"HX-Redirect": error.sign_in_url})
            return RedirectResponse(error.sign_in_url, status_code=303)
        return error_page(request, status_code=error.status_code, message=error.message, title=error.title)

    def delegating(kind: type[Exception]) -> Any:
        async def handler(request: Request, error: Exception) -> Response:
            if not _on_console(request):
                return await api_handlers[kind](request, error)
            return _console_page_for(request, error)

        return handler

    app.add_exception_handler(ConsoleError, console_error)
    for kind in (ApiError, RequestValidationError, StarletteHTTPException):
        app.add_exception_handler(kind, delegating(kind))

    async def crash(request: Request, error: Exception) -> Response:
        if not _on_console(request):
            return await api_handlers[Exception](request, error)
        # As the API does: the details (SQL, parameters, paths) go to the log only, under an id.
        error_id = "err_" + secrets.token_hex(8)
        log.error("internal error %s on %s %s", error_id, request.method, request.url.path, exc_info=error)
        message = f"Something broke on our side. The operator finds the details in the server log under {error_id}."
        page = error_page(request, status_code=500, message=message, title="Server error")
        # Starlette answers a crash from outside every middleware, ConsoleHeaders included: the headers go on here.
        page.headers.update({**HEADERS, "Cache-Control": "no-store"})
        return page

    app.add_exception_handler(Exception, crash)


def _console_page_for(request: Request, error: Exception) -> Response:
    if isinstance(error, ApiError):
        return error_page(request, status_code=error.status_code, message=error.message)
    if isinstance(error, RequestValidationError):
        problems = error.errors()
        where = ".".join(str(part) for part in problems[0].get("loc", ())[1:]) if problems else ""
        message = f"{where}: {problems[0].get('msg')}" if problems else "The request was not understood."
        return error_page(request, status_code=400, message=message)
    assert isinstance(error, StarletteHTTPException)
    message = "There is no such page." if error.status_code == 404 else str(error.detail)
    return error_page(request, status_code=error.status_code, message=message)
