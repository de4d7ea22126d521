"""Where a webhook may point, and how one attempt reaches it (workers/webhooks/addresses.py, sender.py)."""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from openai import OpenAI

from db.settings import Settings
from tests.webhook_receiver import HANG, WebhookReceiver
from workers.webhooks import sender
from workers.webhooks.addresses import NOT_PUBLIC, Target, UnsafeWebhookUrl, check_url_syntax, resolve_target
from workers.webhooks.sender import deliver_once, post_signed
from workers.webhooks.signing import new_signing_secret


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("http://93.184.216.34/hook", "https"),
        ("ftp://93.184.216.34/hook", "https"),
        ("https:///hook", "host"),
        ("https://user:pw@93.184.216.34/hook", "user name"),
        ("https://93.184.216.34/" + "a" * 2100, "longer"),
        ("https://93.184.216.34:99999/", "valid"),
        ("https://93.184.216.34/a b", "spaces"),
    ],
)
def test_syntax_refusals_say_what_is_wrong(url: str, words: str) -> None:
    with pytest.raises(UnsafeWebhookUrl, match=words):
        check_url_syntax(url, allow_private=False)


def test_http_is_allowed_only_with_allow_private() -> None:
    check_url_syntax("http://hooks.example.com/x", allow_private=True)
    with pytest.raises(UnsafeWebhookUrl):
        check_url_syntax("http://hooks.example.com/x", allow_private=False)


@pytest.mark.parametrize(
    ("host", "kind"),
    [
        ("127.0.0.1", "loopback"),
        ("[::1]", "loopback"),
        ("10.1.2.3", "private"),
        ("192.168.0.10", "private"),
        ("172.16.5.5", "private"),
        ("169.254.169.254", "link-local"),
        ("[fe80::1]", "link-local"),
        ("[::ffff:127.0.0.1]", "loopback"),
        ("[::ffff:10.0.0.1]", "private"),
        ("0.0.0.0", "unspecified"),
        ("224.0.0.1", "multicast"),
        ("100.64.0.1", "reserved"),
        ("[fec0::1]", "site-local"),
        ("[2002:a00:1::1]", "private address inside"),  # 6to4 of 10.0.0.1
        ("[2002:7f00:1::1]", "loopback address inside"),  # 6to4 of 127.0.0.1
        ("[2001:0:4136:e378:8000:63bf:3fff:fdd2]", "Teredo"),
        ("[64:ff9b::a00:1]", "reserved"),  # NAT64 of 10.0.0.1
    ],
)
def test_non_public_addresses_are_refused_in_the_same_words(
    host: str, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="lmbatch.webhooks"), pytest.raises(UnsafeWebhookUrl) as refused:
        resolve_target(f"https://{host}/hook", allow_private=False)
    # The tenant reads one message, never the address nor its kind; the operator's log says why.
    assert str(refused.value) == NOT_PUBLIC
    assert kind in caplog.text
    # The setting lets tests and private networks use them.
    assert resolve_target(f"https://{host}/hook", allow_private=True).port == 443


def test_6to4_of_a_public_address_is_accepted() -> None:
    assert resolve_target("https://[2002:5db8:d822::1]/hook", allow_private=False).address == "2002:5db8:d822::1"


def test_a_public_literal_address_is_accepted_without_dns() -> None:
    target = resolve_target("https://93.184.216.34:8443/hook?x=1", allow_private=False)
    assert target == Target(url="https://93.184.216.34:8443/hook?x=1", host="93.184.216.34", port=8443,
                            address="93.184.216.34")  # fmt: skip


def test_a_name_is_refused_when_any_of_its_addresses_is_not_public(monkeypatch: pytest.MonkeyPatch) -> None:
    answers = [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.216.34", 443)),
               (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.0.0.7", 443))]  # fmt: skip
    monkeypatch.setattr(socket, "getaddrinfo", lambda *args, **kwargs: answers)
    with pytest.raises(UnsafeWebhookUrl) as refused:
        resolve_target("https://rebind.example.com/hook", allow_private=False)
    # (the internal answer is not shown to the tenant: that would map internal names)
    assert str(refused.value) == NOT_PUBLIC and "10.0.0.7" not in str(refused.value)


def test_localhost_by_name_is_refused() -> None:
    with pytest.raises(UnsafeWebhookUrl, match=NOT_PUBLIC):
        resolve_target("https://localhost/hook", allow_private=False)


def test_an_unresolvable_name_reads_like_a_private_one() -> None:
    with pytest.raises(UnsafeWebhookUrl) as refused:
        resolve_target("https://no-such-host.invalid/hook", allow_private=False)
    assert str(refused.value) == NOT_PUBLIC


def test_the_name_is_resolved_once_and_the_post_goes_to_the_checked_address(monkeypatch: pytest.MonkeyPatch) -> None:
    # Given a name whose (fake) DNS answer is the receiver's loopback address, counted at every lookup
    lookups: list[str] = []

    def fake_getaddrinfo(host: str, port: int, *args: Any, **kwargs: Any) -> list[Any]:
        lookups.append(host)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]

    monkeypatch.setattr(socket, "getaddrinfo", fake_getaddrinfo)
    secret = new_signing_secret()
    settings = Settings(webhook_allow_private=True, webhook_timeout_seconds=5)
    with WebhookReceiver() as receiver:
        port = receiver.url.split(":")[2].split("/")[0]
        # When one attempt is made
        result = deliver_once(f"http://hooks.example.test:{port}/hooks", secret=secret, event_id="evt_1",
                              body='{"a":1}', settings=settings)  # fmt: skip
        # I expect one lookup, the POST at the checked address with the name as Host, signed for the SDK
        assert result.ok and result.error is None, result
        # (the socket layer "looks up" the literal address it connects to, which asks no DNS server)
        assert lookups in (["hooks.example.test"], ["hooks.example.test", "127.0.0.1"])
        [received] = receiver.requests
        assert received.headers["host"] == f"hooks.example.test:{port}"
        assert received.headers["webhook-id"] == "evt_1" and received.body == b'{"a":1}'
        OpenAI(api_key="x").webhooks.verify_signature(received.body, received.headers, secret=secret)


def test_failures_become_results_not_exceptions() -> None:
    target_of = lambda url: resolve_target(url, allow_private=True)  # noqa: E731
    with WebhookReceiver(answers=[500, 302, HANG]) as receiver:
        failed = post_signed(target_of(receiver.url), secret=new_signing_secret(), event_id="e", body="{}", timeout=2)
        assert (failed.status_code, failed.ok, failed.error) == (500, False, "the endpoint answered 500")
        moved = post_signed(target_of(receiver.url), secret=new_signing_secret(), event_id="e", body="{}", timeout=2)
        assert moved.status_code == 302 and not moved.ok and "redirects are not followed" in (moved.error or "")
        hung = post_signed(target_of(receiver.url), secret=new_signing_secret(), event_id="e", body="{}", timeout=0.3)
        assert (hung.status_code, hung.error) == (None, "timed out after 0.3s")
        assert 250 <= hung.latency_ms < 2000
    # Nothing listens there any more.
    refused = post_signed(target_of(receiver.url), secret=new_signing_secret(), event_id="e", body="{}", timeout=2)
    assert (refused.status_code, refused.error) == (None, "could not connect")


def test_an_unsafe_url_becomes_a_failed_attempt() -> None:
    result = deliver_once("https://127.0.0.1/x", secret=new_signing_secret(), event_id="e", body="{}",
                          settings=Settings(webhook_allow_private=False))  # fmt: skip
    assert result.status_code is None and result.error == NOT_PUBLIC


def fake_dns(monkeypatch: pytest.MonkeyPatch, address: str = "127.0.0.1") -> list[str]:
    """Every name resolves to `address`; returns the names looked up."""
    lookups: list[str] = []

    def fake_getaddrinfo(host: str, port: int, *args: Any, **kwargs: Any) -> list[Any]:
        lookups.append(host)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port))]

    monkeypatch.setattr(socket, "getaddrinfo", fake_getaddrinfo)
    return lookups


def test_an_internationalized_name_is_used_in_its_idna_form(monkeypatch: pytest.MonkeyPatch) -> None:
    # Given an endpoint named in Unicode
    lookups = fake_dns(monkeypatch)
    settings = Settings(webhook_allow_private=True, webhook_timeout_seconds=5)
    with WebhookReceiver() as receiver:
        port = receiver.url.split(":")[2].split("/")[0]
        url = f"http://bücher.example:{port}/hooks"
        check_url_syntax(url, allow_private=True)
        # When it is resolved and POSTed to
        target = resolve_target(url, allow_private=True)
        result = deliver_once(url, secret=new_signing_secret(), event_id="evt_1", body="{}", settings=settings)
        # I expect the ASCII (IDNA) name looked up and sent as the Host, and the POST answered
        assert target.host == "xn--bcher-kva.example"
        assert lookups == ["xn--bcher-kva.example", "xn--bcher-kva.example"]
        assert result.ok, result
        assert receiver.requests[0].headers["host"] == f"xn--bcher-kva.example:{port}"
    with pytest.raises(UnsafeWebhookUrl, match="not a valid host name"):
        check_url_syntax("https://" + "ü" * 70 + ".example/x", allow_private=False)  # a label too long for DNS


@pytest.fixture
def trickler() -> Iterator[str]:
    """An HTTP server that starts answering at once, then sends its headers a byte every 0.1 s for up to 5 s: every
    read is quick, so only a deadline on the whole attempt stops it."""
    server = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(1)
                try:
                    conn.recv(65536)
                    conn.sendall(b"HTTP/1.1 200 OK\r\nX-A: ")
                    for _ in range(50):
                        if stop.wait(0.1):
                            break
                        conn.sendall(b"a")
                except OSError:
                    pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}/hook"
    stop.set()
    server.close()
    thread.join(5)


def test_a_receiver_trickling_its_headers_is_cut_off_at_the_timeout(trickler: str) -> None:
    target = resolve_target(trickler, allow_private=True)
    started = time.monotonic()
    result = post_signed(target, secret=new_signing_secret(), event_id="e", body="{}", timeout=0.5)
    assert (result.status_code, result.error) == (None, "timed out after 0.5s")
    assert time.monotonic() - started < 1.5


def test_a_hung_dns_lookup_counts_against_the_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    released = threading.Event()

    def hung_getaddrinfo(*args: Any, **kwargs: Any) -> list[Any]:
        released.wait(5)
        raise socket.gaierror("gave up")

    monkeypatch.setattr(socket, "getaddrinfo", hung_getaddrinfo)
    settings = Settings(webhook_allow_private=True, webhook_timeout_seconds=0.3)
    started = time.monotonic()
    try:
        result = deliver_once("https://slow-dns.example/x", secret=new_signing_secret(), event_id="e", body="{}",
                              settings=settings)  # fmt: skip
        elapsed = time.monotonic() - started
    finally:
        released.set()
    assert (result.status_code, result.error) == (None, "timed out after 0.3s")
    assert elapsed < 1.5


def test_an_unforeseen_error_becomes_a_failed_attempt_logged_without_the_query(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(*args: Any, **kwargs: Any) -> dict[str, str]:
        raise RuntimeError("https://hooks.example.com/x?token=s3cret")

    monkeypatch.setattr(sender, "signed_headers", broken)
    target = Target(url="https://hooks.example.com/x?token=s3cret", host="hooks.example.com", port=443,
                    address="93.184.216.34")  # fmt: skip
    with caplog.at_level(logging.INFO, logger="lmbatch.webhooks"):
        result = post_signed(target, secret=new_signing_secret(), event_id="e", body="{}", timeout=1)
    assert (result.status_code, result.error) == (None, "request failed (RuntimeError)")
    assert "https://hooks.example.com/x" in caplog.text and "s3cret" not in caplog.text
