"""Who owns and sees model versions (db/registry.py): the `[ns/]name` ref grammar, a tenant's names in its own
namespace, visibility, what a bare name means, the store's place for tenant versions, and migration 0004 of
versions fine-tuned before namespaces existed."""

from __future__ import annotations

import os
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from db import registry
from db.migrate import upgrade
from db.registry import InvalidModelRef, ModelOwnershipError, ModelRef, TenantView, parse_ref, tenant_model_name
from db.session import make_engine, make_session_factory, transaction
from db.settings import Settings
from db.tenants import get_or_create_tenant
from tests.factories import add_model_row
from tests.servers import create_postgres_database, drop_postgres_database, postgres_available
from tests.stack import require
from workers.engines.finetune.params import OUTPUT_NAME_PATTERN
from workers.models.store import PathNotAllowedError, version_dir

# --- names and refs (no database) ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ref", "parsed"),
    [
        ("smollm2-135m-instruct", ModelRef("smollm2-135m-instruct")),
        ("acme/support-bot", ModelRef("acme/support-bot")),
        ("acme/support-bot@12", ModelRef("acme/support-bot", version=12)),
        ("acme-corp/bot.v2:prod", ModelRef("acme-corp/bot.v2", alias="prod")),
    ],
)
def test_refs_name_a_model_with_or_without_a_namespace(ref: str, parsed: ModelRef) -> None:
    assert parse_ref(ref) == parsed and str(parsed) == ref


@pytest.mark.parametrize(
    "ref",
    ["acme/", "/x", "a/b/c", "Acme/x", "-acme/x", "acme-/x", "acme/x@0", "acme/x:", "acme/x@1:y", "a" * 101,
     "acme/" + "x" * 96, "../etc/passwd", "acme/../x", "acme_co/x"],
)  # fmt: skip
def test_what_is_not_a_ref_is_refused(ref: str) -> None:
    with pytest.raises(InvalidModelRef):
        parse_ref(ref)


def test_a_tenants_new_model_is_named_in_its_namespace() -> None:
    # Given tenant acme's request, I expect its names under acme/, and another namespace or a bad name refused.
    assert tenant_model_name("support-bot", base="smollm2-135m-instruct", namespace="acme") == "acme/support-bot"
    assert tenant_model_name("acme/support-bot", base="x", namespace="acme") == "acme/support-bot"
    assert tenant_model_name(None, base="smollm2-135m-instruct", namespace="acme") == "acme/smollm2-135m-instruct"
    assert tenant_model_name(None, base="acme/bot", namespace="acme") == "acme/bot"
    assert len(tenant_model_name(None, base="b" * 100, namespace="acme")) == registry.MAX_NAME_CHARS
    for requested in ("globex/support-bot", "Has Capitals", "acme/" + "x" * 96):
        with pytest.raises(ValueError, match=r"namespace|not a model name"):
            tenant_model_name(requested, base="x", namespace="acme")


def test_the_engines_output_name_pattern_is_the_registrys() -> None:
    # The engines import nothing of db, so the pattern is written twice; I expect both to stay the same.
    assert f"^{registry.MODEL_NAME_PATTERN}$" == OUTPUT_NAME_PATTERN
    assert re.match(OUTPUT_NAME_PATTERN, "acme/bot") and not re.match(OUTPUT_NAME_PATTERN, "a/b/c")


def test_tenant_versions_never_land_inside_a_catalogue_models_directory(tmp_path: Path) -> None:
    # Given catalogue model "acme" and tenant acme's model "acme/2", I expect two directories, neither inside the
    # other, both under the store.
    catalogue = version_dir(tmp_path, "acme", 2)
    tenant = version_dir(tmp_path, "acme/2", 1)
    assert catalogue == tmp_path.resolve() / "acme" / "2"
    assert tenant == tmp_path.resolve() / "_tenants" / "acme" / "2" / "1"
    assert not tenant.is_relative_to(catalogue) and not catalogue.is_relative_to(tenant)
    for bad in ("../x", "a/../../x", "acme/.hidden", "_tenants", "a/b/c", ""):
        with pytest.raises(PathNotAllowedError):
            version_dir(tmp_path, bad, 1)


# --- visibility and resolution ----------------------------------------------------------------------------------


def _viewers(session_factory: sessionmaker[Session]) -> tuple[TenantView, TenantView, TenantView]:
    with transaction(session_factory) as session:
        ids = [get_or_create_tenant(session, name=name).id for name in ("acme", "globex", "ops")]
    return TenantView(ids[0]), TenantView(ids[1]), TenantView(ids[2], is_admin=True)


def _ref(version: Any) -> str | None:
    return f"{version.name}@{version.version}" if version is not None else None


def test_a_tenant_sees_the_catalogue_and_its_own_models_and_an_admin_all(empty_db: sessionmaker[Session]) -> None:
    # Given catalogue model "base" and tenant acme's "acme/bot" (two versions, alias prod on the first)…
    acme, globex, admin = _viewers(empty_db)
    add_model_row(empty_db, "base")
    first = add_model_row(empty_db, "acme/bot", owner="acme")
    add_model_row(empty_db, "acme/bot", owner="acme")
    with transaction(empty_db) as session:
        registry.set_alias(session, name="acme/bot", alias="prod", version=first)

    def resolved(viewer: TenantView, ref: str) -> str | None:
        with empty_db() as session:
            return _ref(registry.resolve(session, ref, viewer=viewer))

    # …I expect acme and an admin to resolve every ref of acme's model, and globex none of them, exactly as if
    # the model did not exist.
    for viewer in (acme, admin):
        assert resolved(viewer, "acme/bot") == "acme/bot@2"
        assert resolved(viewer, "acme/bot@1") == "acme/bot@1"
        assert resolved(viewer, "acme/bot:prod") == "acme/bot@1"
    for ref in ("acme/bot", "acme/bot@1", "acme/bot@2", "acme/bot:prod"):
        assert resolved(globex, ref) is None
        assert resolved(globex, ref) == resolved(globex, ref.replace("acme/bot", "acme/nothing"))
    assert {resolved(viewer, "base") for viewer in (acme, globex, admin)} == {"base@1"}
    with empty_db() as session:
        listed = {
            viewer: [_ref(v) for v in registry.listed_versions(session, viewer=viewer)]
            for viewer in (acme, globex, admin)
        }
        assert listed == {acme: ["acme/bot@2", "base@1"], globex: ["base@1"], admin: ["acme/bot@2", "base@1"]}
        assert registry.aliases_by_version(session, name="acme/bot", viewer=globex) == {}
        assert registry.aliases_by_version(session, name="acme/bot", viewer=acme) == {first.id: ["prod"]}
        assert registry.versions(session, name="acme/bot", viewer=globex) == []
        # Lineage is the owner's and the admins'; for the catalogue, the admins'.
        bot, base = (
            registry.resolve(session, "acme/bot@1", viewer=admin),
            registry.resolve(session, "base", viewer=acme),
        )
        assert bot is not None and base is not None
        assert registry.shows_lineage(acme, bot) and registry.shows_lineage(admin, bot)
        assert not registry.shows_lineage(globex, bot)
        assert not registry.shows_lineage(acme, base) and registry.shows_lineage(admin, base)


def test_a_name_and_its_owner_must_agree(empty_db: sessionmaker[Session]) -> None:
    # Given tenants acme and globex, I expect acme/x to be acme's only, a bare name the catalogue's only, and a
    # namespace no tenant has refused.
    acme, globex, _ = _viewers(empty_db)
    cases = [("acme/x", globex.tenant_id), ("acme/x", None), ("shared", acme.tenant_id), ("nobody/x", acme.tenant_id)]
    for name, owner in cases:
        with pytest.raises(ModelOwnershipError), transaction(empty_db) as session:
            registry.register_version(
                session, name=name, owner_tenant_id=owner, task="encoder", kinds=["embed"], artifact_uri="/x",
                sha256="0" * 64,
            )  # fmt: skip
    with empty_db() as session:
        assert registry.listed_versions(session, viewer=TenantView(acme.tenant_id, is_admin=True)) == []


# --- migration 0004 ---------------------------------------------------------------------------------------------


def _database_at_0003(which: str, tmp_path: Path) -> tuple[str, Settings]:
    if which == "sqlite":
        url = f"sqlite:///{tmp_path / 'old.db'}"
    else:
        require(postgres_available(), "PostgreSQL")
        url = create_postgres_database(f"lmbatch_mig_{os.getpid()}")
    settings = Settings(database_url=url, var_dir=tmp_path)
    upgrade(settings, "0003")
    return url, settings


def _write_old_rows(url: str) -> None:
    """Rows as lmbatch 0003 wrote them: tenant Acme Corp fine-tuned the catalogue's smollm2-135m-instruct with no
    name (so the result became `smollm2-135m-instruct@2`) and pointed alias `prod` at it; it also fine-tuned a
    classifier under the bare name `acme-sentiment`. Tenant Globex did nothing."""
    engine = sa.create_engine(url)
    tables = sa.MetaData()
    tables.reflect(engine)
    t = tables.tables
    now = datetime.now(UTC)
    version: dict[str, Any] = {"task": "causal-lm", "kinds": ["generate"], "sha256": "0" * 64, "params": {},
                               "metrics": {}, "created_at": now}  # fmt: skip
    job: dict[str, Any] = {"kind": "finetune", "status": "succeeded", "params": {}, "priority": 0, "total": 1,
                           "succeeded": 1, "failed": 0, "prompt_tokens": 0, "completion_tokens": 0, "shard_count": 1,
                           "shards_done": 1, "metadata": {}, "created_at": now}  # fmt: skip
    with engine.begin() as connection:
        connection.execute(t["tenants"].insert(), [{"id": 1, "name": "Acme Corp", "created_at": now},
                                                   {"id": 2, "name": "Globex", "created_at": now}])  # fmt: skip
        connection.execute(
            t["model_versions"].insert(),
            [{**version, "id": 1, "name": "smollm2-135m-instruct", "version": 1, "artifact_uri": "/s/1",
              "source": "pypi:x"}],
        )  # fmt: skip
        connection.execute(
            t["jobs"].insert(),
            [{**job, "id": "job-ft", "tenant_id": 1, "model_ref": "smollm2-135m-instruct", "model_version_id": 1},
             {**job, "id": "job-cls", "tenant_id": 1, "model_ref": "smollm2-135m-instruct", "model_version_id": 1}],
        )  # fmt: skip
        connection.execute(
            t["model_versions"].insert(),
            [{**version, "id": 2, "name": "smollm2-135m-instruct", "version": 2, "artifact_uri": "/s/2",
              "source": "finetune:job-ft", "job_id": "job-ft", "parent_id": 1},
             {**version, "id": 3, "name": "acme-sentiment", "version": 1, "artifact_uri": "/a/1",
              "source": "finetune:job-cls", "job_id": "job-cls", "parent_id": 1}],
        )  # fmt: skip
        connection.execute(
            t["model_aliases"].insert(), [{"name": "smollm2-135m-instruct", "alias": "prod", "version_id": 2}]
        )
        # A job that ran the fine-tuned version: it stores the version's id, never re-resolved.
        connection.execute(
            t["jobs"].insert(),
            [{**job, "id": "job-use", "kind": "generate", "tenant_id": 1, "model_ref": "smollm2-135m-instruct",
              "model_version_id": 2}],
        )  # fmt: skip
    engine.dispose()


@pytest.mark.parametrize("which", ["sqlite", "postgresql"])
def test_migration_0004_gives_old_fine_tunes_to_their_tenant_and_the_bare_name_back_to_the_catalogue(
    which: str, tmp_path: Path
) -> None:
    url, settings = _database_at_0003(which, tmp_path)
    try:
        _write_old_rows(url)
        upgrade(settings)
        engine = make_engine(settings)
        sessions = make_session_factory(engine)
        acme, globex = TenantView(1), TenantView(2)
        admin = TenantView(2, is_admin=True)

        def resolved(viewer: TenantView, ref: str) -> str | None:
            with sessions() as session:
                return _ref(registry.resolve(session, ref, viewer=viewer))

        with sessions() as session:
            owners = dict(session.execute(sa.text("SELECT id, owner_tenant_id FROM model_versions")).tuples().all())
            namespaces = session.execute(sa.text("SELECT namespace FROM tenants ORDER BY id")).scalars().all()
            job_version = session.execute(sa.text("SELECT model_version_id FROM jobs WHERE id = 'job-use'")).scalar()
        # I expect the fine-tuned versions to belong to Acme (the catalogue's version 1 to nobody)…
        assert owners == {1: None, 2: 1, 3: 1} and namespaces == ["acme-corp", "globex"]
        # …the bare shared name to mean the catalogue's version 1 for everyone, the owner and an admin included…
        assert {resolved(viewer, "smollm2-135m-instruct") for viewer in (acme, globex, admin)} == {
            "smollm2-135m-instruct@1"
        }
        # …and `@2`, the alias and Acme's bare-named classifier to resolve for Acme (and admins) only.
        for ref, expected in [
            ("smollm2-135m-instruct@2", "smollm2-135m-instruct@2"),
            ("smollm2-135m-instruct:prod", "smollm2-135m-instruct@2"),
            ("acme-sentiment", "acme-sentiment@1"),
            ("acme-sentiment@1", "acme-sentiment@1"),
        ]:
            assert resolved(acme, ref) == expected, ref
            assert resolved(globex, ref) is None, ref
        assert resolved(admin, "smollm2-135m-instruct:prod") == "smollm2-135m-instruct@2"
        assert job_version == 2  # the job that used @2 keeps pointing at it
        with sessions() as session:
            shown = {v: [_ref(r) for r in registry.listed_versions(session, viewer=v)] for v in (acme, globex)}
            assert shown == {
                acme: ["acme-sentiment@1", "smollm2-135m-instruct@1"],
                globex: ["smollm2-135m-instruct@1"],
            }
            # Acme still lists both versions of the shared name; Globex only the catalogue's.
            assert [r.version for r in registry.versions(session, name="smollm2-135m-instruct", viewer=acme)] == [1, 2]
            assert [r.version for r in registry.versions(session, name="smollm2-135m-instruct", viewer=globex)] == [1]
        engine.dispose()
    finally:
        if which == "postgresql":
            drop_postgres_database(f"lmbatch_mig_{os.getpid()}")
