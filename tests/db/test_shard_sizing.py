"""Shard sizes from measured cost, the worker's result writes and migration 0008, on SQLite and PostgreSQL.

The estimate a worker records (db/shard_costs.py), the shards a new job then gets (db.jobs.create_job with the
settings' ShardSizing), the shard's end that records it, and the write path of results (db.results.write_results):
an overwrite, never a duplicate.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session, sessionmaker

from db import jobs, results
from db.migrate import alembic_config, upgrade
from db.models import Base, ItemResult, Shard, ShardCost
from db.session import make_engine, make_session_factory, transaction
from db.settings import Settings
from db.shard_costs import MAX_WEIGHT, SMOOTHING_ITEMS, CostSample, record_cost, seconds_per_item
from db.sharding import ShardSizing
from db.tenants import get_or_create_tenant
from tests.factories import add_model_row, make_job
from tests.stack import scratch_database
from workers.engines.types import EngineItem
from workers.models.versions import VersionInfo
from workers.shards.recording import record_shard_end
from workers.shards.runner import cost_sample
from workers.shards.work import ShardWork, Tally

SIZING = ShardSizing(default=16, target_seconds=2.0, max_items=100, batch_size=8, max_item_chars=1_000)


def _record(sessions: sessionmaker[Session], version_id: int, seconds_per_item: float, items: int, **kw: str) -> None:
    sample = CostSample(
        version_id, kw.get("kind", "classify"), kw.get("device", "cpu"), items, seconds_per_item * items
    )
    with transaction(sessions) as session:
        record_cost(session, sample=sample)


def _record_shaped(
    sessions: sessionmaker[Session], version_id: int, seconds_per_item: float, *, chars: float, labels: float
) -> None:
    sample = CostSample(version_id, "classify", "cpu", 200, seconds_per_item * 200, chars, labels)
    with transaction(sessions) as session:
        record_cost(session, sample=sample)


def _estimate(sessions: sessionmaker[Session], version_id: int, kind: str = "classify") -> float | None:
    with sessions() as session:
        return seconds_per_item(session, model_version_id=version_id, kind=kind)


def _shard_sizes(
    sessions: sessionmaker[Session],
    version_id: int,
    sizing: int | ShardSizing,
    *,
    items: int,
    kind: str = "classify",
    text: str = "text",
    labels: int = 0,
) -> list[int]:
    """The item counts of the shards a new job gets; rolled back, so no dispatcher ever sees the job."""
    with sessions() as session:
        new = jobs.create_job(
            session,
            tenant_id=get_or_create_tenant(session, name="acme").id,
            kind=kind,
            model_ref="m",
            model_version_id=version_id,
            params={"labels": [f"label {n}" for n in range(labels)]} if labels else {},
            items=[{"custom_id": f"c{i}", "input": {"text": f"{text} {i}"}} for i in range(items)],
            shard_size=sizing,
            sort_window=2,
        )
        cut = session.scalars(select(Shard.items).where(Shard.job_id == new.job.id).order_by(Shard.index)).all()
        session.rollback()
    return [len(shard) for shard in cut]


def test_a_model_without_an_estimate_gets_shards_of_shard_size(empty_db: sessionmaker[Session]) -> None:
    version = add_model_row(empty_db, "m")
    assert _estimate(empty_db, version.id) is None
    assert _shard_sizes(empty_db, version.id, SIZING, items=40) == [16, 16, 8]


def test_the_estimate_sizes_the_next_jobs_shards_within_bounds(empty_db: sessionmaker[Session]) -> None:
    version = add_model_row(empty_db, "m")
    # Given shards that measured 0.05 s an item: 2 s of work is 40 items (a job's last window of items is cut into
    # as many shards as it needs, of equal size)
    _record(empty_db, version.id, 0.05, 200)
    assert _shard_sizes(empty_db, version.id, SIZING, items=100) == [40, 40, 20]
    assert _shard_sizes(empty_db, version.id, SIZING, items=90) == [40, 40, 10]
    assert _shard_sizes(empty_db, version.id, SIZING, items=70) == [35, 35]
    # A fixed size, or a target of 0, ignores the estimate
    assert _shard_sizes(empty_db, version.id, 50, items=100) == [50, 50]
    assert _shard_sizes(empty_db, version.id, ShardSizing(16, 0, 100, 8, 1_000), items=48) == [16, 16, 16]
    # Generation with the same estimate never grows past shard_size; another kind has no estimate yet
    _record(empty_db, version.id, 0.05, 200, kind="generate")
    assert _shard_sizes(empty_db, version.id, SIZING, items=48, kind="generate") == [16, 16, 16]
    assert _shard_sizes(empty_db, version.id, SIZING, items=48, kind="embed") == [16, 16, 16]


def test_a_job_unlike_the_measured_items_gets_smaller_shards_never_larger(empty_db: sessionmaker[Session]) -> None:
    # Given an estimate measured on cheap items: short texts (12 characters) with 2 labels, 0.01 s each, so 2 s of
    # work would be 200 items, capped at max_items (100)
    version = add_model_row(empty_db, "m")
    _record_shaped(empty_db, version.id, 0.01, chars=12, labels=2)
    assert _shard_sizes(empty_db, version.id, SIZING, items=200, labels=2) == [100, 100]
    # Expect a job with 20 labels an item (10 times the measured) to get a tenth of the items a shard
    assert _shard_sizes(empty_db, version.id, SIZING, items=40, labels=20) == [20, 20]
    # and a job of 300-character texts to hold at most twice the measured text (16 characters counted at least) per
    # item: 100 items x 16 x 2 = 3,200 characters, 10 items a shard
    sizes = _shard_sizes(empty_db, version.id, SIZING, items=40, text="x" * 300)
    assert sum(sizes) == 40 and max(sizes) <= 3_200 // 300
    # while fewer labels than measured never grow a shard past what the estimate gives
    assert _shard_sizes(empty_db, version.id, SIZING, items=200, labels=1) == [100, 100]


def test_a_shard_of_refused_items_records_no_cost() -> None:
    # Given a shard whose every item failed at once (an empty text costs nothing to refuse)
    work = ShardWork(
        shard_id=1, job_id="job_x", tenant_id=1, kind="classify", params={"labels": ["a", "b", "c"]}, attempts=1,
        items=[EngineItem(0, None, {"text": ""}), EngineItem(1, None, {"text": "four"})],
        version=VersionInfo(7, "m@1", "encoder", ("classify",), "/nowhere", "0" * 64),
    )  # fmt: skip
    # Expect no sample from it, and a sample of the succeeded items alone, with their text and labels, otherwise
    assert cost_sample(work, device="cpu", succeeded=0, seconds=0.5) is None
    assert cost_sample(work, device="cpu", succeeded=1, seconds=0.5) == CostSample(7, "classify", "cpu", 1, 0.5, 2, 3)


def test_estimates_are_smoothed_and_the_slowest_device_type_sizes_shards(empty_db: sessionmaker[Session]) -> None:
    version = add_model_row(empty_db, "m")
    # The first sample is taken as it is
    _record(empty_db, version.id, 0.01, 20)
    assert _estimate(empty_db, version.id) == pytest.approx(0.01)
    # A full shard moves it half way to what it measured; a small one in proportion to its items
    _record(empty_db, version.id, 0.03, SMOOTHING_ITEMS)
    assert _estimate(empty_db, version.id) == pytest.approx(0.02)
    _record(empty_db, version.id, 1.02, SMOOTHING_ITEMS // 16)
    assert _estimate(empty_db, version.id) == pytest.approx(0.02 + MAX_WEIGHT / 16 * 1.0)
    # Another device type keeps its own estimate; a job is sized by the slowest
    _record(empty_db, version.id, 0.5, 50, device="cuda")
    _record(empty_db, version.id, 0.001, 50, device="mps")
    with empty_db() as session:
        rows = {row.device: row for row in session.scalars(select(ShardCost))}
    assert (
        set(rows) == {"cpu", "cuda", "mps"}
        and rows["cpu"].measured_items == 20 + SMOOTHING_ITEMS + SMOOTHING_ITEMS // 16
    )
    assert _estimate(empty_db, version.id) == pytest.approx(0.5)


def test_a_shard_end_records_its_cost_and_ends_even_when_the_cost_is_refused(empty_db: sessionmaker[Session]) -> None:
    new = make_job(empty_db, items=4, shard_size=2)
    version_id = new.job.model_version_id
    ended = []
    for shard_id, cost_version in zip(new.shard_ids, (version_id, 10**9), strict=True):
        with transaction(empty_db) as session:
            jobs.claim_shard(session, shard_id=shard_id, worker="w", lease_seconds=60)
        # When a shard ends with a cost (the second with one the database refuses: no such model version)
        ended.append(
            record_shard_end(
                empty_db,
                shard_id=shard_id,
                worker="w",
                status="succeeded",
                tally=Tally(succeeded=2),
                duration_seconds=0.5,
                cost=CostSample(cost_version, "embed", "cpu", 2, 0.2),
            )
        )
    # I expect both shards ended, and only the first cost kept
    assert ended == [True, True]
    with empty_db() as session:
        assert set(session.scalars(select(Shard.status).where(Shard.job_id == new.job.id))) == {"succeeded"}
        costs = session.execute(select(ShardCost.model_version_id, ShardCost.kind, ShardCost.seconds_per_item)).all()
    assert [tuple(row) for row in costs] == [(version_id, "embed", pytest.approx(0.1))]


# --- the worker's result writes ------------------------------------------------------------------------------------


def test_written_results_overwrite_never_duplicate(
    empty_db: sessionmaker[Session], engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    new = make_job(empty_db, items=6)
    rows = [{"index": i, "custom_id": f"c{i}", "output": {"v": 1}, "prompt_tokens": 3} for i in range(6)]
    results.write_results(engine, job_id=new.job.id, rows=rows)
    # Re-run: new outputs, one item now an error, and one index twice in a batch (the later row wins)
    again = [{**row, "output": {"v": 2}} for row in rows[:5]]
    again += [{"index": 5, "custom_id": "c5", "error": {"code": "x"}}, {"index": 4, "output": {"v": 3}}]
    results.write_results(engine, job_id=new.job.id, rows=again)
    # A batch larger than one statement's rows (a transaction of several statements)
    monkeypatch.setattr(results, "ROWS_PER_STATEMENT", 2)
    results.write_results(engine, job_id=new.job.id, rows=[{**row, "output": {"v": 4}} for row in rows[:3]])
    with empty_db() as session:
        stored = session.execute(
            select(ItemResult.index, ItemResult.custom_id, ItemResult.output, ItemResult.error)
            .where(ItemResult.job_id == new.job.id)
            .order_by(ItemResult.index)
        ).all()
    assert [tuple(row) for row in stored] == [
        (0, "c0", {"v": 4}, None),
        (1, "c1", {"v": 4}, None),
        (2, "c2", {"v": 4}, None),
        (3, "c3", {"v": 2}, None),
        (4, None, {"v": 3}, None),
        (5, "c5", None, {"code": "x"}),
    ]


def test_a_refused_batch_is_refused_whole_as_sqlalchemys_error(empty_db: sessionmaker[Session], engine: Engine) -> None:
    if engine.dialect.name != "postgresql":
        pytest.skip("SQLite stores a custom_id of any width")
    new = make_job(empty_db, items=2)
    rows = [{"index": 0, "output": {"v": 1}}, {"index": 1, "custom_id": "x" * 600, "output": {"v": 1}}]
    with pytest.raises(sa.exc.DataError):
        results.write_results(engine, job_id=new.job.id, rows=rows)
    with empty_db() as session:
        assert results.count_results(session, job_id=new.job.id) == 0


def test_a_write_leaves_its_pooled_connection_transactional(
    empty_db: sessionmaker[Session], settings: Settings
) -> None:
    # One pooled connection, so the transaction below runs on the connection the write used
    own = make_engine(settings, pool_size=1, max_overflow=0)
    try:
        new = make_job(empty_db, items=2)
        results.write_results(own, job_id=new.job.id, rows=[{"index": 0, "output": {"v": 1}}])
        # When a transaction on that connection rolls back
        with pytest.raises(RuntimeError, match="roll back"), transaction(make_session_factory(own)) as session:
            results.upsert_results(session, job_id=new.job.id, rows=[{"index": 1, "output": {"v": 1}}])
            raise RuntimeError("roll back")
        # I expect only the write's row
        with empty_db() as session:
            assert list(session.scalars(select(ItemResult.index).where(ItemResult.job_id == new.job.id))) == [0]
    finally:
        own.dispose()


# --- migration 0008 ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["sqlite", "postgresql"])
def test_migration_0008_adds_shard_costs_and_takes_them_away(which: str, tmp_path: Path) -> None:
    with scratch_database(which, tmp_path, name=f"lmbatch_mig8_{os.getpid()}") as url:
        settings = Settings(database_url=url, var_dir=tmp_path)
        check = sa.create_engine(url)
        try:
            upgrade(settings, "0007")
            upgrade(settings)
            with check.connect() as connection:
                # The migrated schema is the models' schema
                assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []
            command.downgrade(alembic_config(settings), "0007")
            with check.connect() as connection:
                assert "shard_costs" not in sa.inspect(connection).get_table_names()
                assert "shards" in sa.inspect(connection).get_table_names()
        finally:
            check.dispose()


@pytest.mark.parametrize("which", ["sqlite", "postgresql"])
def test_migration_0010_drops_estimates_that_do_not_say_what_they_measured(which: str, tmp_path: Path) -> None:
    with scratch_database(which, tmp_path, name=f"lmbatch_mig10_{os.getpid()}") as url:
        settings = Settings(database_url=url, var_dir=tmp_path)
        check = sa.create_engine(url)
        try:
            # Given a 0009 database with an estimate of the old shape
            upgrade(settings, "0009")
            version = add_model_row(make_session_factory(check), "m")
            with check.begin() as connection:
                connection.execute(
                    sa.text(
                        "INSERT INTO shard_costs (model_version_id, kind, device, seconds_per_item, measured_items, "
                        "updated_at) VALUES (:id, 'classify', 'cpu', 0.001, 64, CURRENT_TIMESTAMP)"
                    ),
                    {"id": version.id},
                )
            # Expect the upgrade to drop it (its jobs get shard_size until a shard measures again) and add the columns
            upgrade(settings)
            with check.connect() as connection:
                assert connection.execute(sa.text("SELECT count(*) FROM shard_costs")).scalar() == 0
                assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []
            command.downgrade(alembic_config(settings), "0009")
            with check.connect() as connection:
                columns = {column["name"] for column in sa.inspect(connection).get_columns("shard_costs")}
            assert "seconds_per_item" in columns and not columns & {"chars_per_item", "labels_per_item"}
        finally:
            check.dispose()
