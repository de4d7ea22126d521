"""Running a fine-tuning shard: train in a child process (DeepSpeed), record its events, register the result.

Resuming: checkpoints live under `var_dir/finetune/<job>/checkpoints`; a later attempt of the same shard (the
worker died, the lease lapsed, another worker claimed it) finds them and continues from the last one.
Idempotent registration: a version already registered by this job is reused, never registered twice.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from db import events, jobs
from db.files import get_file
from db.models import ModelVersion
from db.registry import version_made_by
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
        with transaction(runtime.sessions) as session:
            _record(session, work.job_id, event)

    result = launch_finetune(spec, num_procs=params.num_gpus, on_event=on_event, should_stop=should_stop)
    return None if result.stopped or result.output_dir is None else result


def _file_path(runtime: Runtime, work: ShardWork, file_id: str) -> Path:
    with runtime.sessions() as session:
        stored = get_file(session, tenant_id=work.tenant_id, file_id=file_id)
    if stored is None or not Path(stored.storage_path).is_file():
        raise PermanentJobError(f"training file {file_id} is gone (deleted after the job was accepted?)")
    return Path(stored.storage_path)


def _record(session: Session, job_id: str, event: dict[str, Any]) -> None:
    """One event of the training child (`{"event": name, "step": n, "message"?: …, **metrics}`) as a job event."""
    name = str(event.get("event", "event"))
    step = event.get("step") if isinstance(event.get("step"), int) else None
    metrics = {k: v for k, v in event.items() if k not in ("event", "step", "message")}
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
    """Move the trained directory into the store as the next version of the output name, with lineage."""
    assert result.output_dir is not None
    name = params.output_name or work.version.ref.split("@", 1)[0]
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
        parent_id=work.version.id,
        job_id=work.job_id,
        params=lineage,
        metrics=metrics,
    )
    log.info("job %s registered %s@%s", work.job_id, name, version.version)
    return version
