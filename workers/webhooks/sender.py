"""One attempt to deliver an event: a signed POST to the checked address, answered or not.

The connection goes to `Target.address`, the address `resolve_target` checked, with the endpoint's host name in the
Host header and as the TLS server name (so the certificate is still verified for that name). Redirects are not
followed: a 3xx would send the POST somewhere nobody checked, so it counts as a failure. At most a few KB of the
answer are read, since only its status matters. Nothing raises: a network error, or anything else, becomes the
attempt's `error`.

The whole attempt (the DNS lookup, connect, TLS, sending, the answer's headers and the little of its body that is
read) has one wall-clock deadline, `timeout`. httpx's own timeouts bound each read, not the sum: a receiver that
trickled its headers a byte every few seconds would otherwise hold a delivery thread for days. So the attempt runs
on an event loop of its own (`asyncio.run`, in the calling thread) under `asyncio.wait_for`, which cancels it at
the deadline wherever it is.
"""

from __future__ import annotations

import asyncio
import logging
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlsplit, urlunsplit

import httpx

from workers.webhooks.addresses import DEFAULT_PORTS, Target, UnsafeWebhookUrl, resolve_target_async
from workers.webhooks.signing import signed_headers

if TYPE_CHECKING:
    from db.settings import Settings

MAX_RESPONSE_BYTES = 4096
USER_AGENT = "lmbatch-webhooks/1"

log = logging.getLogger("lmbatch.webhooks")
# httpx logs every request's URL at INFO; an endpoint's URL is the tenant's and may carry a token in its query.
logging.getLogger("httpx").setLevel(logging.WARNING)


@dataclass(frozen=True)
class AttemptResult:
    """How an attempt went: the answer's status (None when there was none), how long it took, and what went wrong
    in words for the tenant (None on success)."""

    status_code: int | None
    latency_ms: float
    error: str | None

    @property
    def ok(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


class _Progress:
    """What an attempt got before its deadline: the answer's status, once the status line arrived."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.status: int | None = None

    def elapsed_ms(self) -> float:
        return round((time.monotonic() - self.started) * 1000.0, 1)


def _connect_url(target: Target) -> tuple[str, str]:
    """The URL with the checked address in place of the host, and the Host header that names the host again."""
    parts = urlsplit(target.url)
    scheme = parts.scheme.lower()
    address = f"[{target.address}]" if ":" in target.address else target.address
    host = f"[{target.host}]" if ":" in target.host else target.host
    default = target.port == DEFAULT_PORTS[scheme]
    netloc = address if default else f"{address}:{target.port}"
    host_header = host if default else f"{host}:{target.port}"
    return urlunsplit((scheme, netloc, parts.path or "/", parts.query, "")), host_header


def _without_query(url: str) -> str:
    """The URL for the operator's log: its query (which may carry the tenant's token) and fragment dropped."""
    try:
        parts = urlsplit(url)
        return urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "", ""))
    except ValueError:
        return "(an unparsable url)"


def _error_of(exc: Exception, timeout: float) -> str:
    if isinstance(exc, httpx.TimeoutException):
        return f"timed out after {timeout:g}s"
    if isinstance(exc, httpx.ConnectError):
        return "could not connect"
    if isinstance(exc, httpx.RemoteProtocolError):
        return "the endpoint broke the HTTP exchange"
    return f"request failed ({type(exc).__name__})"


def _answered(status: int, latency: float) -> AttemptResult:
    if 200 <= status < 300:
        return AttemptResult(status, latency, None)
    if 300 <= status < 400:
        return AttemptResult(status, latency, f"the endpoint answered {status}; redirects are not followed")
    return AttemptResult(status, latency, f"the endpoint answered {status}")


async def _post(
    target: Target, progress: _Progress, *, secret: str, event_id: str, body: str, timeout: float
) -> AttemptResult:
    url, host_header = _connect_url(target)
    headers = signed_headers(secret, event_id=event_id, body=body)
    headers["host"] = host_header
    headers["user-agent"] = USER_AGENT
    extensions = {"sni_hostname": target.host} if url.startswith("https:") else {}
    try:
        # trust_env=False: a proxy from the environment would connect by name, not to the checked address.
        async with httpx.AsyncClient(timeout=timeout, follow_redirects=False, trust_env=False) as client:
            request = client.build_request(
                "POST", url, content=body.encode("utf-8"), headers=headers, extensions=extensions
            )
            response = await client.send(request, stream=True)
            try:
                progress.status = response.status_code
                read = 0
                # The answer's body is not needed; a little is read so a well-behaved server sees a clean close,
                # and no more, so a huge or endless answer costs nothing (the deadline bounds a slow one).
                async for chunk in response.aiter_raw():
                    read += len(chunk)
                    if read >= MAX_RESPONSE_BYTES:
                        break
            finally:
                await response.aclose()
    except (httpx.HTTPError, httpx.InvalidURL, OSError) as exc:
        if progress.status is None:
            return AttemptResult(None, progress.elapsed_ms(), _error_of(exc, timeout))
        # The status line arrived; a body cut short does not change the endpoint's answer.
    assert progress.status is not None  # send() returns a response or raises
    return _answered(progress.status, progress.elapsed_ms())


def _run_attempt(
    attempt: Callable[[_Progress], Awaitable[AttemptResult]], *, timeout: float, url: str
) -> AttemptResult:
    """Run `attempt` on an event loop of its own, cut off `timeout` seconds after it starts. Never raises."""
    progress = _Progress()

    async def bounded() -> AttemptResult:
        return await asyncio.wait_for(attempt(progress), timeout)

    try:
        return asyncio.run(bounded())
    except TimeoutError:
        if progress.status is not None:  # answered, then too slow with the body: the answer stands
            return _answered(progress.status, progress.elapsed_ms())
        return AttemptResult(None, progress.elapsed_ms(), f"timed out after {timeout:g}s")
    except Exception as exc:
        # A bug, or a library failing in a way nobody foresaw: the attempt fails (and is recorded) rather than the
        # task, which would leave the delivery to be retried blindly. The log says where, not the URL's query (a
        # token, maybe) nor the exception's text (which may quote the URL).
        frame = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
        where = f"{frame.filename}:{frame.lineno}" if frame else "?"
        log.warning("webhook POST to %s failed: %s at %s", _without_query(url), type(exc).__name__, where)
        return AttemptResult(None, progress.elapsed_ms(), f"request failed ({type(exc).__name__})")


def post_signed(target: Target, *, secret: str, event_id: str, body: str, timeout: float) -> AttemptResult:
    """POST `body`, signed with `secret` for `event_id`, to `target`, all of it within `timeout` seconds. Never
    raises; the result says how it went. Call it where no event loop runs (a worker thread)."""

    def attempt(progress: _Progress) -> Awaitable[AttemptResult]:
        return _post(target, progress, secret=secret, event_id=event_id, body=body, timeout=timeout)

    return _run_attempt(attempt, timeout=timeout, url=target.url)


def deliver_once(url: str, *, secret: str, event_id: str, body: str, settings: Settings) -> AttemptResult:
    """Check `url` (one DNS resolution) and POST to the address checked, the lookup and the POST together within
    `webhook_timeout_seconds`. A URL that may not be used becomes a failed attempt with no status, like a network
    error. Never raises."""
    timeout = settings.webhook_timeout_seconds

    async def attempt(progress: _Progress) -> AttemptResult:
        try:
            target = await resolve_target_async(url, allow_private=settings.webhook_allow_private)
        except UnsafeWebhookUrl as exc:
            return AttemptResult(None, progress.elapsed_ms(), str(exc))
        return await _post(target, progress, secret=secret, event_id=event_id, body=body, timeout=timeout)

    return _run_attempt(attempt, timeout=timeout, url=url)
