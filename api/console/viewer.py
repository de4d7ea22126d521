"""Who is looking at the console: the signed-in session behind the cookie, and the CSRF check of every POST.

ConsoleViewer   a page's viewer (`viewer.principal`, `viewer.csrf_token`). No live session: a page answers 303
                to /ui/sign-in?next=<the page>, an htmx request 401 (with HX-Redirect to the same place). A
                request counts against the tenant's rate limit, and only a person's (not a page's self-refresh)
                keeps the session from going idle
CsrfChecked     the same viewer, once the request's `csrf_token` form field (or `X-CSRF-Token` header, for htmx)
                matched the session's; missing or wrong: the 403 page, before anything changes
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated
from urllib.parse import quote

from fastapi import Depends, Request

from api.console.errors import CsrfRefused, SignInRequired
from api.deps import SessionDep
from db.console_sessions import live_session, needs_touch, touch_session
from db.session import writing

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from db.tenants import Principal

COOKIE = "lmbatch_console"
SIGN_IN_PATH = "/ui/sign-in"


@dataclass(frozen=True)
class Viewer:
    """A live console session: who it stands for and the token its forms carry."""

    principal: Principal
    csrf_token: str
    session_id: int


def current_viewer(request: Request, session: SessionDep) -> Viewer:
    token = request.cookies.get(COOKIE)
    settings = request.app.state.settings
    live = live_session(session, token=token, idle_seconds=settings.console_idle_seconds) if token else None
    if live is None:
        raise SignInRequired(sign_in_url(request))
    principal = live.principal
    per_second = principal.max_requests_per_second
    if per_second is None:
        per_second = settings.max_requests_per_second
    # The same per-tenant rate as the API's: the console is another door to the same work.
    request.app.state.rate_limiter.check(tenant_id=principal.tenant_id, per_second=per_second)
    # A page's own refresh (htmx) is not a person looking: a tab left open on a running job must still go idle.
    if needs_touch(live) and request.headers.get("hx-request") != "true":
        _touch(session, live.id)
    return Viewer(principal=live.principal, csrf_token=live.csrf_token, session_id=live.id)


def _touch(session: Session, session_id: int) -> None:
    # On the request's own session and connection; the page's reads go on after it in a new transaction.
    with writing(session):
        touch_session(session, session_id=session_id)


def sign_in_url(request: Request) -> str:
    """The sign-in page, told to come back to this page (a GET's own address; after a POST, the jobs list)."""
    back = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    if request.method != "GET":
        back = "/ui/jobs"
    return f"{SIGN_IN_PATH}?next={quote(back, safe='/')}"


ConsoleViewer = Annotated[Viewer, Depends(current_viewer)]


async def check_csrf(request: Request, viewer: ConsoleViewer) -> Viewer:
    sent = request.headers.get("x-csrf-token")
    if sent is None:
        # FastAPI parsed the form for the route's own fields already; Starlette hands back that same parse.
        field = (await request.form()).get("csrf_token")
        sent = field if isinstance(field, str) else None
    if not sent or not hmac.compare_digest(sent.encode(), viewer.csrf_token.encode()):
        raise CsrfRefused()
    return viewer


CsrfChecked = Annotated[Viewer, Depends(check_csrf)]
