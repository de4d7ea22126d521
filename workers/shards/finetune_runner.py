"""Running a fine-tuning shard: train in a child process (DeepSpeed), record its events, register the result.

Resuming: checkpoints live under `var_dir/finetune/<job>/checkpoints`; a later attempt of the same shard (the
worker died, the lease lapsed, another worker claimed it) finds them and continues from the last one.
Idempotent registration: a version already registered by this job is reused, never registered twice.
Time limit: a job's params carry `time_limit_seconds` (set at the door; None for a job accepted before limits
existed). Training time adds up over the job's attempts (each stop records its run's seconds in its `stopped`
event, so a pause and resume does not restart the clock); once it is spent the child is stopped and the job fails
with code `time_limit`, its checkpoints and their events kept, so they stay listed.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from time import monotonic
from typing import TYPE_CHECKING, Any

from db import events, jobs
from db.files import kept_file
from db.models import ModelVersion
from db.registry import namespace_of, namespace_of_tenant, tenant_model_name, version_made_by
from db.results import upsert_results
from db.session import transaction
from workers.engines.finetune.params import FinetuneParams
from workers.engines.finetune.run import FinetuneResult, FinetuneSpec
from workers.engines.types import ItemResult
from workers.errors import PermanentJobError
from workers.models.registration import store_version
from workers.models.versions import verified_dir
from workers.runtime import Runtime
from workers.shards.finetune_process import launch_finetune
from workers.shards.work import LeaseKeeper, ShardWork, Tally

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

log = logging.getLogger("lmbatch.finetune")

# The engine task a fine-tune produces.
RESULT_TASK = {"causal-lm": "causal-lm", "sequence-classification": "sequence-classification"}
# The metric of a `stopped` event that holds the seconds its run trained, summed over attempts for the time limit.
RUN_SECONDS = "run_seconds"
# Fields of the child's events kept out of the job's events, which tenants read: server paths are none of theirs.
_PRIVATE_EVENT_FIELDS = ("output_dir",)


class TimeLimitReached(PermanentJobError):
    """The job's training time reached its `time_limit_seconds`: the run was stopped, its checkpoints kept."""

    code = "time_limit"


@dataclass
class RunClock:
    """A job's training time: what earlier attempts used, plus this attempt's wall-clock time so far."""

    limit: float | None  # None: a job accepted before limits existed
    used_before: float = 0.0
    started: float = field(default_factory=lambda: monotonic())

    def this_run(self) -> float:
        return monotonic() - self.started

    def spent(self) -> bool:
        return self.limit is not None and self.used_before + self.this_run() >= self.limit


def job_dir(runtime: Runtime, job_id: str) -> Path:
    return runtime.settings.var_dir / "finetune" / job_id


def run_finetune_work(
    runtime: Runtime, work: ShardWork, *, should_stop: Callable[[], bool], keeper: LeaseKeeper, tally: Tally
) -> None:
    params = FinetuneParams.model_validate(work.params)
    item = work.items[0]
    existing = _version_made_by(runtime, work.job_id)
    if existing is None:
        result = _train(runtime, work, params, should_stop=should_stop, keeper=keeper)
        if result is None:
            return  # stopped: cancelled, or the lease was lost
        existing = _register(runtime, work, params, result)
    ref = f"{existing.name}@{existing.version}"
    with transaction(runtime.sessions) as session:
        if not jobs.set_result_model(session, job_id=work.job_id, ref=ref):
            log.warning("job %s already names another model than %s; it keeps that one", work.job_id, ref)
        output = {"model_version": ref, "metrics": existing.metrics}
        upsert_results(session, job_id=work.job_id, rows=[{"index": item.index, "output": output}])
        _record(
            session, work.job_id, {"event": "registered", "model_version": ref, "step": existing.metrics.get("steps")}
        )
    tally.add([ItemResult(index=item.index, custom_id=None, output=output, error=None)])
    shutil.rmtree(job_dir(runtime, work.job_id), ignore_errors=True)


def _train(
    runtime: Runtime, work: ShardWork, params: FinetuneParams, *, should_stop: Callable[[], bool], keeper: LeaseKeeper
) -> FinetuneResult | None:
    run = work.items[0].input
    clock = RunClock(params.time_limit_seconds, used_before=_seconds_trained(runtime, work.job_id))
    if clock.spent():
        raise _time_limit_reached(clock, steps=None)
    base = verified_dir(runtime, work.version)
    directory = job_dir(runtime, work.job_id)
    checkpoints = directory / "checkpoints"
    resume = checkpoints.is_dir() and any(checkpoints.iterdir())
    spec = FinetuneSpec(
        base_model_dir=base,
        task=params.task,
        train_file=_file_path(runtime, work, run["training_file"]),
        validation_file=_file_path(runtime, work, run["validation_file"]) if run.get("validation_file") else None,
        output_dir=directory / "output",
        checkpoint_dir=checkpoints,
        params=work.params,
        resume=resume,
    )

    def on_event(event: dict[str, Any]) -> None:
        if isinstance(event.get("step"), int):
            keeper.progress = event["step"]
        if event.get("event") == "stopped":
            event = {**event, RUN_SECONDS: round(clock.this_run(), 1)}
        with transaction(runtime.sessions) as session:
            _record(session, work.job_id, event)

    timed_out = False

    def stop_or_time_up() -> bool:
        nonlocal timed_out
        if clock.spent():
            timed_out = True
            return True
        return should_stop()

    result = launch_finetune(spec, num_procs=params.num_gpus, on_event=on_event, should_stop=stop_or_time_up)
    if result.stopped or result.output_dir is None:
        if timed_out:
            raise _time_limit_reached(clock, steps=result.steps)
        return None
    return result


def _seconds_trained(runtime: Runtime, job_id: str) -> float:
    """Training seconds of the job's earlier attempts that stopped (a killed worker's run is not counted)."""
    with runtime.sessions() as session:
        stops = events.events_newest_first(session, job_id=job_id)
    return sum(float(e.metrics.get(RUN_SECONDS) or 0.0) for e in stops if e.message == "stopped")


def _time_limit_reached(clock: RunClock, *, steps: int | None) -> TimeLimitReached:
    where = f" after {steps} steps" if steps is not None else ""
    return TimeLimitReached(
        f"the run reached its time limit of {clock.limit:g} seconds{where}; its checkpoints are kept"
    )


def _file_path(runtime: Runtime, work: ShardWork, file_id: str) -> Path:
    with runtime.sessions() as session:
        # By id, expired or not: the job was accepted while the file was live, and the sweeper keeps its bytes
        # until the job ends (db.files.files_still_read).
        stored = kept_file(session, tenant_id=work.tenant_id, file_id=file_id)
    if stored is None or not Path(stored.storage_path).is_file():
        raise PermanentJobError(f"training file {file_id} is gone (deleted after the job was accepted?)")
    return Path(stored.storage_path)


def _record(session: Session, job_id: str, event: dict[str, Any]) -> None:
    """One event of the training child (`{"event": name, "step": n, "message"?: …, **metrics}`) as a job event."""
    name = str(event.get("event", "event"))
    step = event.get("step") if isinstance(event.get("step"), int) else None
    metrics = {k: v for k, v in event.items() if k not in ("event", "step", "message", *_PRIVATE_EVENT_FIELDS)}
    events.add_event(
        session,
        job_id=job_id,
        step=step,
        level="warning" if name == "warning" else "info",
        message=str(event.get("message", name)),
        metrics=metrics,
    )


def _version_made_by(runtime: Runtime, job_id: str) -> ModelVersion | None:
    with runtime.sessions() as session:
        return version_made_by(session, job_id=job_id)


def _register(runtime: Runtime, work: ShardWork, params: FinetuneParams, result: FinetuneResult) -> ModelVersion:
    """Move the trained directory into the store as the next version of the output name, with lineage, owned by
    the job's tenant. The door fixed the name in the tenant's namespace; a job accepted before namespaces existed
    has none (or a bare one) and gets `<tenant namespace>/<its name, or the base's>` here, so a fine-tune never
    adds a version to a name its tenant does not own."""
    assert result.output_dir is not None
    name = params.output_name or ""
    if namespace_of(name) is None:
        with runtime.sessions() as session:
            namespace = namespace_of_tenant(session, tenant_id=work.tenant_id)
        if namespace is None:
            raise PermanentJobError(f"tenant {work.tenant_id} is gone: nobody to register the model for")
        # `<namespace>/<name without namespace>`, cut to the column's width.
        name = tenant_model_name(None, base=name or work.version.ref.split("@", 1)[0], namespace=namespace)
    task = RESULT_TASK[params.task]
    metrics = {
        "steps": result.steps,
        "train_loss": result.train_loss,
        "eval_loss": result.eval_loss,
        "eval_accuracy": result.eval_accuracy,
        "resumed_from_step": result.resumed_from_step,
    }
    run = work.items[0].input
    lineage = {
        "base": work.version.ref,
        "hyperparameters": params.hyperparameters.model_dump(),
        "deepspeed": params.deepspeed.model_dump(),
        "training_file": run["training_file"],
        "training_sha256": run.get("training", {}).get("sha256"),
        "training_rows": run.get("training", {}).get("rows"),
    }
    version = store_version(
        runtime.sessions,
        store=runtime.settings.model_store,
        directory=result.output_dir,
        keep_source=False,
        name=name,
        task=task,
        source=f"finetune:{work.job_id}",
        owner_tenant_id=work.tenant_id,
        parent_id=work.version.id,
        job_id=work.job_id,
        params=lineage,
        metrics=metrics,
    )
    log.info("job %s registered %s@%s", work.job_id, name, version.version)
    return version
