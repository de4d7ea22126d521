"""What the console's browser tests and its benchmark seed: jobs that ran to their end without a worker, written
through the same db functions a worker uses (dispatch, claim, results, finish), and a fine-tune with its logged
steps, as the trainer reports them, without running DeepSpeed.

No fixtures and no processes: plain functions over a session factory, like tests/factories.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from db import events, jobs
from db.dispatch import dispatch_shards
from db.models import ModelVersion, Shard
from db.registry import namespace_of_tenant, register_version
from db.results import upsert_results
from db.session import transaction
from db.tenants import get_or_create_tenant
from workers.engines.finetune.params import FinetuneParams

# Stands for the worker that "ran" seeded shards: it holds their leases between claim and finish.
SEED_WORKER = "seed@lmbatch-console"


@dataclass(frozen=True)
class SeededFinetune:
    job_id: str
    steps: int
    eval_steps: tuple[int, ...]
    result_model: str


def latest_version(session: Session, name: str) -> ModelVersion:
    version = session.scalars(
        select(ModelVersion).where(ModelVersion.name == name).order_by(ModelVersion.version.desc())
    ).first()
    assert version is not None, f"no model {name!r} is registered"
    return version


def train_loss(step: int) -> float:
    """A loss that falls the way a real run's does: fast first, then slowly."""
    return round(2.5 / (1 + 0.35 * step) + 0.4, 6)


def seed_finetune(
    session_factory: sessionmaker[Session],
    *,
    tenant: str,
    base: str = "smollm2-135m-instruct",
    steps: int = 12,
    eval_every: int = 4,
    output: str = "support-bot",
) -> SeededFinetune:
    """A succeeded fine-tune of ``base`` for ``tenant``: one train event per step 1..``steps``, an eval every
    ``eval_every`` steps with a checkpoint, and the version it made registered (a row only) as its result."""
    eval_steps = tuple(range(eval_every, steps + 1, eval_every))
    with transaction(session_factory) as session:
        owner = get_or_create_tenant(session, name=tenant)
        namespace = namespace_of_tenant(session, tenant_id=owner.id)
        base_version = latest_version(session, base)
        params = FinetuneParams.model_validate(
            {
                "output_name": f"{namespace}/{output}",
                "hyperparameters": {
                    "epochs": 3,
                    "learning_rate": 2e-4,
                    "eval_every": eval_every,
                    "checkpoint_every": eval_every,
                },
            }
        )
        run = {"training_file": "file-seeded", "training": {"rows": 96, "sha256": "0" * 64}, "validation_file": None}
        new = jobs.create_job(
            session,
            tenant_id=owner.id,
            kind="finetune",
            model_ref=base,
            model_version_id=base_version.id,
            params=params.model_dump(),
            items=[{"custom_id": None, "input": run}],
            shard_size=1,
        )
        job_id = new.job.id
        # Dispatched and claimed in the transaction that made it: no dispatcher ever sees it waiting, so no
        # worker trains it for real.
        _claim_all(session, job_id, new.shard_ids)
        events.add_event(session, job_id=job_id, message="started", step=0)
        for step in range(1, steps + 1):
            events.add_event(
                session,
                job_id=job_id,
                step=step,
                message="train",
                metrics={"loss": train_loss(step), "learning_rate": 2e-4, "tokens_per_second": 850.0},
            )
            if step in eval_steps:
                eval_loss = round(train_loss(step) + 0.15, 6)
                events.add_event(session, job_id=job_id, step=step, message="eval", metrics={"eval_loss": eval_loss})
                events.add_event(
                    session, job_id=job_id, step=step, message="checkpoint", metrics={"checkpoint": f"step-{step}"}
                )
        made = register_version(
            session,
            name=params.output_name or output,
            owner_tenant_id=owner.id,
            task="causal-lm",
            kinds=["generate"],
            artifact_uri="/nowhere",
            sha256="0" * 64,
            parent_id=base_version.id,
            job_id=job_id,
            params={
                "base": f"{base_version.name}@{base_version.version}",
                "hyperparameters": params.hyperparameters.model_dump(),
            },
            metrics={"steps": steps, "train_loss": train_loss(steps)},
            source=f"finetune:{job_id}",
        )
        ref = f"{made.name}@{made.version}"
        jobs.set_result_model(session, job_id=job_id, ref=ref)
        events.add_event(session, job_id=job_id, step=steps, message="registered", metrics={"model_version": ref})
        for shard_id in new.shard_ids:
            jobs.finish_shard(session, shard_id=shard_id, worker=SEED_WORKER, status="succeeded", succeeded=1, failed=0)
    return SeededFinetune(job_id, steps, eval_steps, ref)


def seed_job(
    session_factory: sessionmaker[Session],
    *,
    tenant: str,
    kind: str,
    model: str,
    items: list[dict[str, Any]],
    result: Callable[[int, dict[str, Any]], dict[str, Any]],
    params: dict[str, Any] | None = None,
    shard_size: int = 16,
    finished_shards: int | None = None,
    cancel: bool = False,
    queued: bool = False,
) -> str:
    """A job of ``tenant`` on the latest version of ``model`` (``items`` as a client sends them), run as a worker
    would run it but without one: every shard dispatched and claimed in the transaction that made the job (so no
    dispatcher sends it to a real worker), then ``result(index, item)`` (a dict with ``output`` or ``error``, and
    token counts if any) written for each item of the first ``finished_shards`` shards (all by default), which are
    finished with their counts. The rest stay running, unless ``cancel``: then the job is cancelled and they end
    cancelled. ``queued``: left waiting as the door leaves a job, for a stack without workers (a dispatcher would
    send it to one). Returns the job's id."""
    with transaction(session_factory) as session:
        owner = get_or_create_tenant(session, name=tenant)
        version = latest_version(session, model)
        new = jobs.create_job(
            session,
            tenant_id=owner.id,
            kind=kind,
            model_ref=model,
            model_version_id=version.id,
            params=params or {},
            # As the door stores them (api/services/intake.py): the custom_id beside the rest of the item.
            items=[{"custom_id": item.get("custom_id"), "input": _without_custom_id(item)} for item in items],
            shard_size=shard_size,
        )
        job_id = new.job.id
        if queued:
            return job_id
        _claim_all(session, job_id, new.shard_ids)
        spans = [(shard_id, *_span(session, shard_id)) for shard_id in new.shard_ids]
    finished = spans if finished_shards is None else spans[:finished_shards]
    for shard_id, start, end in finished:
        rows = [{"index": i, "custom_id": items[i].get("custom_id"), **result(i, items[i])} for i in range(start, end)]
        failed = sum(row.get("error") is not None for row in rows)
        with transaction(session_factory) as session:
            upsert_results(session, job_id=job_id, rows=rows)
            jobs.finish_shard(
                session,
                shard_id=shard_id,
                worker=SEED_WORKER,
                status="succeeded",
                succeeded=len(rows) - failed,
                failed=failed,
                prompt_tokens=sum(row.get("prompt_tokens", 0) for row in rows),
                completion_tokens=sum(row.get("completion_tokens", 0) for row in rows),
                duration_seconds=0.5,
            )
    if cancel:
        with transaction(session_factory) as session:
            jobs.cancel_job(session, job_id=job_id)
            for shard_id, _, _ in spans[len(finished) :]:
                jobs.finish_shard(
                    session, shard_id=shard_id, worker=SEED_WORKER, status="cancelled", succeeded=0, failed=0
                )
    return job_id


def _without_custom_id(item: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in item.items() if key != "custom_id"}


def _claim_all(session: Session, job_id: str, shard_ids: list[int]) -> None:
    dispatch_shards(session, job_id=job_id, count=len(shard_ids))
    for shard_id in shard_ids:
        claim = jobs.claim_shard(session, shard_id=shard_id, worker=SEED_WORKER, lease_seconds=3600)
        assert claim is jobs.Claim.CLAIMED, claim


def _span(session: Session, shard_id: int) -> tuple[int, int]:
    start, end = session.execute(select(Shard.start, Shard.end).where(Shard.id == shard_id)).one()
    return int(start), int(end)
