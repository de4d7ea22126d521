"""Running a quantize job: calibrate the parent, stage the int8 version, check it against the parent, register it.

The job runs on the CPU whatever the worker's device: torch's dynamic int8 layers have CPU kernels only, and the
check must measure the model exactly as a CPU worker will later load it. So the staged version (the parent's
files, hard-linked where the filesystem allows and copied otherwise, plus the recipe) is loaded through the
ordinary loader (workers/models/loading.py), which quantizes it, and that model is what the check compares.

Hard links: the new version shares the parent's weight files on disk, yet owns them: deleting the parent unlinks
only the parent's names. Its registered size counts the whole files all the same (what its owner's quota holds
if the parent goes).

What a SIGKILL leaves: before registration, the staging directory ``<store>/.quantize-<job>``, which the next
attempt of the same job removes first; after it, a registered version, which the next attempt finds
(``version_made_by``) and reuses instead of registering a second one.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import stat
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from db import events, jobs
from db.models import ModelVersion
from db.registry import ModelOwnershipError, namespace_of, version_made_by
from db.session import transaction
from workers.engines.types import ItemResult
from workers.errors import PermanentJobError
from workers.models.loading import LoadedModel, load_model
from workers.models.quality import Batching, CheckSize, QualityCheckFailed, quality_check, refusal
from workers.models.quantize import (
    CALIBRATION_TOKENS,
    Recipe,
    calibration_batches,
    input_ranges,
    layers_kept,
    read_recipe,
    write_recipe,
)
from workers.models.quantize_params import QuantizeParams
from workers.models.registration import store_version
from workers.models.store import MARKER
from workers.models.versions import load_version, verified_dir
from workers.runtime import Runtime
from workers.shards.recording import record_results
from workers.shards.work import LeaseKeeper, ShardWork, Tally

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

log = logging.getLogger("lmbatch.quantize")

CPU = torch.device("cpu")


def run_quantize_work(
    runtime: Runtime, work: ShardWork, *, should_stop: Callable[[], bool], keeper: LeaseKeeper, tally: Tally
) -> None:
    params = QuantizeParams.model_validate(work.params)
    version = _version_made_by(runtime, work.job_id)
    if version is None:
        staging = _staging_dir(runtime, work)
        try:
            made = _quantize(runtime, work, params, staging, should_stop=should_stop)
            if made is None or keeper.lost:
                return  # stopped: cancelled or paused, or the lease was lost (another attempt owns the job now)
            # An earlier attempt whose lease lapsed may have registered while this one computed: one version a job.
            version = _version_made_by(runtime, work.job_id) or _register(
                runtime, work, params, staging / "model", *made
            )
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    ref = f"{version.name}@{version.version}"
    output = {"model_version": ref, "metrics": version.metrics}
    tally.add(record_results(runtime.engine, job_id=work.job_id, results=[_result(work, output)]))
    with transaction(runtime.sessions) as session:
        if not jobs.set_result_model(session, job_id=work.job_id, ref=ref):
            log.warning("job %s already names another model than %s; it keeps that one", work.job_id, ref)
        _event(session, work.job_id, "registered", {"model_version": ref})


def _result(work: ShardWork, output: dict[str, Any]) -> ItemResult:
    item = work.items[0]
    return ItemResult(index=item.index, custom_id=item.custom_id, output=output, error=None)


def _quantize(
    runtime: Runtime, work: ShardWork, params: QuantizeParams, staging: Path, *, should_stop: Callable[[], bool]
) -> tuple[Recipe, dict[str, Any]] | None:
    parent_dir = verified_dir(runtime, work.version)
    if read_recipe(parent_dir) is not None:
        raise PermanentJobError(f"{work.version.ref} is already quantized: quantize its fp32 parent instead")
    parent = _load_parent(runtime, work, parent_dir)
    # Calibration only finds outlier layers: with no ratio, none are looked for.
    ranges = {} if params.outlier_ratio is None else input_ranges(parent.model, _calibration_batches(parent))
    kept = layers_kept(parent.model, ranges, params.outlier_ratio)
    recipe = Recipe(
        method=params.method, keep_fp32=tuple(kept), parent=work.version.ref, outlier_ratio=params.outlier_ratio
    )
    _record(runtime, work.job_id, "calibrated", {"kept_fp32": len(kept), "outlier_ratio": params.outlier_ratio})
    if should_stop():
        return None
    directory = stage_files(parent_dir, staging / "model")
    write_recipe(directory, recipe)
    quantized = load_model(directory, task=work.version.task, device=CPU)
    check = CheckSize(**params.check.model_dump())
    batching = Batching(runtime.settings.batch_size, runtime.settings.generate_batch_tokens)
    figures = quality_check(parent, quantized, check, batching=batching, should_stop=should_stop)
    if figures is None:
        return None
    figures = {**figures, "method": recipe.method, "kept_fp32_layers": len(kept)}
    _record(runtime, work.job_id, "checked", figures)
    reason = refusal(figures)
    if reason is not None:
        raise QualityCheckFailed(f"{reason}; the int8 version was not registered")
    return recipe, figures


def _load_parent(runtime: Runtime, work: ShardWork, parent_dir: Path) -> LoadedModel:
    """The fp32 parent on the CPU: from the worker's cache on a CPU worker (jobs on it often just ran), loaded
    apart on a GPU worker, whose cached copy is bf16 on its GPU."""
    if runtime.device.type == "cpu":
        return load_version(runtime, work.version)
    return load_model(parent_dir, task=work.version.task, device=CPU)


def _calibration_batches(parent: LoadedModel) -> list[dict[str, torch.Tensor]]:
    limit = min(CALIBRATION_TOKENS, parent.context_window())
    return calibration_batches(parent.tokenizer, task=parent.task, max_tokens=limit)


def _staging_dir(runtime: Runtime, work: ShardWork) -> Path:
    # Inside the store, so that hard links and the final rename stay on its filesystem. One per attempt: an earlier
    # attempt that lost its lease may still be writing its own.
    staging = Path(runtime.settings.model_store) / f".quantize-{work.job_id}-{work.attempts}"
    shutil.rmtree(staging, ignore_errors=True)  # left by this attempt's number on a worker that was killed
    staging.mkdir(parents=True)
    return staging


def stage_files(parent_dir: Path, target: Path) -> Path:
    """The parent's regular files under ``target``, hard-linked (copied where links cannot be made). A link or a
    special file in a verified version's directory is refused, never followed."""
    for dirpath, dirnames, filenames in os.walk(parent_dir):
        here = Path(dirpath)
        (target / here.relative_to(parent_dir)).mkdir(parents=True, exist_ok=True)
        for name in [*dirnames, *filenames]:
            if (here / name).is_symlink():
                raise PermanentJobError(f"the parent's files hold a symbolic link ({name}): refusing to copy it")
        for name in filenames:
            source, dest = here / name, target / here.relative_to(parent_dir) / name
            if name == MARKER:  # a built-in's cached checksum: not the new version's
                continue
            if not stat.S_ISREG(source.lstat().st_mode):
                raise PermanentJobError(f"the parent's files hold a special file ({name})")
            try:
                os.link(source, dest)
            except OSError as error:
                if error.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
                    raise
                shutil.copy2(source, dest)
    return target


def _register(
    runtime: Runtime, work: ShardWork, params: QuantizeParams, directory: Path, recipe: Recipe, figures: dict[str, Any]
) -> ModelVersion:
    """The staged directory as the next version of the name the door fixed: in the job's tenant's namespace, or a
    catalogue name (no owner), which only an admin's request gets."""
    name = params.output_name
    if name is None:
        raise PermanentJobError("the job names no output model (accepted by an older lmbatch?)")
    owner = None if namespace_of(name) is None else work.tenant_id
    try:
        version = store_version(
            runtime.sessions,
            store=runtime.settings.model_store,
            directory=directory,
            keep_source=False,
            name=name,
            task=work.version.task,
            source=f"quantize:{work.job_id}",
            owner_tenant_id=owner,
            parent_id=work.version.id,
            job_id=work.job_id,
            params={"base": work.version.ref, "quantization": recipe.to_json()},
            metrics=figures,
        )
    except ModelOwnershipError as error:
        raise PermanentJobError(f"cannot register {name}: {error}") from error
    log.info("job %s registered %s@%s (int8 of %s)", work.job_id, name, version.version, work.version.ref)
    return version


def _version_made_by(runtime: Runtime, job_id: str) -> ModelVersion | None:
    with runtime.sessions() as session:
        return version_made_by(session, job_id=job_id)


def _record(runtime: Runtime, job_id: str, name: str, metrics: dict[str, Any]) -> None:
    with transaction(runtime.sessions) as session:
        _event(session, job_id, name, metrics)


def _event(session: Session, job_id: str, name: str, metrics: dict[str, Any]) -> None:
    events.add_event(session, job_id=job_id, step=None, level="info", message=name, metrics=metrics)
