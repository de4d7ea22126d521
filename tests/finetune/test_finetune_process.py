"""The launcher's contract without training: commands, the spec's JSON round trip, and how exits map to errors."""

from __future__ import annotations

import sys
from collections import deque
from pathlib import Path

import pytest

from workers.allocator import ALLOCATOR_ENV
from workers.engines.finetune.params import TrainingDataError
from workers.engines.finetune.run import FinetuneResult, FinetuneSpec
from workers.errors import PermanentJobError, RetryableJobError
from workers.shards.finetune_process import _job_error, _outcome, finetune_command, finetune_env

TORCHRUN_SIGNAL_REPORT = """torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
Root Cause (first observed failure):
[0]:
  rank      : 1 (local_rank: 1)
  exitcode  : -9 (pid: 4242)
  traceback : Signal 9 (SIGKILL) received by PID 4242"""


def test_given_a_spec_expect_it_to_round_trip_through_json(tmp_path: Path) -> None:
    spec = FinetuneSpec(
        base_model_dir=tmp_path / "base",
        task="causal-lm",
        train_file=tmp_path / "train.jsonl",
        validation_file=None,
        output_dir=tmp_path / "out",
        checkpoint_dir=tmp_path / "ck",
        params={"hyperparameters": {"epochs": 1}},
        resume=True,
    )

    assert FinetuneSpec.from_json(spec.to_json()) == spec


def test_given_one_or_more_processes_expect_python_or_torchrun(tmp_path: Path) -> None:
    single = finetune_command(tmp_path / "spec.json", 1)
    multi = finetune_command(tmp_path / "spec.json", 4)

    assert single == [sys.executable, "-m", "workers.engines.finetune.main", str(tmp_path / "spec.json")]
    assert multi[:5] == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4"]
    assert multi[5:] == single[1:]


def test_given_a_parent_environment_expect_the_child_without_rendezvous_and_with_allocator_settings() -> None:
    parent = {"PATH": "/bin", "RANK": "3", "MASTER_PORT": "29500", "TORCHELASTIC_RUN_ID": "x"}

    env = finetune_env(parent)

    assert env == {"PATH": "/bin", **ALLOCATOR_ENV}
    assert env["THP_MEM_ALLOC_ENABLE"] == "1"


def test_given_an_operator_allocator_setting_expect_it_to_win() -> None:
    env = finetune_env({"THP_MEM_ALLOC_ENABLE": "0", "MALLOC_TRIM_THRESHOLD_": "131072"})

    assert env["THP_MEM_ALLOC_ENABLE"] == "0"
    assert env["MALLOC_TRIM_THRESHOLD_"] == "131072"
    assert env["MALLOC_MMAP_THRESHOLD_"] == ALLOCATOR_ENV["MALLOC_MMAP_THRESHOLD_"]


def outcome(returncode: int, stderr: str = "", **kwargs: object) -> FinetuneResult:
    defaults: dict = {"result": None, "error": None, "stop_sent": False, "last_event": {}}
    defaults.update(kwargs)
    return _outcome(returncode, stderr_tail=deque(stderr.splitlines()), **defaults)


def test_given_a_child_killed_by_a_signal_expect_a_retryable_error() -> None:
    with pytest.raises(RetryableJobError):
        outcome(-9)
    with pytest.raises(RetryableJobError):  # torchrun exits 1 when one of its ranks is killed
        outcome(1, TORCHRUN_SIGNAL_REPORT)


def test_given_a_crash_expect_a_permanent_error_naming_the_exit_code_and_no_stderr(
    caplog: pytest.LogCaptureFixture,
) -> None:
    traceback = 'Traceback (most recent call last):\n  File "/srv/lmbatch/x.py"\nRuntimeError: CUDA out of memory'
    with caplog.at_level("ERROR"), pytest.raises(PermanentJobError) as caught:
        outcome(1, traceback)
    assert not isinstance(caught.value, RetryableJobError)
    # The job's error (a tenant reads it) names the kind of failure; the traceback goes to the worker's log.
    assert (caught.value.code, str(caught.value)) == ("training_failed", "the training process exited with code 1")
    assert "CUDA out of memory" in caplog.text and "/srv/lmbatch" in caplog.text
    with pytest.raises(PermanentJobError, match="without a result"):
        outcome(0)


def test_given_a_reported_job_error_expect_the_same_kind_back() -> None:
    data_error = _job_error({"code": "training_data", "message": "x", "errors": [[3, "bad"]], "bad_lines": 7})
    assert isinstance(data_error, TrainingDataError)
    assert data_error.errors == [(3, "bad")] and data_error.bad_lines == 7
    assert isinstance(_job_error({"code": "retryable", "retryable": True, "message": "busy"}), RetryableJobError)


def test_given_a_stop_before_training_began_expect_a_stopped_result() -> None:
    result = outcome(-15, stop_sent=True, last_event={"step": 0, "total_steps": 12})

    assert result.stopped and result.output_dir is None and result.total_steps == 12
