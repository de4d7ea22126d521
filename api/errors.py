"""Domain errors and how they reach HTTP clients.

    ApiError                 → its own status, body {"error": {"message", "type", "param", "code"}}
    ├── NotFound             404 (also for another tenant's objects: their existence is not revealed)
    ├── Unauthorized         401
    ├── Forbidden            403
    ├── BadRequest           400 (param names the field at fault)
    ├── Conflict             409
    ├── PayloadTooLarge      413
    ├── TooManyRequests      429
    └── BadGateway           502 (a server lmbatch called for the caller did not answer: a webhook test)
    any other exception      500 {"error": {"code": "internal_error", "message", "id", …}}: logged here with its id
                             and traceback, while the body carries no traceback, SQL, parameter or server path

The body follows OpenAI's error shape, so the openai SDK raises its usual exceptions.
"""

from __future__ import annotations

import logging
import re
import secrets
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("lmbatch.api")


class ApiError(Exception):
    status_code = 400
    error_type = "invalid_request_error"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers  # e.g. Retry-After on a 429


class NotFound(ApiError):
    status_code = 404
    error_type = "not_found_error"


class Unauthorized(ApiError):
    status_code = 401
    error_type = "authentication_error"


class Forbidden(ApiError):
    status_code = 403
    error_type = "permission_error"


class BadRequest(ApiError):
    status_code = 400


class Conflict(ApiError):
    status_code = 409


class PayloadTooLarge(ApiError):
    status_code = 413


class TooManyRequests(ApiError):
    status_code = 429
    error_type = "rate_limit_error"


class BadGateway(ApiError):
    status_code = 502
    error_type = "server_error"


def invalid_field(error: ValidationError, *, prefix: str = "", code: str) -> BadRequest:
    """The first problem pydantic found in an object the API validates itself (a job's `params`, a console form),
    as a 400 that names the field: `params.temperature: Input should be less than or equal to 2`."""
    first = error.errors()[0]
    field = ".".join(str(part) for part in ([prefix] if prefix else []) + list(first["loc"]))
    return BadRequest(f"{field}: {first['msg']}", param=field, code=code)


INVALID = "invalid_request_error"
# Codes for the errors Starlette and FastAPI raise themselves (unknown route, wrong method, bad body).
HTTP_CODES = {
    400: "invalid_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
}


def error_body(message: str, *, error_type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


# The tags pydantic puts in a location for the member of a union (`int | Literal["auto"]`): not field names.
_UNION_TAG = re.compile(r"^(int|float|str|bool|constrained-[a-z]+|literal\[.*\])$")


def _location(loc: tuple[Any, ...]) -> str:
    # ("body", "inputs", 3, "prompt") → "inputs[3].prompt"
    # Only the first element says where (a field may well be called "path", like POST /v1/models's).
    parts = list(loc[1:] if loc and loc[0] in ("body", "query", "path", "header") else loc)
    parts = [p for i, p in enumerate(parts) if i == 0 or not (isinstance(p, str) and _UNION_TAG.match(p))]
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "body"


def _is_json(content_type: str) -> bool:
    # The rule FastAPI parses bodies by: application/json or application/*+json.
    mime = content_type.split(";", 1)[0].strip().lower()
    return mime == "application/json" or (mime.startswith("application/") and mime.endswith("+json"))


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, error: ApiError) -> JSONResponse:
        body = error_body(error.message, error_type=error.error_type, param=error.param, code=error.code)
        headers = {"WWW-Authenticate": "Bearer"} if error.status_code == 401 else error.headers
        return JSONResponse(body, status_code=error.status_code, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        problems = error.errors()
        first: dict[str, Any] = dict(problems[0]) if problems else {"loc": ("body",), "msg": "invalid request"}
        content_type = request.headers.get("content-type", "")
        if first.get("type") == "json_invalid":
            position = first["loc"][-1] if first.get("loc") else "?"
            reason = (first.get("ctx") or {}).get("error", "JSON decode error")
            message = f"body: not valid JSON ({reason} at character {position})"
            return JSONResponse(error_body(message, error_type=INVALID, param="body", code="invalid_json"), 400)
        if tuple(first.get("loc", ())) == ("body",) and content_type and not _is_json(content_type):
            # FastAPI parses only JSON bodies; any other declared type reaches validation as raw bytes.
            message = f"send the body as JSON (Content-Type: application/json), not {content_type[:100]!r}"
            body = error_body(message, error_type=INVALID, param="body", code="unsupported_media_type")
            return JSONResponse(body, status_code=415)
        param = _location(tuple(first.get("loc", ())))
        message = "; ".join(f"{_location(tuple(p.get('loc', ())))}: {p.get('msg')}" for p in problems[:5])
        return JSONResponse(error_body(message, error_type=INVALID, param=param, code="invalid_request"), 400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, error: StarletteHTTPException) -> JSONResponse:
        error_type = "not_found_error" if error.status_code == 404 else INVALID
        message, code = str(error.detail), HTTP_CODES.get(error.status_code)
        # Starlette's own 400 and 413 are about the body (malformed multipart, undecodable, too large).
        param = "body" if error.status_code in (400, 413) else None
        if isinstance(error.__cause__, UnicodeDecodeError):  # FastAPI's "error parsing the body"
            cause = error.__cause__
            message, code = f"body: not valid UTF-8 ({cause.reason} at byte {cause.start})", "invalid_json"
        body = error_body(message, error_type=error_type, param=param, code=code)
        return JSONResponse(body, status_code=error.status_code, headers=error.headers)

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, error: Exception) -> JSONResponse:
        # Whatever a route did not expect (a database error, a missing file) can carry SQL, parameters and
        # server paths in its message: those go to the log only, under an id the caller can quote.
        error_id = "err_" + secrets.token_hex(8)
        log.error("internal error %s on %s %s", error_id, request.method, request.url.path, exc_info=error)
        message = f"internal error; the operator finds its details in the server log under {error_id}"
        body = error_body(message, error_type="server_error", code="internal_error")
        body["error"]["id"] = error_id
        return JSONResponse(body, status_code=500)
