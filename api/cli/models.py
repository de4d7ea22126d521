"""``lmbatch models list | show | alias | delete | quantize`` and ``lmbatch finetune``: the model registry and how
new versions are made, over HTTP (api/client.py).

Listing and fine-tuning need any tenant's key: a tenant sees the shared catalogue and its own models
(``namespace/name``). A tenant moves aliases of, and deletes versions of, its own models; the shared catalogue's
need an admin key (``lmbatch keys create --admin``). A fine-tune or a quantization is a job like any other
(``lmbatch status`` and ``cancel`` work on it); they live here because what they leave behind is a model version.
"""

from __future__ import annotations

import time
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from api.cli.common import (
    POLL_SECONDS,
    CliError,
    KeyOpt,
    OneLineUsage,
    UrlOpt,
    connect,
    err,
    job_error,
    out,
    poll,
    show,
    when,
)
from api.client import DEFAULT_URL, TERMINAL_STATES, Client

models_app = typer.Typer(help="The model registry: versions and aliases.", no_args_is_help=True)
finetune_app = typer.Typer()  # merged into the root app: `lmbatch finetune`


def _listed(values: Any) -> str:
    return ", ".join(map(str, values)) if values else "-"


@models_app.command("list", cls=OneLineUsage)
def models_list(url: UrlOpt = DEFAULT_URL, api_key: KeyOpt = None) -> None:
    """Every model you see (the catalogue and your own): latest version, owner, kinds, task, aliases."""
    with connect(url, api_key) as client:
        models = client.list_models()["data"]
    table = Table(box=None, pad_edge=False)
    for column in ("NAME", "LATEST", "OWNER", "KINDS", "TASK", "ALIASES"):
        table.add_column(column, no_wrap=column == "NAME")
    for model in models:
        table.add_row(
            model["id"], str(model["latest_version"]), model["owned_by"], _listed(model["kinds"]), model["task"],
            _listed(model["aliases"]),
        )  # fmt: skip
    show(table)


@models_app.command("show", cls=OneLineUsage)
def models_show(
    name: Annotated[str, typer.Argument(help="The model's name.")],
    url: UrlOpt = DEFAULT_URL,
    api_key: KeyOpt = None,
) -> None:
    """A model's versions: aliases, lineage (the fine-tuning job that made it) and metrics."""
    with connect(url, api_key) as client:
        model = client.get_model(name)
    show(f"{model['id']}  task {model['task']}  kinds {_listed(model['kinds'])}")
    table = Table(box=None, pad_edge=False)
    for column in ("VERSION", "ALIASES", "SOURCE", "JOB", "CREATED", "METRICS"):
        table.add_column(column, no_wrap=column in ("VERSION", "JOB", "CREATED"))
    for version in model["versions"]:
        metrics = version.get("metrics") or {}
        shown = "  ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items() if v is not None
        )
        table.add_row(
            version["ref"], _listed(version["aliases"]), str(version.get("source") or "-"),
            version.get("job_id") or "-", when(version["created_at"]), shown or "-",
        )  # fmt: skip
    show(table)


@models_app.command("alias", cls=OneLineUsage)
def models_alias(
    name: Annotated[str, typer.Argument(help="The model's name (namespace/name for your own).")],
    alias: Annotated[str, typer.Argument(help="The alias, such as production; jobs then use name:alias.")],
    version: Annotated[int, typer.Argument(min=1, help="The version the alias points to from now on.")],
    url: UrlOpt = DEFAULT_URL,
    api_key: KeyOpt = None,
) -> None:
    """Point an alias at a version of your own model (any, with an admin key); ``name:alias`` then means it."""
    with connect(url, api_key) as client:
        client.set_alias(name, alias, version)
    out.print(f"{name}:{alias} → {name}@{version}")


@models_app.command("delete", cls=OneLineUsage)
def models_delete(
    name: Annotated[str, typer.Argument(help="The model's name (namespace/name for your own).")],
    version: Annotated[int, typer.Argument(min=1, help="The version to delete; its number is never reused.")],
    url: UrlOpt = DEFAULT_URL,
    api_key: KeyOpt = None,
) -> None:
    """Delete a version of your own model (any model with an admin key); refused while a job uses it."""
    with connect(url, api_key) as client:
        client.delete_model_version(name, version)
    out.print(f"deleted {name}@{version}")


@models_app.command("quantize", cls=OneLineUsage)
def models_quantize(
    ref: Annotated[str, typer.Argument(help="The model to quantize: name, name@VERSION or name:ALIAS.")],
    int8: Annotated[
        bool, typer.Option("--int8", help="Dynamic int8 linear layers (the only method; runs on CPU workers only).")
    ] = False,
    name: Annotated[
        str | None,
        typer.Option("--name", help="Register it as NAME in your namespace (default: namespace/<model's name>-int8)."),
    ] = None,
    all_layers: Annotated[
        bool,
        typer.Option("--all-layers", help="Quantize layers with activation outliers too (faster, less accurate)."),
    ] = False,
    check_prompts: Annotated[
        int | None, typer.Option(min=1, max=64, help="Prompts of the greedy-agreement check (default 64).")
    ] = None,
    check_sentences: Annotated[
        int | None, typer.Option(min=2, max=200, help="Labelled sentences of the accuracy check (default 200).")
    ] = None,
    wait: Annotated[bool, typer.Option("--wait", "-w", help="Follow the job until the version is registered.")] = False,
    url: UrlOpt = DEFAULT_URL,
    api_key: KeyOpt = None,
) -> None:
    """Make an int8 version of a model on a worker; it is registered only if its quality check passes."""
    if not int8:
        raise CliError("choose the method: --int8 (dynamic int8 linear layers)")
    body: dict[str, Any] = {"method": "int8"}
    if name:
        body["output_name"] = name
    if all_layers:
        body["outlier_ratio"] = None
    check = {k: v for k, v in {"prompts": check_prompts, "sentences": check_sentences}.items() if v is not None}
    if check:
        body["check"] = check
    with connect(url, api_key) as client:
        job = client.quantize_model(ref, body)
        _follow_model_job(client, job, wait=wait, made="the int8 version")


# ---------------------------------------------------------------------------------------------- finetune


class FinetuneTask(StrEnum):
    causal_lm = "causal-lm"
    sequence_classification = "sequence-classification"


def event_line(event: dict[str, Any], previous_loss: float | None) -> str:
    """One line per event; training losses carry an arrow against the previous one, so a fall shows."""
    metrics, step = event["metrics"], event["step"]
    head = f"step {step:>5}" if step is not None else " " * 10
    if "loss" in metrics:
        loss = float(metrics["loss"])
        trend = "" if previous_loss is None else ("↓" if loss < previous_loss else "↑" if loss > previous_loss else "=")
        extra = f"  lr {metrics['learning_rate']:.2e}" if isinstance(metrics.get("learning_rate"), float) else ""
        return f"{head}  loss {loss:.4f} {trend}{extra}"
    if "eval_loss" in metrics:
        accuracy = f"  accuracy {metrics['eval_accuracy']:.3f}" if metrics.get("eval_accuracy") is not None else ""
        return f"{head}  eval_loss {float(metrics['eval_loss']):.4f}{accuracy}"
    details = "  ".join(f"{k}={v}" for k, v in metrics.items() if not isinstance(v, dict | list))
    return f"{head}  {event['message']}  {details}".rstrip()


def follow_finetune(client: Client, job: dict[str, Any], *, console: Console) -> dict[str, Any]:
    """Print the run's events (losses as they fall) until the job ends."""
    after, previous_loss = 0, None
    while True:
        # The job's state is read before its events: once it is terminal, every event it wrote is in this read.
        job = poll(client, job["id"])
        while True:
            page = client.job_events(job["id"], after=after, limit=1000)
            for event in page["data"]:
                console.print(event_line(event, previous_loss), markup=False)
                previous_loss = event["metrics"].get("loss", previous_loss)
                after = event["id"]
            if not page["has_more"]:
                break
        if job["status"] in TERMINAL_STATES:
            return job
        time.sleep(POLL_SECONDS)


@finetune_app.command(cls=OneLineUsage)
def finetune(
    model: Annotated[str, typer.Option("--model", "-m", help="The base model: name, name@VERSION or name:ALIAS.")],
    train: Annotated[Path, typer.Option("--train", help="Training data, JSONL.")],
    validation: Annotated[Path | None, typer.Option("--validation", help="Validation data, JSONL.")] = None,
    task: Annotated[FinetuneTask, typer.Option("--task")] = FinetuneTask.causal_lm,
    epochs: Annotated[int | None, typer.Option(min=1)] = None,
    max_steps: Annotated[int | None, typer.Option(min=1, help="Optimizer steps; overrides --epochs.")] = None,
    lr: Annotated[float | None, typer.Option("--lr", help="Learning rate.")] = None,
    batch_size: Annotated[int | None, typer.Option(min=1, help="Examples per micro-batch per process.")] = None,
    max_seq_len: Annotated[int | None, typer.Option(min=8)] = None,
    zero_stage: Annotated[int | None, typer.Option(min=0, max=3, help="DeepSpeed ZeRO stage.")] = None,
    num_gpus: Annotated[int | None, typer.Option(min=1)] = None,
    labels: Annotated[str | None, typer.Option(help="Comma-separated labels (sequence-classification).")] = None,
    output_name: Annotated[
        str | None,
        typer.Option(help="Register the result as NAME in your namespace (default: namespace/<base model's name>)."),
    ] = None,
    wait: Annotated[bool, typer.Option("--wait", "-w", help="Follow the run (losses) until it ends.")] = False,
    url: UrlOpt = DEFAULT_URL,
    api_key: KeyOpt = None,
) -> None:
    """Fine-tune a model with DeepSpeed on the workers; the result becomes a new model version."""
    hyperparameters = {
        k: v
        for k, v in {
            "epochs": epochs, "max_steps": max_steps, "learning_rate": lr, "batch_size": batch_size,
            "max_seq_len": max_seq_len,
        }.items()
        if v is not None
    }  # fmt: skip
    params: dict[str, Any] = {"task": task.value, "hyperparameters": hyperparameters}
    if zero_stage is not None:
        params["deepspeed"] = {"zero_stage": zero_stage}
    if num_gpus is not None:
        params["num_gpus"] = num_gpus
    if output_name:
        params["output_name"] = output_name
    if labels:
        params["labels"] = [label.strip() for label in labels.split(",") if label.strip()]
    for path, what in ((train, "--train"), (validation, "--validation")):
        if path is not None and not path.is_file():
            raise CliError(f"{what} {path}: no such file")
    with connect(url, api_key) as client:
        body: dict[str, Any] = {"kind": "finetune", "model": model, "params": params}
        for field, path in (("training_file", train), ("validation_file", validation)):
            if path is not None:
                with path.open("rb") as handle:
                    body[field] = client.upload_file(handle, filename=path.name, purpose="fine-tune")["id"]
        job = client.create_job(body)
        _follow_model_job(client, job, wait=wait, made="the new model version")


def _follow_model_job(client: Client, job: dict[str, Any], *, wait: bool, made: str) -> None:
    """Print a model-making job's id; with ``wait``, follow it to its end and print the version it registered."""
    out.print(job["id"])
    if not wait:
        return
    job = follow_finetune(client, job, console=err)
    if job["status"] != "succeeded":
        raise CliError(f"job {job['id']} {job['status']}{job_error(job)}")
    err.print(f"job {job['id']} succeeded: {made} is {job['model_version']}")
    out.print(job["model_version"] or "-")  # the last line on stdout, for scripts: `… | tail -n 1`
