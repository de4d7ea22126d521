"""Console sessions: signing in and out through the form, what ends a session (sign-out, idle time, a revoked key),
the cookie's flags, the CSRF check of every POST and one-time sign-in links; in-process, on both backends."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from api.app import create_app
from db.console_sessions import MAX_SESSIONS_PER_KEY, create_sign_in_link, live_key_id, start_session
from db.models import ApiKey, ConsoleSession, utcnow
from db.session import transaction
from db.settings import Settings
from db.tenant_limits import set_overrides
from db.tenants import revoke_key
from tests.console.pages import bearer_key, csrf_token


@pytest.fixture
def console(settings: Settings, empty_db: sessionmaker[Session]) -> Iterator[TestClient]:
    """The app with redirects shown as they are, so a test sees where each answer sends the browser."""
    with TestClient(create_app(settings), follow_redirects=False) as client:
        yield client


def _signed_in(console: TestClient, key: str) -> str:
    form = console.get("/ui/sign-in")
    answer = console.post("/ui/sign-in", data={"api_key": key, "csrf_token": csrf_token(form.text)})
    assert answer.status_code == 303 and answer.headers["location"] == "/ui/jobs"
    return answer.headers["set-cookie"]


def test_sign_in_sets_a_strict_http_only_cookie_and_sign_out_ends_the_session(
    console: TestClient, tenant_a: dict[str, str], empty_db: sessionmaker[Session]
) -> None:
    # Given a tenant's key typed into the sign-in form
    cookie = _signed_in(console, bearer_key(tenant_a))
    # I expect a session cookie holding no key: HttpOnly, SameSite=Strict, for /ui, not Secure over http
    assert cookie.startswith("lmbatch_console=") and bearer_key(tenant_a) not in cookie
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/ui" in cookie and "Secure" not in cookie
    # and the database holding only the token's hash
    with empty_db() as session:
        token = console.cookies["lmbatch_console"]
        assert session.scalar(select(ConsoleSession.token_hash)) not in (None, token)
    page = console.get("/ui/jobs")
    assert page.status_code == 200 and "tenant-a" in page.text
    # When the tenant signs out with the form's token
    out = console.post("/ui/sign-out", data={"csrf_token": csrf_token(page.text)})
    assert out.status_code == 303 and out.headers["location"] == "/ui/sign-in"
    # I expect the session over, even for a browser that kept the cookie
    with empty_db() as session:
        assert session.scalar(select(ConsoleSession.ended_at)) is not None
    console.cookies.set("lmbatch_console", token, path="/ui")
    again = console.get("/ui/jobs?status=running")
    assert again.status_code == 303 and again.headers["location"] == "/ui/sign-in?next=/ui/jobs%3Fstatus%3Drunning"


def test_a_wrong_key_is_refused_on_the_form_and_no_session_begins(
    console: TestClient, tenant_a: dict[str, str], empty_db: sessionmaker[Session]
) -> None:
    # Given a key that is not one
    form = console.get("/ui/sign-in")
    answer = console.post("/ui/sign-in", data={"api_key": "lmb_wrong", "csrf_token": csrf_token(form.text)})
    # I expect the form again with its error, and no session
    assert answer.status_code == 401 and 'class="form-error"' in answer.text and 'id="sign-in"' in answer.text
    assert "lmbatch_console=" not in answer.headers.get("set-cookie", "")
    with empty_db() as session:
        assert session.scalar(select(ConsoleSession.id)) is None


def test_wrong_keys_from_one_address_are_held_back_after_ten_a_minute(
    settings: Settings, empty_db: sessionmaker[Session], tenant_a: dict[str, str]
) -> None:
    # Given an address (its own, so no other test shares its count) that typed ten wrong keys
    address = (f"192.0.2.{utcnow().microsecond % 250 + 1}", 4000 + utcnow().second)
    with TestClient(create_app(settings), follow_redirects=False, client=address) as client:
        token = csrf_token(client.get("/ui/sign-in").text)
        statuses = [
            client.post("/ui/sign-in", data={"api_key": f"lmb_wrong{i}", "csrf_token": token}).status_code
            for i in range(10)
        ]
        assert statuses == [401] * 10
        # When it then types the right key
        answer = client.post("/ui/sign-in", data={"api_key": bearer_key(tenant_a), "csrf_token": token})
        # I expect it held back for now
        assert answer.status_code == 429 and "wait a minute" in answer.text


def test_the_cookie_is_secure_over_https(settings: Settings, empty_db: sessionmaker[Session], tenant_a) -> None:
    with TestClient(create_app(settings), base_url="https://testserver", follow_redirects=False) as client:
        assert "Secure" in _signed_in(client, bearer_key(tenant_a))


def test_the_cookie_can_be_made_secure_behind_a_proxy_that_ends_tls(
    settings: Settings, empty_db: sessionmaker[Session], tenant_a: dict[str, str]
) -> None:
    # Given a proxy that ends TLS elsewhere, so that the app sees plain http
    forced = settings.model_copy(update={"console_secure_cookie": True})
    with TestClient(create_app(forced), follow_redirects=False) as client:
        # I expect the console's cookies marked Secure all the same when the setting says so
        assert "Secure" in client.get("/ui/sign-in").headers["set-cookie"]
    with TestClient(create_app(settings), follow_redirects=False) as client:
        assert "Secure" not in _signed_in(client, bearer_key(tenant_a))


def test_a_key_keeps_its_newest_sessions_only(
    console: TestClient, empty_db: sessionmaker[Session], tenant_a: dict[str, str]
) -> None:
    # Given a key signed in 25 times (a script, or many browsers)
    for _ in range(25):
        with transaction(empty_db) as session:
            key_id = live_key_id(session, key=bearer_key(tenant_a))
            assert key_id is not None
            start_session(session, api_key_id=key_id, lifetime_seconds=600)
    # I expect it to hold MAX_SESSIONS_PER_KEY sessions, the newest
    with empty_db() as session:
        ids = list(session.scalars(select(ConsoleSession.id).order_by(ConsoleSession.id)))
    assert len(ids) == MAX_SESSIONS_PER_KEY and ids[-1] - ids[0] == MAX_SESSIONS_PER_KEY - 1


def test_console_pages_count_against_the_tenants_rate_limit(
    settings: Settings, empty_db: sessionmaker[Session], tenant_a: dict[str, str]
) -> None:
    # Given a tenant allowed 2 requests a second
    with transaction(empty_db) as session:
        assert set_overrides(session, tenant_name="tenant-a", values={"max_requests_per_second": 2})
    with TestClient(create_app(settings), follow_redirects=False) as client:
        _signed_in(client, bearer_key(tenant_a))
        # I expect a burst of console pages held back like the API's requests
        statuses = [client.get("/ui/jobs").status_code for _ in range(6)]
    assert 429 in statuses, statuses


def test_an_idle_session_ends(settings: Settings, empty_db: sessionmaker[Session], tenant_a: dict[str, str]) -> None:
    idle = settings.model_copy(update={"console_idle_seconds": 120})
    with TestClient(create_app(idle), follow_redirects=False) as client:
        _signed_in(client, bearer_key(tenant_a))
        # Given a session just begun: a page view does not write its last view again within the minute
        with empty_db() as session:
            begun = session.scalar(select(ConsoleSession.last_seen_at))
        assert client.get("/ui/jobs").status_code == 200
        with empty_db() as session:
            assert session.scalar(select(ConsoleSession.last_seen_at)) == begun
        # Given a session last seen a minute ago: still live, and this view is written down
        with transaction(empty_db) as session:
            session.execute(update(ConsoleSession).values(last_seen_at=utcnow() - timedelta(seconds=61)))
        assert client.get("/ui/jobs").status_code == 200
        with empty_db() as session:
            assert utcnow() - session.scalar(select(ConsoleSession.last_seen_at)) < timedelta(seconds=5)
        # Given a tab left open on a page that refreshes itself (htmx): its polls do not count as a person's view
        with transaction(empty_db) as session:
            session.execute(update(ConsoleSession).values(last_seen_at=utcnow() - timedelta(seconds=90)))
        assert client.get("/ui/jobs", headers={"HX-Request": "true"}).status_code == 200
        with empty_db() as session:
            assert utcnow() - session.scalar(select(ConsoleSession.last_seen_at)) > timedelta(seconds=85)
        # When it is left alone past the idle timeout
        with transaction(empty_db) as session:
            session.execute(update(ConsoleSession).values(last_seen_at=utcnow() - timedelta(seconds=121)))
        # I expect the next page to ask for a sign-in, and an htmx refresh to get a 401 that says where to go
        assert client.get("/ui/jobs").status_code == 303
        refresh = client.get("/ui/jobs", headers={"HX-Request": "true"})
        assert refresh.status_code == 401 and refresh.headers["hx-redirect"] == "/ui/sign-in?next=/ui/jobs"


def test_a_revoked_key_ends_its_sessions(
    console: TestClient, empty_db: sessionmaker[Session], tenant_a: dict[str, str]
) -> None:
    # Given a signed-in session
    _signed_in(console, bearer_key(tenant_a))
    assert console.get("/ui/jobs").status_code == 200
    # When its key is revoked
    with transaction(empty_db) as session:
        assert revoke_key(session, key=bearer_key(tenant_a))
    # I expect the session over at the next page
    answer = console.get("/ui/jobs")
    assert answer.status_code == 303 and answer.headers["location"].startswith("/ui/sign-in")


def test_an_expired_key_ends_its_sessions(
    console: TestClient, empty_db: sessionmaker[Session], tenant_a: dict[str, str]
) -> None:
    # Given a signed-in session whose key then reaches its expiry
    _signed_in(console, bearer_key(tenant_a))
    with transaction(empty_db) as session:
        session.execute(update(ApiKey).values(expires_at=utcnow() - timedelta(seconds=1)))
    # I expect the session over at the next page
    assert console.get("/ui/").headers["location"] == "/ui/jobs"
    assert console.get("/ui/jobs").status_code == 303


def test_a_post_without_its_csrf_token_is_refused_and_changes_nothing(
    console: TestClient, empty_db: sessionmaker[Session], tenant_a: dict[str, str]
) -> None:
    # Given a signed-in session
    _signed_in(console, bearer_key(tenant_a))
    # When a sign-out arrives without the token, or with another
    missing = console.post("/ui/sign-out", data={})
    wrong = console.post("/ui/sign-out", data={"csrf_token": "not-the-token"})
    # I expect the 403 page both times and the session still live
    for answer in (missing, wrong):
        assert answer.status_code == 403 and "CSRF check failed" in answer.text
    assert console.get("/ui/jobs").status_code == 200
    with empty_db() as session:
        assert session.scalar(select(ConsoleSession.ended_at)) is None
    # and the sign-in form itself refused without the token its page set
    refused = console.post("/ui/sign-in", data={"api_key": bearer_key(tenant_a), "csrf_token": "forged"})
    assert refused.status_code == 403


def test_a_one_time_link_signs_in_once(
    console: TestClient, empty_db: sessionmaker[Session], tenant_a: dict[str, str]
) -> None:
    # Given a one-time link for the tenant's key
    with transaction(empty_db) as session:
        key_id = live_key_id(session, key=bearer_key(tenant_a))
        assert key_id is not None
        token = create_sign_in_link(session, api_key_id=key_id)
    # When it is opened (as a mail scanner would, twice), I expect a button and nothing spent
    for _ in range(2):
        page = console.get(f"/ui/sign-in/link/{token}")
        assert page.status_code == 200 and 'form id="sign-in-link"' in page.text
    assert console.get("/ui/jobs").status_code == 303
    # …the button refused without the token its page set (another site posting its own link)…
    link = f"/ui/sign-in/link/{token}"
    assert console.post(link, data={"csrf_token": "forged"}).status_code == 403
    # …and, pressed, a session and the jobs page
    first = console.post(link, data={"csrf_token": console.cookies["lmbatch_console_form"]})
    assert first.status_code == 303 and first.headers["location"] == "/ui/jobs"
    assert console.get("/ui/jobs").status_code == 200
    # and the same link refused the second time
    console.cookies.clear()
    console.get(link)
    second = console.post(link, data={"csrf_token": console.cookies["lmbatch_console_form"]})
    assert second.status_code == 400 and "already used" in second.text
    assert console.get("/ui/jobs").status_code == 303


def test_every_console_answer_carries_the_security_headers_and_errors_are_pages(console: TestClient) -> None:
    # Given a page, a missing page and a static file
    page, missing, static = (
        console.get("/ui/sign-in"),
        console.get("/ui/no-such-page"),
        console.get("/ui/static/console.css"),
    )
    # I expect the CSP (no framing, own scripts only) and friends on each
    for answer in (page, missing, static):
        csp = answer.headers["content-security-policy"]
        assert "frame-ancestors 'none'" in csp and "script-src 'self'" in csp and "default-src 'self'" in csp
        assert answer.headers["x-content-type-options"] == "nosniff"
        assert answer.headers["referrer-policy"] == "same-origin"
    # pages never cached, the static file cacheable
    assert page.headers["cache-control"] == "no-store" and missing.headers["cache-control"] == "no-store"
    assert "no-store" not in static.headers.get("cache-control", "")
    # and a missing page an HTML page, not the API's JSON
    assert missing.status_code == 404 and "<h1>Not found</h1>" in missing.text
    assert missing.headers["content-type"].startswith("text/html")
    # while the API's own addresses keep their JSON errors
    assert console.get("/v1/no-such-thing").json()["error"]["code"] == "not_found"


@pytest.mark.parametrize(
    ("asked", "goes"),
    [
        ("/ui/jobs?status=failed", "/ui/jobs?status=failed"),
        ("https://evil.example/ui/", "/ui/jobs"),
        ("//evil.example/ui/jobs", "/ui/jobs"),
        ("/v1/jobs", "/ui/jobs"),
        ("/ui\\..\\x", "/ui/jobs"),
    ],
)
def test_sign_in_goes_back_only_to_a_console_page(
    console: TestClient, tenant_a: dict[str, str], asked: str, goes: str
) -> None:
    form = console.get("/ui/sign-in")
    data = {"api_key": bearer_key(tenant_a), "csrf_token": csrf_token(form.text), "next": asked}
    assert console.post("/ui/sign-in", data=data).headers["location"] == goes
