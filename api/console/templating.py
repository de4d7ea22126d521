"""Rendering the console's pages: one Jinja2 environment over api/console/templates (autoescape on for every
template), the filters that make numbers and times readable at a glance, and `render`, which every page calls.

Filters: `relative_time` ("3 min ago"), `absolute_time` ("2026-12-01 10:15:21 UTC"), `iso` (for <time datetime>),
`number` ("12,345"), `percent` (done|percent(total): "42.5"), `duration` ("1 h 02 min"), `rate` ("12.3 items/s"),
`bytes` ("1.5 MiB"). Times may be datetimes or epoch seconds (the API's public forms carry those). Macros are in
templates/_macros.html.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import Request
from fastapi.responses import HTMLResponse
from jinja2 import Environment, FileSystemLoader, StrictUndefined

from api.console.vendor import vendor_available

if TYPE_CHECKING:
    from api.console.viewer import Viewer

TEMPLATES_DIR = Path(__file__).resolve().parent / "templates"


def _when(value: datetime | int | float | None) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        return value if value.tzinfo is not None else value.replace(tzinfo=UTC)
    return datetime.fromtimestamp(value, UTC)


def relative_time(value: datetime | int | float | None, now: datetime | None = None) -> str:
    moment = _when(value)
    if moment is None:
        return "—"
    seconds = ((now or datetime.now(UTC)) - moment).total_seconds()
    ahead = seconds < 0
    seconds = abs(seconds)
    if seconds < 10:
        return "just now"
    for size, unit in ((86400, "d"), (3600, "h"), (60, "min"), (1, "s")):
        if seconds >= size:
            amount = f"{int(seconds // size)} {unit}"
            return f"in {amount}" if ahead else f"{amount} ago"
    return "just now"


def absolute_time(value: datetime | int | float | None) -> str:
    moment = _when(value)
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC") if moment is not None else "—"


def iso(value: datetime | int | float | None) -> str:
    moment = _when(value)
    return moment.astimezone(UTC).isoformat(timespec="seconds") if moment is not None else ""


def number(value: int | float | None, digits: int = 0) -> str:
    """Thousands separated; floats to `digits` places."""
    if value is None:
        return "—"
    return f"{value:,}" if isinstance(value, int) else f"{value:,.{digits}f}"


def percent(done: int | float, total: int | float) -> str:
    """done/total as a percentage with one decimal at most ("42.5", "100"); "0" for an empty total."""
    if not total:
        return "0"
    value = round(min(max(100.0 * done / total, 0.0), 100.0), 1)
    return f"{value:.1f}".removesuffix(".0")


def duration(seconds: int | float | None) -> str:
    if seconds is None:
        return "—"
    if seconds < 60:
        return f"{seconds:.1f} s" if seconds < 10 else f"{seconds:.0f} s"
    minutes, rest = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {rest:02d} s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours} h {minutes:02d} min"
    return f"{hours // 24} d {hours % 24} h"


def rate(per_second: float | None, unit: str = "items") -> str:
    if per_second is None:
        return "—"
    return f"{per_second:,.1f} {unit}/s" if per_second < 1000 else f"{per_second:,.0f} {unit}/s"


def byte_size(size: int | None) -> str:
    if size is None:
        return "—"
    amount = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if amount < 1024 or unit == "TiB":
            return f"{amount:.0f} {unit}" if unit == "B" else f"{amount:.1f} {unit}"
        amount /= 1024
    return f"{size} B"


def _environment() -> Environment:
    # Autoescape on for every template whatever its name; StrictUndefined: a misspelt name fails a test instead of
    # rendering as nothing.
    env = Environment(loader=FileSystemLoader(TEMPLATES_DIR), autoescape=True, undefined=StrictUndefined)
    env.filters.update(
        relative_time=relative_time,
        absolute_time=absolute_time,
        iso=iso,
        number=number,
        percent=percent,
        duration=duration,
        rate=rate,
        bytes=byte_size,
    )
    return env


environment = _environment()

# The sections of the nav, in order: (label, address, admins only).
NAV = (
    ("Jobs", "/ui/jobs", False),
    ("New job", "/ui/jobs/new", False),
    ("Batches", "/ui/batches", False),
    ("Fine-tunes", "/ui/fine-tunes", False),
    ("Models", "/ui/models", False),
    ("Admin", "/ui/admin", True),
)


def render(
    request: Request,
    name: str,
    viewer: Viewer | None,
    *,
    status_code: int = 200,
    headers: dict[str, str] | None = None,
    **context: Any,
) -> HTMLResponse:
    """The page `name` (a template under templates/) for `viewer` (None: signed out), with `context`.

    Every template sees `request`, `viewer`, `csrf_token` (the viewer's; "" signed out), `nav` (the sections this
    viewer may open, with `current` the one the address is under), `here` (this page's path and query: what a
    self-refreshing fragment fetches again), `vendor` (which vendor scripts are installed:
    without them a page still reads, it only stops refreshing itself) and `htmx` (whether htmx asked for it)."""
    path = request.url.path
    admin = viewer is not None and viewer.principal.is_admin
    nav = [(label, href) for label, href, admins_only in NAV if admin or not admins_only]
    current = max((href for _, href in nav if path == href or path.startswith(href + "/")), key=len, default=None)
    page = {
        "request": request,
        "viewer": viewer,
        "csrf_token": viewer.csrf_token if viewer is not None else "",
        "nav": nav,
        "current": current,
        "vendor": {"htmx": vendor_available("htmx"), "uplot": vendor_available("uplot")},
        "htmx": request.headers.get("hx-request") == "true",
        "here": path + (f"?{request.url.query}" if request.url.query else ""),
        **context,
    }
    html = environment.get_template(name).render(page)
    return HTMLResponse(html, status_code=status_code, headers=headers)
