"""The console's model pages: the catalogue a tenant may use, a model's versions, aliases and lineage, the 404 page
for another tenant's model, and an admin's registry actions (CSRF-checked, refused in the API's words); in-process."""

from __future__ import annotations

import html
import re
from pathlib import Path

from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from api.app import create_app
from db import registry
from db.models import ModelVersion
from db.registry import TenantView
from db.session import transaction
from db.settings import Settings
from db.tenants import get_or_create_tenant
from tests.console.pages import bearer_key, csrf_token, sign_in
from tests.console_data import seed_finetune
from tests.factories import add_model_row, auth_headers

HOSTILE = "<script>alert(1)</script>"


def seed_models(session_factory: sessionmaker[Session]) -> str:
    """The shared `tiny-base`, tenant-a's fine-tune of it (`tenant-a/support-bot`, with a hostile string among its
    metrics' neighbours in a second version) and tenant-b's own `tenant-b/secret`. Returns the fine-tune's job id."""
    add_model_row(session_factory, "tiny-base", task="causal-lm")
    seeded = seed_finetune(session_factory, tenant="tenant-a", base="tiny-base", steps=2, eval_every=2)
    with transaction(session_factory) as session:
        owner = get_or_create_tenant(session, name="tenant-a")
        registry.register_version(
            session,
            name="tenant-a/support-bot",
            owner_tenant_id=owner.id,
            task="causal-lm",
            kinds=["generate"],
            artifact_uri="/nowhere",
            sha256="0" * 64,
            metrics={"note": HOSTILE},
        )
    add_model_row(session_factory, "tenant-b/secret", owner="tenant-b")
    return seeded.job_id


def test_a_tenant_sees_the_catalogue_it_may_use_and_its_model_s_lineage(
    client: TestClient, tenant_a: dict[str, str], empty_db: sessionmaker[Session]
) -> None:
    # Given the shared model, tenant-a's fine-tune of it and tenant-b's own model, signed in as tenant-a
    job_id = seed_models(empty_db)
    sign_in(client, bearer_key(tenant_a), next_page="/ui/models")
    # I expect the shared model and its own listed, never tenant-b's
    listed = client.get("/ui/models").text
    assert 'data-model="tiny-base"' in listed and 'data-model="tenant-a/support-bot"' in listed
    assert "tenant-b/secret" not in listed
    # and its model's page showing both versions, the lineage back to the base and the job, and no admin action
    page = client.get("/ui/models/tenant-a/support-bot")
    assert page.status_code == 200
    assert 'data-version="1"' in page.text and 'data-version="2"' in page.text
    assert 'id="lineage"' in page.text
    assert 'class="parent" href="/ui/models/tiny-base#v1"' in page.text
    assert f'class="job" href="/ui/fine-tunes/{job_id}"' in page.text
    assert 'id="set-alias"' not in page.text and "delete-version" not in page.text
    # and a hostile metric shown as text
    assert HOSTILE not in page.text and "&lt;script&gt;alert(1)&lt;/script&gt;" in page.text
    # and the shared model's page naming its version made from it by tenant-a
    assert 'class="child" href="/ui/models/tenant-a/support-bot#v1"' in client.get("/ui/models/tiny-base").text
    # while tenant-b's model is the same 404 page as one that does not exist, and so is an action on it
    for path in ("/ui/models/tenant-b/secret", "/ui/models/no-such-model"):
        missing = client.get(path)
        assert missing.status_code == 404 and "<h1>Not found</h1>" in missing.text, path
    token = csrf_token(page.text)
    refused = client.post(
        "/ui/models/tenant-a/support-bot/aliases", data={"alias": "x", "version": "1", "csrf_token": token}
    )
    assert refused.status_code == 404


def test_an_admin_sets_an_alias_and_deletes_a_version_only_with_the_form_s_token(
    client: TestClient, empty_db: sessionmaker[Session]
) -> None:
    # Given the models, signed in as an admin
    seed_models(empty_db)
    sign_in(client, bearer_key(auth_headers(empty_db, "ops", scope="admin")), next_page="/ui/models")
    # I expect every tenant's models listed with their owner
    listed = client.get("/ui/models").text
    assert 'data-model="tenant-b/secret"' in listed and '<td class="owner">tenant-b</td>' in listed
    page = client.get("/ui/models/tenant-a/support-bot")
    assert 'id="set-alias"' in page.text and "data-confirm=" in page.text
    token = csrf_token(page.text)
    admin = TenantView(tenant_id=0, is_admin=True)

    def aliases() -> dict[int, list[str]]:
        with empty_db() as session:
            return registry.aliases_by_version(session, name="tenant-a/support-bot", viewer=admin)

    # When the alias form is posted without its token
    forged = client.post("/ui/models/tenant-a/support-bot/aliases", data={"alias": "prod", "version": "1"})
    # I expect the 403 page and no alias
    assert forged.status_code == 403 and aliases() == {}
    # When it names an alias the API refuses
    bad = client.post(
        "/ui/models/tenant-a/support-bot/aliases", data={"alias": "Prod!", "version": "1", "csrf_token": token}
    )
    # I expect the API's message next to the field it names, and no alias
    assert bad.status_code == 400
    assert '<p class="field-error" data-field="alias">alias &#39;Prod!&#39;: lowercase letters' in bad.text
    assert aliases() == {}
    # When it is right
    done = client.post(
        "/ui/models/tenant-a/support-bot/aliases",
        data={"alias": "prod", "version": "1", "csrf_token": token},
        follow_redirects=False,
    )
    # I expect the model's page again, showing the alias
    assert done.status_code == 303 and done.headers["location"] == "/ui/models/tenant-a/support-bot"
    assert list(aliases().values()) == [["prod"]]
    assert '<span class="alias">:prod</span>' in client.get("/ui/models/tenant-a/support-bot").text
    # When version 2's delete form is posted without its token
    delete = "/ui/models/tenant-a/support-bot/versions/2/delete"
    # I expect the 403 page and both versions kept
    assert client.post(delete, data={}).status_code == 403
    assert [v.version for v in versions_of(empty_db, "tenant-a/support-bot")] == [1, 2]
    # When it is posted with it
    assert client.post(delete, data={"csrf_token": token}, follow_redirects=False).status_code == 303
    # I expect only version 1 left
    assert [v.version for v in versions_of(empty_db, "tenant-a/support-bot")] == [1]


def versions_of(session_factory: sessionmaker[Session], name: str) -> list[ModelVersion]:
    with session_factory() as session:
        return registry.versions(session, name=name, viewer=TenantView(tenant_id=0, is_admin=True))


def test_the_catalogue_pages_by_name_both_ways(
    client: TestClient, tenant_a: dict[str, str], empty_db: sessionmaker[Session]
) -> None:
    # Given 52 shared models (a page holds 50), signed in as tenant-a
    for number in range(52):
        add_model_row(empty_db, f"model-{number:02d}")
    sign_in(client, bearer_key(tenant_a), next_page="/ui/models")
    # I expect the first 50 names, then the last 2, then the first 50 again
    first = client.get("/ui/models").text
    names = re.findall(r'data-model="([^"]+)"', first)
    assert names == [f"model-{n:02d}" for n in range(50)] and 'rel="prev"' not in first
    second = client.get(html.unescape(link(first, "next"))).text
    assert re.findall(r'data-model="([^"]+)"', second) == ["model-50", "model-51"] and 'rel="next"' not in second
    back = client.get(html.unescape(link(second, "prev"))).text
    assert re.findall(r'data-model="([^"]+)"', back) == names


def link(page: str, rel: str) -> str:
    found = re.search(rf'rel="{rel}" href="([^"]+)"', page)
    assert found is not None, rel
    return found.group(1)


def test_a_tenant_makes_an_int8_version_from_the_model_page_in_the_apis_terms(
    client: TestClient, tenant_a: dict[str, str], empty_db: sessionmaker[Session]
) -> None:
    # Given the shared tiny-base, tenant-a signed in on its page
    seed_models(empty_db)
    token = sign_in(client, bearer_key(tenant_a), next_page="/ui/models/tiny-base")
    assert 'id="quantize"' in client.get("/ui/models/tiny-base").text
    # When the form is posted without its token, or with a name the API refuses
    assert client.post("/ui/models/tiny-base/quantize", data={"version": "1"}).status_code == 403
    bad = client.post(
        "/ui/models/tiny-base/quantize", data={"version": "1", "output_name": "tenant-b/mine", "csrf_token": token}
    )
    # I expect no job, and the API's message next to the field it names
    assert bad.status_code == 400 and 'data-field="output_name"' in bad.text
    assert client.get("/v1/jobs?kind=quantize", headers=tenant_a).json()["data"] == []
    # When it is posted as it should be
    made = client.post(
        "/ui/models/tiny-base/quantize", data={"version": "1", "csrf_token": token}, follow_redirects=False
    )
    # I expect the quantize job's page, the job in the API naming tenant-a's future model
    assert made.status_code == 303 and made.headers["location"].startswith("/ui/jobs/job")
    (job,) = client.get("/v1/jobs?kind=quantize", headers=tenant_a).json()["data"]
    assert job["kind"] == "quantize" and job["params"]["output_name"] == "tenant-a/tiny-base-int8"
    assert made.headers["location"] == f"/ui/jobs/{job['id']}"


def test_an_admin_registers_a_model_from_an_import_root_through_the_form(
    settings: Settings, empty_db: sessionmaker[Session], import_root: Path, tenant_a: dict[str, str]
) -> None:
    app = create_app(settings.model_copy(update={"model_import_roots": [import_root]}))
    with TestClient(app) as client:
        # Given an admin signed in on the catalogue, with its register form
        token = sign_in(client, bearer_key(auth_headers(empty_db, "ops", scope="admin")), next_page="/ui/models")
        assert 'id="register-model"' in client.get("/ui/models").text
        form = {"name": "sentiment", "path": str(import_root / "sentiment"), "aliases": "prod", "csrf_token": token}
        # When it names a directory outside the import roots, or forgets the form's token
        outside = client.post("/ui/models/register", data={**form, "path": "/etc"})
        forged = client.post("/ui/models/register", data={k: v for k, v in form.items() if k != "csrf_token"})
        # I expect the API's refusal next to the path, the 403 page, and nothing registered
        assert outside.status_code == 400 and 'data-field="path"' in outside.text
        assert forged.status_code == 403
        assert client.get("/ui/models/sentiment").status_code == 404
        # When the form is right, I expect the model's page with its version and alias
        made = client.post("/ui/models/register", data=form)
        assert made.status_code == 200 and made.url.path == "/ui/models/sentiment"
        assert 'data-version="1"' in made.text and ":prod" in made.text
    with TestClient(app) as client:
        # and a tenant shown no form, its post answered by the 404 page
        token = sign_in(client, bearer_key(tenant_a), next_page="/ui/models")
        assert 'id="register-model"' not in client.get("/ui/models").text
        assert client.post("/ui/models/register", data={**form, "csrf_token": token}).status_code == 404
