"""Helpers for the console's tests: signing a TestClient in through the form, and reading a page's tokens."""

from __future__ import annotations

import re

from fastapi.testclient import TestClient

_CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')


def csrf_token(html: str) -> str:
    """The CSRF token of the first form on a page."""
    found = _CSRF.search(html)
    assert found is not None, "the page holds no form with a csrf_token"
    return found.group(1)


def sign_in(client: TestClient, key: str, *, next_page: str = "/ui/jobs") -> str:
    """Sign `client` in with `key` through the sign-in form; returns the session's CSRF token (from the page
    the form leads to)."""
    form = client.get("/ui/sign-in")
    data = {"api_key": key, "csrf_token": csrf_token(form.text), "next": next_page}
    answer = client.post("/ui/sign-in", data=data, follow_redirects=True)
    assert answer.status_code == 200 and answer.url.path == next_page, (answer.status_code, answer.text[:500])
    return csrf_token(answer.text)


def bearer_key(headers: dict[str, str]) -> str:
    """The key in an Authorization header (the tenant fixtures give headers)."""
    return headers["Authorization"].removeprefix("Bearer ")
