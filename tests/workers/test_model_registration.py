"""Storing and registering a model version (workers/models/registration.py): the one path by which an import and a
fine-tune become `name@N`, with the row complete when it is added and the files under the number it got."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.orm import Session, sessionmaker

from db import registry
from db.session import transaction
from tests.factories import make_job
from workers.engines.finetune.params import FinetuneParams
from workers.engines.finetune.run import FinetuneResult
from workers.engines.types import EngineItem
from workers.models.registration import store_version
from workers.models.store import UnsafeModelDirectory, directory_sha256
from workers.models.versions import VersionInfo
from workers.runtime import build_runtime
from workers.shards.finetune_runner import _register
from workers.shards.work import ShardWork

# A tenant with no models of its own: it sees the shared catalogue, where these tests register.
ANYONE = registry.TenantView(tenant_id=0)


def _model(path: Path, text: str = "a") -> Path:
    (path / "sub").mkdir(parents=True)
    (path / "config.json").write_text('{"architectures": ["BertForSequenceClassification"]}')
    (path / "sub" / "weights.bin").write_text(text)
    return path


def test_an_import_is_copied_under_its_number_with_its_checksum_and_aliases(
    empty_db: sessionmaker[Session], tmp_path: Path
) -> None:
    # Given a source directory outside the store, when stored twice with keep_source, I expect versions 1 and 2,
    # each a copy under store/<name>/<N>/ that its row names and whose sha256 it records, and the source intact.
    store, source = tmp_path / "store", _model(tmp_path / "src")
    digest = directory_sha256(source)
    first = store_version(
        empty_db,
        store=store,
        directory=source,
        keep_source=True,
        name="m",
        task="sequence-classification",
        source="import:x",
        aliases=["prod"],
    )
    second = store_version(
        empty_db, store=store, directory=source, keep_source=True, name="m", task="encoder", source="import:x"
    )
    assert (first.version, second.version) == (1, 2)
    assert first.artifact_uri == str((store / "m" / "1").resolve())
    assert second.artifact_uri == str((store / "m" / "2").resolve())
    assert first.sha256 == second.sha256 == digest == directory_sha256(Path(second.artifact_uri))
    assert first.kinds == ["classify", "finetune"] and second.kinds == ["embed", "classify", "finetune"]
    assert directory_sha256(source) == digest  # the source is left alone
    assert sorted(p.name for p in store.iterdir()) == ["m"]  # no staging directory left behind
    with empty_db() as session:
        assert registry.aliases_by_version(session, name="m", viewer=ANYONE) == {first.id: ["prod"]}
        assert registry.resolve(session, "m:prod", viewer=ANYONE).artifact_uri == first.artifact_uri  # type: ignore[union-attr]


def test_a_fine_tune_output_is_moved_with_its_lineage_over_a_stale_directory(
    empty_db: sessionmaker[Session], tmp_path: Path
) -> None:
    # Given a directory left at store/ft/1 by a crash between a rename and its commit (no row names it)…
    store = tmp_path / "store"
    stale = _model(store / "ft" / "1", text="stale")
    output = _model(tmp_path / "var" / "output", text="trained")
    digest = directory_sha256(output)
    # …when a fine-tune's output is stored without keep_source, I expect it moved into place, replacing the stale
    # files, and the row to carry the job, the parent and the metrics.
    version = store_version(
        empty_db,
        store=store,
        directory=output,
        keep_source=False,
        name="ft",
        task="causal-lm",
        source="finetune:job-1",
        parent_id=None,
        job_id="job-1",
        params={"base": "m@1"},
        metrics={"steps": 3},
    )
    assert not output.exists()
    assert version.artifact_uri == str(stale.resolve()) and version.sha256 == digest
    assert (stale / "sub" / "weights.bin").read_text() == "trained"
    with empty_db() as session:
        made = registry.version_made_by(session, job_id="job-1")
        assert made is not None and (made.version, made.params, made.metrics) == (1, {"base": "m@1"}, {"steps": 3})
        assert registry.version_made_by(session, job_id="job-2") is None


def test_a_failed_registration_leaves_no_row_and_no_copy(empty_db: sessionmaker[Session], tmp_path: Path) -> None:
    # Given a name the registry refuses once the copy is made, when storing, I expect the transaction rolled back:
    # no version row, no staging copy left in the store, and the source untouched.
    store, source = tmp_path / "store", _model(tmp_path / "src")
    with pytest.raises(registry.InvalidModelRef):
        store_version(
            empty_db, store=store, directory=source, keep_source=True, name="Bad Name", task="encoder", source="x"
        )
    with empty_db() as session:
        assert registry.versions(session, name="Bad Name", viewer=ANYONE) == []
    assert list(store.iterdir()) == []
    assert source.is_dir()


def test_register_version_takes_the_uri_as_a_function_of_its_number(empty_db: sessionmaker[Session]) -> None:
    # Given two registrations naming their files by the number they get, I expect each row to name its own.
    with transaction(empty_db) as session:
        uris = [
            registry.register_version(
                session, name="n", task="encoder", kinds=["embed"], artifact_uri=lambda n: f"/s/n/{n}", sha256="0"
            ).artifact_uri
            for _ in range(2)
        ]
        assert uris == ["/s/n/1", "/s/n/2"]
        assert registry.version_exists(session, name="n", version=2)
        assert not registry.version_exists(session, name="n", version=3)


def test_a_copy_never_follows_a_link_even_one_made_after_the_import_checked(
    empty_db: sessionmaker[Session], tmp_path: Path
) -> None:
    # Given a source holding a symbolic link to a file outside it (as if swapped in after the import's check)…
    store, source = tmp_path / "store", _model(tmp_path / "src")
    (tmp_path / "secret").write_text("outside")
    (source / "sub" / "link").symlink_to(tmp_path / "secret")
    # …I expect the stored copy refused, no row, and nothing left in the store.
    with pytest.raises(UnsafeModelDirectory, match="symbolic link"):
        store_version(empty_db, store=store, directory=source, keep_source=True, name="m", task="encoder", source="x")
    with empty_db() as session:
        assert registry.versions(session, name="m", viewer=ANYONE) == []
    assert list(store.iterdir()) == []


@pytest.mark.parametrize(("output_name", "expected"), [(None, "acme/tiny"), ("old-name", "acme/old-name")])
def test_a_fine_tune_accepted_before_namespaces_registers_in_its_tenants_namespace(
    empty_db: sessionmaker[Session], settings: Any, tmp_path: Path, output_name: str | None, expected: str
) -> None:
    # Given a fine-tune of tenant acme accepted before the door named its result (no output name, or a bare one)…
    new = make_job(empty_db, items=1, shard_size=1)
    with empty_db() as session:
        base = registry.resolve(session, "tiny", viewer=ANYONE)
        assert base is not None
        info = VersionInfo.of(base)
    work = ShardWork(
        shard_id=new.shard_ids[0], job_id=new.job.id, tenant_id=new.job.tenant_id, kind="finetune", params={},
        attempts=1, items=[EngineItem(index=0, custom_id=None, input={"training_file": "file-x"})], version=info,
    )  # fmt: skip
    params = FinetuneParams.model_validate({"output_name": output_name} if output_name else {})
    result = FinetuneResult(steps=1, total_steps=1, stopped=False, output_dir=_model(tmp_path / "out"))
    runtime = build_runtime(settings.model_copy(update={"model_store": tmp_path / "store"}), worker_name="w@test")
    try:
        # …when the worker registers the result, I expect it in the tenant's namespace, owned by the tenant, stored
        # under the tenants' prefix of the store.
        version = _register(runtime, work, params, result)
    finally:
        runtime.engine.dispose()
    assert (version.name, version.version, version.owner_tenant_id) == (expected, 1, new.job.tenant_id)
    assert Path(version.artifact_uri) == (tmp_path / "store").resolve() / "_tenants" / expected / "1"
