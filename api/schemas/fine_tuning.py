"""OpenAI's fine-tuning contract, as the official openai SDK reads it: one request model, and the job, event and
checkpoint objects with their lists.

A fine-tuning job is a native `finetune` job (api/schemas/jobs.py) seen through OpenAI's words: its
hyperparameters are translated both ways here, and its events (steps, losses, checkpoints) become OpenAI's
event and checkpoint objects.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field

from api.schemas.common import Metadata, ObjectId, Strict, epoch
from api.schemas.usage import JobUsage
from db import registry
from db.models import Job, JobEvent
from db.names import TERMINAL_JOB_STATES

# What OpenAI's `learning_rate_multiplier` multiplies.
BASE_LEARNING_RATE = 5e-5
# lmbatch's active job states in OpenAI's words; a terminal state is the same word in both.
STATUS = {"queued": "queued", "running": "running", "cancelling": "running", "paused": "paused"}
Auto = Literal["auto"]
EventLevel = Literal["info", "warn", "error"]
# OpenAI's event levels; any other level of lmbatch's (a fine-tune's "warning") reads as "warn".
LEVELS: dict[str, EventLevel] = {"info": "info", "warn": "warn", "error": "error"}


class OpenAIHyperparameters(Strict):
    n_epochs: Annotated[int, Field(ge=1)] | Auto = "auto"
    batch_size: Annotated[int, Field(ge=1)] | Auto = "auto"
    learning_rate_multiplier: Annotated[float, Field(gt=0, allow_inf_nan=False)] | Auto = "auto"


class Supervised(Strict):
    hyperparameters: OpenAIHyperparameters = Field(default_factory=OpenAIHyperparameters)


class Method(Strict):
    type: Literal["supervised"] = "supervised"
    supervised: Supervised = Field(default_factory=Supervised)


class FineTuningJobCreate(Strict):
    model: str = Field(min_length=1, max_length=200)
    training_file: ObjectId
    validation_file: ObjectId | None = None
    hyperparameters: OpenAIHyperparameters | None = None  # the older top-level form
    method: Method | None = None
    suffix: str | None = Field(None, pattern=r"^[a-z0-9][a-z0-9_-]{0,39}$")
    seed: int | None = Field(None, ge=0, le=2**63 - 1)  # torch.manual_seed takes at most 64 bits
    metadata: Metadata | None = None
    integrations: list[Any] | None = None

    def native_params(self, base_name: str, *, namespace: str) -> dict[str, Any]:
        """The same request in lmbatch's params (still to be validated); "auto" leaves lmbatch's default. A
        `suffix` names the result `<namespace>/<base name without its namespace>-<suffix>`; without one, the door
        gives the tenant's default name (db.registry.tenant_model_name)."""
        chosen = (self.method.supervised.hyperparameters if self.method else None) or self.hyperparameters
        chosen = chosen or OpenAIHyperparameters()
        hyper: dict[str, Any] = {}
        if chosen.n_epochs != "auto":
            hyper["epochs"] = chosen.n_epochs
        if chosen.batch_size != "auto":
            hyper["batch_size"] = chosen.batch_size
        if chosen.learning_rate_multiplier != "auto":
            hyper["learning_rate"] = BASE_LEARNING_RATE * chosen.learning_rate_multiplier
        if self.seed is not None:
            hyper["seed"] = self.seed
        output_name = None
        if self.suffix:
            output_name = f"{namespace}/{registry.base_name(base_name)}-{self.suffix}"[: registry.MAX_NAME_CHARS]
        return {"task": "causal-lm", "hyperparameters": hyper, "output_name": output_name}


class FineTuningError(BaseModel):
    code: str | None
    message: str
    param: str | None = None


class FineTuningHyperparameters(BaseModel):
    n_epochs: int
    batch_size: int
    learning_rate_multiplier: float


class FineTuningMethod(BaseModel):
    type: Literal["supervised"] = "supervised"


class FineTuningJob(BaseModel):
    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    model: str
    created_at: int
    finished_at: int | None
    fine_tuned_model: str | None
    organization_id: str = "lmbatch"
    status: str
    error: FineTuningError | None
    hyperparameters: FineTuningHyperparameters
    method: FineTuningMethod = Field(default_factory=FineTuningMethod)
    training_file: str | None
    validation_file: str | None
    result_files: list[str] = Field(default_factory=list)
    trained_tokens: int | None = None
    seed: int
    estimated_finish: int | None = None
    integrations: list[dict[str, Any]] = Field(default_factory=list)
    metadata: dict[str, Any] | None
    # lmbatch's own (the SDK keeps unknown fields): compute_seconds is the GPU-seconds the run held.
    usage: JobUsage

    @classmethod
    def of(cls, job: Job, *, run: dict[str, Any]) -> FineTuningJob:
        """`run` is the job's one item (db.job_reads.first_item_input): it names the training files."""
        hyper = job.params.get("hyperparameters", {})
        error = None
        if job.error:
            error = FineTuningError(code=job.error.get("code", "error"), message=job.error.get("message", ""))
        return cls(
            id=job.id,
            model=job.model_ref,
            created_at=epoch(job.created_at) or 0,
            finished_at=epoch(job.finished_at),
            fine_tuned_model=job.result_model,
            status=job.status if job.status in TERMINAL_JOB_STATES else STATUS.get(job.status, job.status),
            error=error,
            hyperparameters=FineTuningHyperparameters(
                n_epochs=hyper.get("epochs", 3),
                batch_size=hyper.get("batch_size", 8),
                learning_rate_multiplier=hyper.get("learning_rate", BASE_LEARNING_RATE) / BASE_LEARNING_RATE,
            ),
            training_file=run.get("training_file"),
            validation_file=run.get("validation_file"),
            seed=hyper.get("seed", 42),
            metadata=job.metadata_ or None,
            usage=JobUsage.of(job),
        )


class FineTuningJobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FineTuningJob]
    has_more: bool


class FineTuningJobEvent(BaseModel):
    id: str
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: int
    level: EventLevel
    message: str
    type: Literal["message", "metrics"]
    data: dict[str, Any]

    @classmethod
    def of(cls, event: JobEvent) -> FineTuningJobEvent:
        metrics = event.metrics
        is_metrics = "loss" in metrics or "eval_loss" in metrics
        return cls(
            id=f"ftevent-{event.id}",
            created_at=epoch(event.created_at) or 0,
            level=LEVELS.get(event.level, "warn"),
            message=_event_message(event),
            type="metrics" if is_metrics else "message",
            data={"step": event.step, **metrics},
        )


def _event_message(event: JobEvent) -> str:
    metrics = event.metrics
    if "loss" in metrics:
        return f"Step {event.step}: training loss={metrics['loss']:.4f}"
    if "eval_loss" in metrics:
        return f"Step {event.step}: validation loss={metrics['eval_loss']:.4f}"
    return event.message


class FineTuningJobEventList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FineTuningJobEvent]
    has_more: bool


class CheckpointMetrics(BaseModel):
    step: int | None
    train_loss: float | None


class FineTuningJobCheckpoint(BaseModel):
    id: str
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    created_at: int
    fine_tuned_model_checkpoint: str
    fine_tuning_job_id: str
    step_number: int | None
    metrics: CheckpointMetrics

    @classmethod
    def of(cls, job: Job, event: JobEvent, *, train_loss: float | None) -> FineTuningJobCheckpoint:
        """`event` is one whose metrics name a checkpoint; `train_loss` is the loss logged at its step."""
        return cls(
            id=f"ftckpt-{event.id}",
            created_at=epoch(event.created_at) or 0,
            fine_tuned_model_checkpoint=f"{job.id}:{event.metrics['checkpoint']}",
            fine_tuning_job_id=job.id,
            step_number=event.step,
            metrics=CheckpointMetrics(step=event.step, train_loss=train_loss),
        )


class FineTuningJobCheckpointList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FineTuningJobCheckpoint]
    has_more: bool
