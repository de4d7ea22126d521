"""Schemathesis against the app's own OpenAPI document: whatever it sends, no answer is a 5xx.

Every operation in the document is exercised with 25 generated requests (valid and invalid shapes, boundary
values, wrong types, bodies that are not JSON or not UTF-8). Nothing is excluded: `/metrics` is already out of the
document (`include_in_schema=False`). Requests carry an admin key, which is also a tenant key, so the admin-only
routes are reached past their 403 too; the model store is a temporary directory, so a generated
`DELETE /v1/models/{name}/versions/{number}` could never remove a shared built-in model's files.

Schemathesis strips control characters from path parameters, so NUL bytes in ids are the corpus's job
(bad_requests.py). The schema is loaded at import from the app's document rather than through
`schemathesis.pytest.from_fixture`, which fails under pytest 9 ('Function' object has no attribute '_nodeid')."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

schemathesis = pytest.importorskip("schemathesis")

from fastapi import FastAPI  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from sqlalchemy.orm import Session, sessionmaker  # noqa: E402

from api.app import create_app  # noqa: E402
from db.settings import Settings  # noqa: E402
from tests.factories import auth_headers  # noqa: E402

pytestmark = pytest.mark.parametrize("backend", ["postgresql"], indirect=True)

EXAMPLES_PER_OPERATION = 25


def _requests_only(app: FastAPI) -> Any:
    """The app for HTTP requests only: its lifespan is the TestClient's to run (and to end, with the test)."""

    async def asgi(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            # Refusing before reading a message is how an app says it has no lifespan; schemathesis skips it.
            raise RuntimeError("the lifespan runs in the test's TestClient")
        await app(scope, receive, send)

    return asgi


@pytest.fixture
def fuzzed_app(settings: Settings, db_with_builtins: sessionmaker[Session], tmp_path: Path) -> Iterator[Any]:
    app = create_app(settings.model_copy(update={"model_store": tmp_path / "store", "files_dir": tmp_path / "files"}))
    with TestClient(app):
        yield _requests_only(app)


@pytest.fixture
def admin_headers(db_with_builtins: sessionmaker[Session]) -> dict[str, str]:
    return auth_headers(db_with_builtins, "fuzz", scope="admin")


# The document does not depend on settings: building the app runs nothing (no lifespan, no connection).
schema = schemathesis.openapi.from_dict(create_app(Settings(database_url="sqlite://")).openapi())

# Refs the registry holds, so generated jobs also get past the model lookup into params and items checks.
KNOWN_MODELS = ["smollm2-135m-instruct", "all-minilm-l6-v2", "all-minilm-l6-v2@1", "smollm2-135m-instruct:nope"]


@schema.hook
def flatmap_body(context: Any, body: Any) -> Any:
    if isinstance(body, dict) and "model" in body:
        return st.one_of(st.just(body), st.sampled_from(KNOWN_MODELS).map(lambda model: {**body, "model": model}))
    return st.just(body)


@schema.parametrize()
@settings(
    max_examples=EXAMPLES_PER_OPERATION,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    database=None,
)
def test_no_generated_request_gets_a_server_error(case: Any, fuzzed_app: Any, admin_headers: dict[str, str]) -> None:
    # Given any request schemathesis derives from the OpenAPI document, I expect anything but a 5xx.
    case.call_and_validate(app=fuzzed_app, headers=admin_headers, checks=[not_a_server_error])
