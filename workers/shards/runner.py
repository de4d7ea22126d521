"""Running one shard: claim it, run its engine batch by batch, write results, finish it exactly once.

Plain Python over a Runtime: the Celery task (workers/tasks/shards.py) is a thin wrapper around
`run_shard`, and tests or a REPL can call it directly. A fine-tune shard is handed to finetune_runner.py; what
both runners carry (the work, its tally, the lease keeper) is in work.py.

What a SIGKILL leaves at each point: before the claim commits, nothing; after it, a running shard whose
lease expires (or which this node reclaims at once) and is run again; mid-run, results of finished
batches, overwritten by the re-run; after finish commits, a done shard whose redelivery does nothing.

Every shard ends: results and failures are written through recording.py, which stores an item error where the
database refuses a result and a fixed error where it refuses the shard's own, so a write that fails never leaves a
shard running to be claimed again and again. A cancel or pause is seen between decode steps (work.StopCheck).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy.exc import OperationalError

from db import events, job_reads, jobs
from db.session import transaction
from db.shard_costs import CostSample
from db.sharding import item_index, text_length
from workers.engines.params import PARAMS_BY_KIND
from workers.engines.types import EngineItem, ItemResult
from workers.errors import PermanentJobError, RetryableJobError
from workers.models.versions import VersionInfo, load_version
from workers.runtime import Runtime
from workers.shards.batch_finalizer import finalize_batch_of_job
from workers.shards.recording import record_results, record_shard_end, tenant_error
from workers.shards.wake import wake_dispatcher
from workers.shards.work import LeaseKeeper, ShardWork, StopCheck, Tally

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

log = logging.getLogger("lmbatch.shard")

ProgressCallback = Callable[[int, int], None]
# At most this long between two reads of whether the job was cancelled or paused (never longer than a heartbeat).
STOP_CHECK_SECONDS = 1.0


@dataclass(frozen=True)
class ShardOutcome:
    """What happened; `retry_in` (seconds) is set when the task should try again later."""

    status: str  # succeeded | failed | cancelled | busy | finished | missing | lost | retry
    retry_in: float | None = None
    done: int = 0


def run_shard(runtime: Runtime, shard_id: int, *, on_progress: ProgressCallback | None = None) -> ShardOutcome:
    settings = runtime.settings
    with transaction(runtime.sessions) as session:
        claim = jobs.claim_shard(
            session, shard_id=shard_id, worker=runtime.worker_name, lease_seconds=settings.lease_seconds
        )
        if claim is not jobs.Claim.CLAIMED:
            return _not_claimed(session, shard_id, claim)
        work = _load_work(session, shard_id)

    if work.attempts > settings.max_shard_attempts:
        reason = f"gave up after {_attempts(work.attempts - 1)} (the worker died or failed each time)"
        return _fail(runtime, work, {"code": "worker_lost", "message": reason}, Tally())

    keeper = LeaseKeeper(runtime, shard_id, started=work.started)
    keeper.start()
    tally = Tally()
    should_stop = StopCheck(
        keeper,
        lambda: _job_is_stopping(runtime, work.job_id),
        interval=min(STOP_CHECK_SECONDS, settings.heartbeat_seconds),
    )

    computed: float | None = None
    try:
        if work.kind == "finetune":
            # Imported here: a fine-tune pulls in DeepSpeed, which a worker that only runs inference never needs.
            from workers.shards.finetune_runner import run_finetune_work

            run_finetune_work(runtime, work, should_stop=should_stop, keeper=keeper, tally=tally)
        elif work.kind == "quantize":
            from workers.shards.quantize_runner import run_quantize_work

            run_quantize_work(runtime, work, should_stop=should_stop, keeper=keeper, tally=tally)
        else:
            computed = _run_inference(
                runtime, work, should_stop=should_stop, keeper=keeper, tally=tally, on_progress=on_progress
            )
    except PermanentJobError as error:
        keeper.stop()
        log.error("shard %s failed: %s", shard_id, error)
        return _fail(runtime, work, tenant_error(error), tally)
    except (RetryableJobError, OperationalError) as error:
        keeper.stop()
        return _retry(runtime, work, error, tally)
    except Exception as error:  # a bug or an unforeseen library error: retried within the attempts cap
        log.exception("shard %s failed unexpectedly", shard_id)
        keeper.stop()
        return _retry(runtime, work, error, tally)
    keeper.stop()
    if keeper.lost:
        return ShardOutcome("lost", done=tally.done)
    if tally.done < len(work.items):
        parked = _park_unless_cancelled(runtime, work, step=keeper.progress)
        if parked is not None:
            return parked
    status = "succeeded" if tally.done >= len(work.items) else "cancelled"
    cost = None
    if status == "succeeded" and computed is not None:
        # What the next job of this model is sized by (db/shard_costs.py); a cancelled shard's partial run is not.
        cost = cost_sample(work, device=runtime.device.type, succeeded=tally.succeeded, seconds=computed)
    _finish(runtime, work, status, tally, cost=cost)
    return ShardOutcome(status, done=tally.done)


def _run_inference(
    runtime: Runtime,
    work: ShardWork,
    *,
    should_stop: Callable[[], bool],
    keeper: LeaseKeeper,
    tally: Tally,
    on_progress: ProgressCallback | None,
) -> float:
    """Run the shard's items; the seconds they took once the model was loaded (their results' writes included)."""
    model = load_version(runtime, work.version)
    engine = _engine_for(work.kind)
    started = time.monotonic()

    def on_batch(results: list[ItemResult]) -> None:
        tally.add(record_results(runtime.engine, job_id=work.job_id, results=results))
        keeper.progress = tally.done
        if on_progress is not None:
            on_progress(tally.done, len(work.items))

    batching: dict[str, Any] = {"batch_size": runtime.settings.batch_size}
    if work.kind == "generate":
        from workers.engines.generate import batch_token_budget

        batching["max_batch_tokens"] = batch_token_budget(model, runtime.settings.generate_batch_tokens)
    for params, items in _param_groups(work):
        if should_stop():
            break
        engine(model, items, params, should_stop=should_stop, on_batch=on_batch, **batching)
    return time.monotonic() - started


def _engine_for(kind: str) -> Callable[..., list[ItemResult]]:
    # Imported here: each engine pulls in torch and transformers, which only a worker needs.
    if kind == "generate":
        from workers.engines.generate import generate

        return generate
    if kind == "classify":
        from workers.engines.classify import classify

        return classify
    if kind == "embed":
        from workers.engines.embed import embed

        return embed
    raise PermanentJobError(f"no engine runs {kind!r} shards")


def _param_groups(work: ShardWork) -> list[tuple[Any, list[EngineItem]]]:
    """Items may override the job's params (an OpenAI batch line carries its own temperature, say):
    the engine runs once per distinct set, in order of first appearance. Uniform jobs make one group."""
    groups: dict[str, tuple[Any, list[EngineItem]]] = {}
    for item in work.items:
        override = work.overrides.get(item.index) or {}
        key = json.dumps(override, sort_keys=True)
        if key not in groups:
            try:
                params = PARAMS_BY_KIND[work.kind].model_validate({**work.params, **override})
            except ValueError as error:
                raise PermanentJobError(f"invalid params for item {item.index}: {error}") from error
            groups[key] = (params, [])
        groups[key][1].append(item)
    return list(groups.values())


def _not_claimed(session: Session, shard_id: int, claim: jobs.Claim) -> ShardOutcome:
    if claim is jobs.Claim.BUSY:
        expires = job_reads.lease_expires_at(session, shard_id=shard_id)
        wait = (expires - datetime.now(UTC)).total_seconds() if expires else 1.0
        return ShardOutcome("busy", retry_in=max(1.0, wait + 0.5))
    return ShardOutcome(claim.value)


def _load_work(session: Session, shard_id: int) -> ShardWork:
    run = job_reads.shard_run(session, shard_id=shard_id)
    shard, job = run.shard, run.job
    indexes = [item_index(item, shard_start=shard.start, offset=offset) for offset, item in enumerate(shard.items)]
    items = [
        EngineItem(index=index, custom_id=item.get("custom_id"), input=item["input"])
        for index, item in zip(indexes, shard.items, strict=True)
    ]
    overrides = {index: item["params"] for index, item in zip(indexes, shard.items, strict=True) if item.get("params")}
    return ShardWork(
        shard_id=shard.id,
        job_id=job.id,
        tenant_id=job.tenant_id,
        kind=job.kind,
        params=dict(job.params),
        attempts=shard.attempts,
        items=items,
        version=VersionInfo.of(run.version),
        overrides=overrides,
    )


def _park_unless_cancelled(runtime: Runtime, work: ShardWork, *, step: int) -> ShardOutcome | None:
    """The shard stopped short. Cancelled job: None (the caller finishes it as cancelled). Otherwise it was
    paused, perhaps resumed again before this worker noticed: the shard goes back to queued, keeping its
    results and checkpoints, and the dispatcher sends it again once its job is not paused."""
    with transaction(runtime.sessions) as session:
        state = jobs.job_status(session, job_id=work.job_id)
        if state in ("cancelling", "cancelled", None):
            return None
        parked = jobs.park_shard(session, shard_id=work.shard_id, worker=runtime.worker_name, seconds=work.elapsed())
        if parked is jobs.Park.LOST:
            return ShardOutcome("lost")
        if parked is jobs.Park.STOPPING:  # cancelled since the look above
            return None
        events.add_event(session, job_id=work.job_id, step=step or None, message="paused", metrics={"step": step})
    wake_dispatcher(runtime.broker)
    return ShardOutcome("paused") if state == "paused" else ShardOutcome("requeued")


def _job_is_stopping(runtime: Runtime, job_id: str) -> bool:
    with runtime.sessions() as session:
        return jobs.job_status(session, job_id=job_id) in ("cancelling", "cancelled", "paused")


def _finish(
    runtime: Runtime,
    work: ShardWork,
    status: str,
    tally: Tally,
    error: dict[str, Any] | None = None,
    cost: CostSample | None = None,
) -> None:
    won = record_shard_end(
        runtime.sessions,
        shard_id=work.shard_id,
        worker=runtime.worker_name,
        status=status,
        tally=tally,
        duration_seconds=work.elapsed(),
        error=error,
        cost=cost,
    )
    if not won:
        log.warning("shard %s did not end here (taken over, or its end was refused); see above", work.shard_id)
        return
    # A place in the tenant's share and in the runway is free: the dispatcher fills it now, not at its next tick.
    wake_dispatcher(runtime.broker)
    # This shard may have ended its job: an OpenAI batch it serves is finalized now (this never raises).
    finalize_batch_of_job(runtime.settings, runtime.sessions, job_id=work.job_id)


def _fail(runtime: Runtime, work: ShardWork, detail: dict[str, str], tally: Tally) -> ShardOutcome:
    """Every item without a result gets the shard's error (``detail``, as a tenant may read it), so each input
    still has one result line; then the shard ends as failed, whatever the database refuses on the way."""
    missing = [item for item in work.items if item.index not in tally.indexes]
    failed = [ItemResult.failed(item, detail["code"], detail["message"]) for item in missing]
    tally.add(record_results(runtime.engine, job_id=work.job_id, results=failed))
    _finish(runtime, work, "failed", tally, error=detail)
    return ShardOutcome("failed", done=tally.done)


def _retry(runtime: Runtime, work: ShardWork, error: Exception, tally: Tally) -> ShardOutcome:
    if work.attempts >= runtime.settings.max_shard_attempts:
        detail = tenant_error(error)
        detail["message"] = f"{detail['message']} (gave up after {_attempts(work.attempts)})"
        log.error("shard %s failed for good after %d attempts: %s", work.shard_id, work.attempts, error)
        return _fail(runtime, work, detail, tally)
    try:
        with transaction(runtime.sessions) as session:
            jobs.requeue_shard(
                session,
                shard_id=work.shard_id,
                worker=runtime.worker_name,
                max_attempts=runtime.settings.max_shard_attempts,
                seconds=work.elapsed(),
            )
    except OperationalError:
        # The database itself is away: the lease will lapse and the shard comes back either way.
        log.warning("shard %s: database unreachable, leaving the lease to lapse", work.shard_id)
    return ShardOutcome("retry", retry_in=min(30.0, 2.0 * work.attempts), done=tally.done)


def _attempts(count: int) -> str:
    return f"{count} attempt" if count == 1 else f"{count} attempts"


def cost_sample(work: ShardWork, *, device: str, succeeded: int, seconds: float) -> CostSample | None:
    """What this shard measured, for the next job's shard sizes (db/shard_costs.py): only its succeeded items count
    (a refused item costs nothing), with the text and labels per item they carried."""
    if succeeded < 1:
        return None
    chars = sum(text_length(item.input) for item in work.items) / len(work.items)
    labels = len(work.params.get("labels") or ()) or 1
    return CostSample(work.version.id, work.kind, device, succeeded, seconds, chars, labels)
