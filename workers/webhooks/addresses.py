"""Where a webhook may point: https on a public address, unless `webhook_allow_private` lets tests and private
networks use http and loopback, private or link-local hosts.

A URL is checked twice: its syntax when an endpoint is created or updated (`check_url_syntax`, no DNS), and its
address at every attempt (`resolve_target`, or `resolve_target_async` inside an attempt's deadline). The name is
resolved once per attempt and the sender connects to the address that was checked: resolving again to connect
would let a DNS answer that changes in between (rebinding) send the POST to an address nobody checked.

A host name is used in its IDNA (ASCII) form from here on: it is what DNS, the Host header and the TLS server name
carry. Every refusal of an address reads the same to the tenant, without the address: an error that quoted the DNS
answer (or told "does not resolve" from "resolves to a private address") would let a tenant map internal names.
The reason is logged for the operator instead.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import SplitResult, urlsplit

MAX_URL_CHARS = 2048
DEFAULT_PORTS = {"https": 443, "http": 80}

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
# The one message for every address refused, whatever the reason (see the module docstring).
NOT_PUBLIC = "url host does not resolve to a public address"
# A lookup outside an attempt (the API's checks) waits at most this long.
DNS_TIMEOUT_SECONDS = 10.0

log = logging.getLogger("lmbatch.webhooks")
# getaddrinfo blocks and cannot be interrupted. Lookups run on threads of their own, never asyncio's default
# executor: asyncio.run() joins that one when it returns, so a hung lookup would outlast the attempt's deadline.
_lookups = ThreadPoolExecutor(max_workers=16, thread_name_prefix="webhook-dns")


class UnsafeWebhookUrl(ValueError):
    """A webhook URL lmbatch will not POST to; the message says why, in words fit for a 400."""


@dataclass(frozen=True)
class Target:
    """One attempt's destination: the endpoint's `url` as the tenant wrote it, its `host` (the Host header and the
    TLS server name) and `port`, and the `address` that was checked, which is the one the sender connects to."""

    url: str
    host: str
    port: int
    address: str


def _split(url: str, *, allow_private: bool) -> SplitResult:
    if len(url) > MAX_URL_CHARS:
        raise UnsafeWebhookUrl(f"url is longer than {MAX_URL_CHARS} characters")
    if any(ch.isspace() or ord(ch) < 0x20 or ord(ch) == 0x7F for ch in url):
        raise UnsafeWebhookUrl("url must not contain spaces or control characters")
    try:
        parts = urlsplit(url)
        port = parts.port  # parsed here: a bad port raises ValueError
    except ValueError:
        raise UnsafeWebhookUrl("url is not a valid URL") from None
    scheme = parts.scheme.lower()
    if scheme != "https" and not (allow_private and scheme == "http"):
        allowed = "https or http" if allow_private else "https"
        raise UnsafeWebhookUrl(f"url must use {allowed}")
    if not parts.hostname:
        raise UnsafeWebhookUrl("url must name a host")
    if parts.username is not None or parts.password is not None:
        raise UnsafeWebhookUrl("url must not contain a user name or password")
    if port == 0:
        raise UnsafeWebhookUrl("url names port 0")
    ascii_host(parts.hostname)
    return parts


def ascii_host(host: str) -> str:
    """The host as DNS and HTTP carry it: lower case, a non-ASCII (internationalized) name in its IDNA form.
    Raises UnsafeWebhookUrl for a name IDNA cannot encode."""
    if host.isascii():
        return host.lower()
    try:
        return host.encode("idna").decode("ascii").lower()
    except UnicodeError:
        raise UnsafeWebhookUrl("url host is not a valid host name") from None


def check_url_syntax(url: str, *, allow_private: bool) -> None:
    """Refuse a URL that could never be delivered to, without looking its host up. Raises UnsafeWebhookUrl."""
    _split(url, allow_private=allow_private)


def _refusal(address: IPAddress) -> str | None:
    """Why an address is not a public one, or None when it is (for the log, never for the tenant)."""
    if isinstance(address, ipaddress.IPv6Address):
        # ::ffff:127.0.0.1 reaches 127.0.0.1, and 6to4 (2002::/16) routes to the IPv4 address it embeds: judge that
        # one. (Python 3.11 counts 2002::/16 as global, whatever it embeds.)
        embedded = address.ipv4_mapped or address.sixtofour
        if embedded is not None:
            reason = _refusal(embedded)
            return None if reason is None else f"{reason} inside an IPv6 address"
        if address.is_site_local:  # fec0::/10: deprecated, yet routed as private where still in use
            return "a site-local address"
        if address.teredo is not None:  # 2001::/32 (3.11 counts it private): the client's IPv4 address is inside
            return "a Teredo address"
    if address.is_loopback:
        return "a loopback address"
    if address.is_link_local:
        return "a link-local address"
    if address.is_unspecified:
        return "an unspecified address"
    if address.is_multicast:
        return "a multicast address"
    if address.is_private:
        return "a private address"
    if address.is_reserved or not address.is_global:
        # e.g. 100.64.0.0/10 (carrier-grade NAT), which is neither private nor global.
        return "a reserved address"
    return None


def _lookup(host: str, port: int) -> list[Any]:
    return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)


def _addresses(host: str, infos: list[Any]) -> list[IPAddress]:
    # getaddrinfo's sockaddr[0] is the address as text; an IPv6 one may carry a "%zone" suffix.
    addresses = [ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in infos]
    if not addresses:
        log.info("webhook url host %r refused: no address", host)
        raise UnsafeWebhookUrl(NOT_PUBLIC)
    return addresses


def _unresolved(host: str, exc: BaseException) -> UnsafeWebhookUrl:
    log.info("webhook url host %r refused: it does not resolve (%s)", host, type(exc).__name__)
    return UnsafeWebhookUrl(NOT_PUBLIC)


def _unresolved_target(url: str, *, allow_private: bool) -> tuple[Target, IPAddress | None]:
    """The target with its host and port, and the host's address when the URL names one (no lookup needed)."""
    parts = _split(url, allow_private=allow_private)
    host = ascii_host(parts.hostname or "")
    port = parts.port or DEFAULT_PORTS[parts.scheme.lower()]
    try:
        literal: IPAddress | None = ipaddress.ip_address(host)
    except ValueError:
        literal = None
    return Target(url=url, host=host, port=port, address=""), literal


def _checked(target: Target, addresses: list[IPAddress], *, allow_private: bool) -> Target:
    """Every address the name resolves to must be public, not only the one used: a name that also points inside the
    network is refused whichever address the resolver happens to list first."""
    if not allow_private:
        for address in addresses:
            reason = _refusal(address)
            if reason is not None:
                log.info("webhook url host %r refused: it resolves to %s (%s)", target.host, reason, address)
                raise UnsafeWebhookUrl(NOT_PUBLIC)
    return replace(target, address=str(addresses[0]))


def resolve_target(url: str, *, allow_private: bool, timeout: float = DNS_TIMEOUT_SECONDS) -> Target:
    """Check `url`, resolve its host once (waiting at most `timeout` seconds) and check the address.
    Raises UnsafeWebhookUrl."""
    target, literal = _unresolved_target(url, allow_private=allow_private)
    if literal is not None:
        return _checked(target, [literal], allow_private=allow_private)
    try:
        infos = _lookups.submit(_lookup, target.host, target.port).result(timeout=timeout)
    except (OSError, UnicodeError, FutureTimeout) as exc:
        raise _unresolved(target.host, exc) from None
    return _checked(target, _addresses(target.host, infos), allow_private=allow_private)


async def resolve_target_async(url: str, *, allow_private: bool) -> Target:
    """`resolve_target` for an attempt's event loop: the lookup is bounded by the caller's deadline (cancelled, it
    stops waiting; its thread ends when getaddrinfo gives up). Raises UnsafeWebhookUrl."""
    target, literal = _unresolved_target(url, allow_private=allow_private)
    if literal is not None:
        return _checked(target, [literal], allow_private=allow_private)
    try:
        infos = await asyncio.get_running_loop().run_in_executor(_lookups, _lookup, target.host, target.port)
    except (OSError, UnicodeError) as exc:
        raise _unresolved(target.host, exc) from None
    return _checked(target, _addresses(target.host, infos), allow_private=allow_private)
