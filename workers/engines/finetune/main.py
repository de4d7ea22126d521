"""``python -m workers.engines.finetune.main SPEC.json``: one fine-tune, in this process or as one rank of many.

Alone it makes itself rank 0 of a group of one; under ``torchrun`` or the ``deepspeed`` launcher it joins their
group. Only rank 0 writes the protocol lines below to stdout (one JSON object per line, after a prefix);
anything else on stdout or stderr is library chatter:

    LMBATCH_EVENT {...}      one per ``run_finetune`` event
    LMBATCH_RESULT {...}     ``FinetuneResult.to_dict()``, last, after a finished or cleanly stopped run
    LMBATCH_ERROR {...}      {"code", "retryable", "message"} (+ "errors", "bad_lines" for bad data):
                             the run raised a JobError (exit code 3)

SIGTERM asks for a stop before the next optimizer step. The process also gets SIGTERM when its parent dies
(workers/process.py), so an orphaned run never trains on beside the retry that resumes it.

Module level imports nothing heavy: the launcher (``workers.shards.finetune_process``) imports these names.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from pathlib import Path

from workers.process import die_with_parent

EVENT_PREFIX = "LMBATCH_EVENT "
RESULT_PREFIX = "LMBATCH_RESULT "
ERROR_PREFIX = "LMBATCH_ERROR "
EXIT_JOB_ERROR = 3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workers.engines.finetune.main")
    parser.add_argument("spec", type=Path, help="a FinetuneSpec as JSON")
    # The deepspeed launcher appends --local_rank=N; LOCAL_RANK in the environment says the same.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    # Again here, not only in the launcher's preexec_fn: under torchrun the parent is torchrun's agent.
    die_with_parent()
    stop = threading.Event()
    # A flag, not an exception: the step in flight (and any checkpoint being written) finishes first.
    signal.signal(signal.SIGTERM, lambda _signum, _frame: stop.set())

    from workers.engines.finetune.ds import single_process_env
    from workers.engines.finetune.params import TrainingDataError
    from workers.engines.finetune.run import FinetuneSpec, run_finetune
    from workers.errors import JobError, RetryableJobError

    spec = FinetuneSpec.from_json(args.spec.read_text())
    single_process_env(os.environ)
    is_rank0 = os.environ["RANK"] == "0"

    def emit(prefix: str, payload: dict) -> None:
        if is_rank0:
            print(prefix + json.dumps(payload), flush=True)

    try:
        result = run_finetune(spec, on_event=lambda event: emit(EVENT_PREFIX, event), should_stop=stop.is_set)
    except JobError as exc:
        payload = {"code": exc.code, "retryable": isinstance(exc, RetryableJobError), "message": str(exc)}
        if isinstance(exc, TrainingDataError):
            payload |= {"errors": [list(e) for e in exc.errors], "bad_lines": exc.bad_lines}
        emit(ERROR_PREFIX, payload)
        return EXIT_JOB_ERROR
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    emit(RESULT_PREFIX, result.to_dict())
    return 0


if __name__ == "__main__":
    sys.exit(main())
