"""A fine-tune run as the tests start it: a spec on a tiny model, then ``launch_finetune``, the production path (a
child process per run keeps DeepSpeed's global state and torch.distributed out of the pytest process)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from workers.engines.finetune.run import FinetuneResult, FinetuneSpec
from workers.shards.finetune_process import launch_finetune


def make_spec(
    tmp_path: Path, base: Path, train_file: Path, *, task: str = "causal-lm", resume: bool = False, **params: Any
) -> FinetuneSpec:
    return FinetuneSpec(
        base_model_dir=base,
        task=task,
        train_file=train_file,
        output_dir=tmp_path / "output",
        checkpoint_dir=tmp_path / "checkpoints",
        params={"task": task, **params},
        resume=resume,
    )


@dataclass
class Run:
    """A finished ``launch_finetune`` call with the events it reported."""

    result: FinetuneResult
    events: list[dict[str, Any]] = field(default_factory=list)

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["event"] == kind]


def run(
    spec: FinetuneSpec, *, num_procs: int = 1, should_stop: Callable[[list[dict[str, Any]]], bool] | None = None
) -> Run:
    """Launch ``spec`` and collect its events; ``should_stop`` sees the events so far."""
    events: list[dict[str, Any]] = []
    result = launch_finetune(
        spec,
        num_procs=num_procs,
        on_event=events.append,
        should_stop=(lambda: should_stop(events)) if should_stop else (lambda: False),
        poll_interval=0.05,
    )
    return Run(result, events)
