"""Shards sized by measured cost, end to end: a real worker records what a classify item cost, and the API cuts the
next job of that model into larger shards. On SQLite and on PostgreSQL (the `backend` fixture)."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from api.app import create_app
from db.models import Shard, ShardCost
from db.settings import Settings
from tests.factories import submit, wait_job
from tests.integration.sentences import NEGATIVE, POSITIVE
from tests.stack import WorkerProcess

pytestmark = pytest.mark.slow


def _shard_sizes(sessions: sessionmaker[Session], job_id: str) -> list[int]:
    with sessions() as session:
        return [len(items) for items in session.scalars(select(Shard.items).where(Shard.job_id == job_id))]


def test_the_next_job_of_a_model_gets_shards_sized_by_what_its_items_cost(
    settings: Settings, db_with_builtins: sessionmaker[Session], tenant_a: dict[str, str], worker: WorkerProcess
) -> None:
    # Given an API that sizes shards to a minute of work, at most 32 items (the test settings' shard_size is 16)
    sized = settings.model_copy(update={"shard_target_seconds": 60.0, "shard_max_items": 32})
    body = {
        "kind": "classify",
        "model": "all-minilm-l6-v2",
        "inputs": [{"text": text} for text in (POSITIVE + NEGATIVE)],
        "params": {"labels": ["positive", "negative"]},
    }
    with TestClient(create_app(sized)) as api:
        # When a model that never ran here gets a job: shards of shard_size (40 items: three, of equal size)
        first = submit(api, tenant_a, body)
        assert sorted(_shard_sizes(db_with_builtins, first["id"])) == [12, 14, 14]
        assert wait_job(api, tenant_a, first["id"])["status"] == "succeeded"
        # I expect the worker to have recorded what an item cost on its device, over all 40 items
        with db_with_builtins() as session:
            (cost,) = session.scalars(select(ShardCost)).all()
        assert (cost.kind, cost.device, cost.measured_items) == ("classify", "cpu", 40)
        assert 0 < cost.seconds_per_item < 60 / 32  # MiniLM: milliseconds an item
        # …and the next job of the model cut into larger shards, bounded by shard_max_items: two, not three
        second = submit(api, tenant_a, body)
        assert sorted(_shard_sizes(db_with_builtins, second["id"])) == [20, 20]
        assert wait_job(api, tenant_a, second["id"])["status"] == "succeeded"
