"""Domain errors and how they reach HTTP clients.

    ApiError                 → its own status, body {"error": {"message", "type", "param", "code"}}
    ├── NotFound             404 (also for another tenant's objects: their existence is not revealed)
    ├── Unauthorized         401
    ├── Forbidden            403
    ├── BadRequest           400 (param names the field at fault)
    ├── Conflict             409
    ├── PayloadTooLarge      413
    └── TooManyRequests      429

The body follows OpenAI's error shape, so the openai SDK raises its usual exceptions.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException


class ApiError(Exception):
    status_code = 400
    error_type = "invalid_request_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


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


def error_body(message: str, *, error_type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def _location(loc: tuple[Any, ...]) -> str:
    # ("body", "inputs", 3, "prompt") → "inputs[3].prompt"
    parts = [p for p in loc if p not in ("body", "query", "path", "header")]
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "body"


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, error: ApiError) -> JSONResponse:
        body = error_body(error.message, error_type=error.error_type, param=error.param, code=error.code)
        headers = {"WWW-Authenticate": "Bearer"} if error.status_code == 401 else None
        return JSONResponse(body, status_code=error.status_code, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, error: RequestValidationError) -> JSONResponse:
        problems = error.errors()
        first = problems[0] if problems else {"loc": ("body",), "msg": "invalid request"}
        param = _location(tuple(first.get("loc", ())))
        message = "; ".join(f"{_location(tuple(p.get('loc', ())))}: {p.get('msg')}" for p in problems[:5])
        return JSONResponse(
            error_body(message, error_type="invalid_request_error", param=param, code="invalid_request"),
            status_code=400,
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, error: StarletteHTTPException) -> JSONResponse:
        error_type = "not_found_error" if error.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(error.detail), error_type=error_type), status_code=error.status_code)
