"""Signing in and out: /ui/sign-in (a form taking an API key), /ui/sign-out, and one-time sign-in links
(/ui/sign-in/link/{token}, which `lmbatch demo` prints). Opening a link shows a button; only pressing it (a POST)
spends the link, so a mail or chat scanner that fetches every link it sees cannot use it up.

The key becomes a server-side session (db/console_sessions.py); the browser keeps only its random token, in an
HttpOnly, SameSite=Strict cookie (Secure over https). The key itself is never stored, logged or sent back. The
sign-in form, shown before any session exists, carries a token of its own that must match a cookie set with it
(double submit), so no other site can sign a browser in under its own key.
"""

from __future__ import annotations

import hmac
import secrets
from typing import Annotated, Any
from urllib.parse import urlsplit

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from api.console.errors import CsrfRefused
from api.console.templating import render
from api.console.viewer import COOKIE, CsrfChecked
from api.deps import SessionsDep
from db.console_sessions import end_session, live_key_id, start_session, use_sign_in_link
from db.session import transaction

router = APIRouter(prefix="/ui", include_in_schema=False)

FORM_COOKIE = "lmbatch_console_form"
HOME = "/ui/jobs"
WRONG_KEY = "That key is not valid: mistyped, revoked or expired."
TOO_MANY = "Too many wrong keys from this address: wait a minute and try again."
SPENT_LINK = "This sign-in link was already used, has expired, or its key no longer works. Sign in with a key."


def _secure(request: Request) -> bool:
    forced: bool | None = request.app.state.settings.console_secure_cookie
    return request.url.scheme == "https" if forced is None else forced


def _form(request: Request, *, next_page: str, error: str | None = None, status_code: int = 200) -> HTMLResponse:
    settings = request.app.state.settings
    context = {"next": next_page, "error": error, "idle_minutes": settings.console_idle_seconds // 60}
    return _with_form_token(request, "sign_in.html", status_code=status_code, **context)


def _with_form_token(request: Request, template: str, *, status_code: int = 200, **context: Any) -> HTMLResponse:
    """A page whose form, posted before any session exists, must send back the token this page sets as a cookie."""
    form_token = request.cookies.get(FORM_COOKIE) or secrets.token_urlsafe(32)
    response = render(request, template, None, status_code=status_code, form_token=form_token, **context)
    response.set_cookie(FORM_COOKIE, form_token, path="/ui", httponly=True, samesite="strict", secure=_secure(request))
    return response


def _check_form_token(request: Request, csrf_token: str) -> None:
    expected = request.cookies.get(FORM_COOKIE, "")
    if not csrf_token or not expected or not hmac.compare_digest(csrf_token.encode(), expected.encode()):
        raise CsrfRefused()


def safe_next(value: str | None) -> str:
    """Where to go after signing in: a console address only (never another site, whatever the link said)."""
    if not value or "\\" in value:
        return HOME
    parts = urlsplit(value)
    if parts.scheme or parts.netloc or not (parts.path == "/ui" or parts.path.startswith("/ui/")):
        return HOME
    return value


def _signed_in(request: Request, token: str, *, to: str) -> RedirectResponse:
    response = RedirectResponse(to, status_code=303)
    response.set_cookie(
        COOKIE,
        token,
        max_age=request.app.state.settings.console_session_seconds,
        path="/ui",
        httponly=True,
        samesite="strict",
        secure=_secure(request),
    )
    response.delete_cookie(FORM_COOKIE, path="/ui")
    return response


@router.get("", response_class=RedirectResponse)
@router.get("/", response_class=RedirectResponse)
async def console_home() -> RedirectResponse:
    return RedirectResponse(HOME, status_code=303)


@router.get("/sign-in", response_class=HTMLResponse)
async def sign_in_form(request: Request, next: str | None = None) -> HTMLResponse:
    return _form(request, next_page=safe_next(next))


@router.post("/sign-in", response_class=HTMLResponse)
def sign_in(
    request: Request,
    sessions: SessionsDep,
    api_key: Annotated[str, Form(max_length=500)] = "",
    csrf_token: Annotated[str, Form(max_length=100)] = "",
    next: Annotated[str, Form(max_length=2000)] = HOME,
) -> Response:
    _check_form_token(request, csrf_token)
    next_page = safe_next(next)
    attempts = request.app.state.sign_in_attempts
    address = request.client.host if request.client else "unknown"
    if not attempts.allowed(address):
        return _form(request, next_page=next_page, error=TOO_MANY, status_code=429)
    with transaction(sessions) as session:
        key_id = live_key_id(session, key=api_key.strip()) if api_key.strip() else None
        started = None
        if key_id is not None:
            lifetime = request.app.state.settings.console_session_seconds
            started = start_session(session, api_key_id=key_id, lifetime_seconds=lifetime)
    if started is None:
        attempts.wrong_key(address)
        return _form(request, next_page=next_page, error=WRONG_KEY, status_code=401)
    return _signed_in(request, started.token, to=next_page)


@router.post("/sign-out", response_class=RedirectResponse)
def sign_out(request: Request, viewer: CsrfChecked, sessions: SessionsDep) -> RedirectResponse:
    with transaction(sessions) as session:
        end_session(session, token=request.cookies.get(COOKIE, ""))
    response = RedirectResponse("/ui/sign-in", status_code=303)
    response.delete_cookie(COOKIE, path="/ui")
    return response


@router.get("/sign-in/link/{token}", response_class=HTMLResponse)
async def sign_in_link_page(request: Request, token: str) -> HTMLResponse:
    """The button that uses the link; the page itself spends nothing and reads nothing."""
    return _with_form_token(request, "sign_in_link.html", token=token)


@router.post("/sign-in/link/{token}", response_class=HTMLResponse)
def sign_in_link(
    request: Request, token: str, sessions: SessionsDep, csrf_token: Annotated[str, Form(max_length=100)] = ""
) -> Response:
    # The page's token too: otherwise another site could post its own link's token and sign a browser in as itself.
    _check_form_token(request, csrf_token)
    with transaction(sessions) as session:
        key_id = use_sign_in_link(session, token=token)
        started = None
        if key_id is not None:
            lifetime = request.app.state.settings.console_session_seconds
            started = start_session(session, api_key_id=key_id, lifetime_seconds=lifetime)
    if started is None:
        return _form(request, next_page=HOME, error=SPENT_LINK, status_code=400)
    return _signed_in(request, started.token, to=HOME)
