"""Run a fine-tune in a child process (one rank, or ``torchrun`` for several) and relay its events.

Training stays out of the long-lived Celery pool process: DeepSpeed's global state and the torch.distributed
group die with the child, and a worker killed mid-run leaves checkpoints that a retry resumes from.

Failures, as seen by the task that called ``launch_finetune``:
    the run raised a JobError          the same class (TrainingDataError keeps its line numbers)
    the child died by a signal         TrainingKilledError, retryable (OOM killer, a node going down: resume later)
    the child exited non-zero          TrainingFailedError, naming the exit code only

The child's stderr goes to the worker's log, line by line, and its last lines again with the failure: a traceback
holds server paths and library internals, so the job's error (which its tenant reads) never carries it.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

from workers.allocator import with_allocator_env
from workers.engines.finetune.main import ERROR_PREFIX, EVENT_PREFIX, RESULT_PREFIX
from workers.engines.finetune.params import TrainingDataError
from workers.engines.finetune.run import FinetuneResult, FinetuneSpec
from workers.errors import JobError, PermanentJobError, RetryableJobError
from workers.process import die_with_parent

log = logging.getLogger(__name__)

STDERR_TAIL_LINES = 40  # a Python traceback plus torchrun's failure report
# torchrun's failure report names a worker's exit code; a negative one means that worker died by a signal.
_SIGNALLED_WORKER = re.compile(r"exitcode\s*:\s*-\d+")
# Inherited rendezvous variables would point the child at its parent's group (a test or an outer launcher).
_DIST_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK")
# How long a child asked to stop (SIGTERM: finish the step in flight) may take before it is killed. A step of a
# large model, or a checkpoint being written, takes seconds to a minute; a child that never stops must not hold
# its GPU (or keep a cancelled or timed-out job open) for ever.
KILL_GRACE_SECONDS = 60.0


class TrainingFailedError(PermanentJobError):
    """The training process exited with an error of its own (a crash, not a JobError it reported)."""

    code = "training_failed"


class TrainingKilledError(RetryableJobError):
    """The training process (or one of its ranks) was killed by a signal: the OOM killer, a node going down."""

    code = "training_killed"


def finetune_env(parent: Mapping[str, str]) -> dict[str, str]:
    """The child's environment: the parent's without its rendezvous variables, plus the allocator settings."""
    inherited = {k: v for k, v in parent.items() if k not in _DIST_VARIABLES and not k.startswith("TORCHELASTIC_")}
    return with_allocator_env(inherited)


def finetune_command(spec_file: Path, num_procs: int) -> list[str]:
    module = ["-m", "workers.engines.finetune.main", str(spec_file)]
    if num_procs == 1:
        return [sys.executable, *module]
    # torch.distributed.run is torchrun itself; running it from this interpreter avoids trusting PATH.
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={num_procs}", *module]


def launch_finetune(
    spec: FinetuneSpec,
    *,
    num_procs: int,
    on_event: Callable[[dict[str, Any]], None],
    should_stop: Callable[[], bool],
    poll_interval: float = 0.5,
    kill_grace: float = KILL_GRACE_SECONDS,
) -> FinetuneResult:
    """Run ``spec`` in a child process with ``num_procs`` ranks; call ``on_event`` for each of its events.

    ``should_stop`` is asked about every ``poll_interval`` seconds; once it says yes the child gets SIGTERM,
    finishes its current step and returns a result with ``stopped=True``; one still running ``kill_grace`` seconds
    later is killed (the result is then a stopped one too).
    """
    if num_procs < 1:
        raise PermanentJobError(f"num_procs must be at least 1, got {num_procs}")
    env = finetune_env(os.environ)
    fd, name = tempfile.mkstemp(prefix="lmbatch-finetune-", suffix=".json")
    spec_file = Path(name)
    with os.fdopen(fd, "w") as handle:
        handle.write(spec.to_json())
    try:
        child = subprocess.Popen(
            finetune_command(spec_file, num_procs),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            bufsize=1,
            env=env,
            preexec_fn=die_with_parent,
        )
        try:
            return _follow(
                child, on_event=on_event, should_stop=should_stop, poll_interval=poll_interval, kill_grace=kill_grace
            )
        finally:
            _reap(child)
    finally:
        spec_file.unlink(missing_ok=True)


def _follow(
    child: subprocess.Popen[str],
    *,
    on_event: Callable[[dict[str, Any]], None],
    should_stop: Callable[[], bool],
    poll_interval: float,
    kill_grace: float,
) -> FinetuneResult:
    lines: queue.Queue[tuple[str, str | None]] = queue.Queue()
    assert child.stdout is not None and child.stderr is not None
    for name, pipe in (("out", child.stdout), ("err", child.stderr)):
        threading.Thread(target=_pump, args=(name, pipe, lines), daemon=True).start()
    stderr_tail: deque[str] = deque(maxlen=STDERR_TAIL_LINES)
    result: FinetuneResult | None = None
    error: dict[str, Any] | None = None
    last_event: dict[str, Any] = {}
    open_streams, stop_sent, next_check = 2, False, 0.0
    kill_at: float | None = None
    while open_streams:
        try:
            stream, line = lines.get(timeout=poll_interval)
        except queue.Empty:
            stream, line = "", ""
        if line is None:
            open_streams -= 1
        elif stream == "err":
            stderr_tail.append(line)
            log.info("finetune child (pid %s) stderr: %s", child.pid, line)
        elif line.startswith(EVENT_PREFIX):
            event = json.loads(line[len(EVENT_PREFIX) :])
            last_event.update(event)
            on_event(event)
        elif line.startswith(RESULT_PREFIX):
            result = FinetuneResult.from_dict(json.loads(line[len(RESULT_PREFIX) :]))
        elif line.startswith(ERROR_PREFIX):
            error = json.loads(line[len(ERROR_PREFIX) :])
        elif line:
            log.debug("finetune child: %s", line)
        if not stop_sent and time.monotonic() >= next_check:
            next_check = time.monotonic() + poll_interval
            if should_stop():
                # torchrun forwards SIGTERM to its ranks, which agree to stop before their next step.
                child.send_signal(signal.SIGTERM)
                stop_sent = True
                kill_at = time.monotonic() + kill_grace
        if kill_at is not None and time.monotonic() >= kill_at and child.poll() is None:
            log.warning("finetune child (pid %s) still running %.0f s after SIGTERM; killing it", child.pid, kill_grace)
            child.kill()
            kill_at = None
    returncode = child.wait()
    return _outcome(returncode, result, error, stderr_tail, stop_sent=stop_sent, last_event=last_event)


def _pump(name: str, stream: IO[str], lines: queue.Queue[tuple[str, str | None]]) -> None:
    # One thread per pipe: an unread pipe fills up (64 KiB) and blocks the child mid-step.
    for line in stream:
        lines.put((name, line.rstrip("\n")))
    lines.put((name, None))


def _outcome(
    returncode: int,
    result: FinetuneResult | None,
    error: dict[str, Any] | None,
    stderr_tail: deque[str],
    *,
    stop_sent: bool,
    last_event: dict[str, Any],
) -> FinetuneResult:
    if result is not None:
        if returncode != 0 and not stop_sent:
            log.warning("fine-tune child exited %s after reporting its result", returncode)
        # torchrun exits non-zero after forwarding our SIGTERM even though every rank stopped cleanly.
        return result
    if error is not None:
        raise _job_error(error)
    if stop_sent:
        # Stopped before run_finetune was listening (still importing, say): nothing was trained or saved.
        return FinetuneResult(
            steps=int(last_event.get("step", 0)),
            total_steps=int(last_event.get("total_steps", 0)),
            stopped=True,
            output_dir=None,
        )
    tail = "\n".join(stderr_tail)
    if tail:
        log.error("the training process exited with code %s; its last stderr lines:\n%s", returncode, tail)
    if returncode < 0 or _SIGNALLED_WORKER.search(tail):
        what = f"signal {-returncode}" if returncode < 0 else "a signal (in one of its ranks)"
        raise TrainingKilledError(f"the training process was killed by {what}; it resumes from its last checkpoint")
    if returncode == 0:
        raise TrainingFailedError("the training process exited without a result")
    raise TrainingFailedError(f"the training process exited with code {returncode}")


def _job_error(error: dict[str, Any]) -> JobError:
    if error.get("code") == TrainingDataError.code and error.get("errors"):
        errors = [(int(n), str(msg)) for n, msg in error["errors"]]
        return TrainingDataError(errors, bad_lines=error.get("bad_lines"))
    cls = RetryableJobError if error.get("retryable") else PermanentJobError
    reported = cls(str(error.get("message", "fine-tune failed")))
    if isinstance(error.get("code"), str):
        reported.code = error["code"]  # the kind the run reported (model_integrity, …), not just its class's
    return reported


def _reap(child: subprocess.Popen[str]) -> None:
    """Make sure the child is gone: on the way out of an exception it may still be training."""
    if child.poll() is not None:
        return
    child.send_signal(signal.SIGTERM)
    try:
        child.wait(timeout=KILL_GRACE_SECONDS)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()
