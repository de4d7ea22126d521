"""Child processes that die with their parent: the one place that asks Linux for a parent-death signal.

Two launchers need it: ``lmbatch up`` / ``worker`` / ``flower`` (api/cli/stack/supervisor.py) for the API,
workers, Flower and an embedded Redis, and a Celery worker for its fine-tune child
(workers/shards/finetune_process.py), whose ranks ask again themselves (workers/engines/finetune/main.py) since
``torchrun`` stands between them and the worker. Either way a launcher killed without stopping its children
(SIGKILL, the OOM killer) leaves no orphan holding a GPU, a port or a queue message.

Plain Python on purpose (no Celery, no database): workers/engines imports it, and the API's launcher reuses it.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Callable

_PR_SET_PDEATHSIG = 1

# Loaded once, at import, in the parent: the functions below run between fork and exec, where loading a
# library could deadlock on a lock another thread of the parent held at fork time.
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def die_with_parent(signum: int = signal.SIGTERM, *, parent: int | None = None) -> None:
    """Ask Linux to send this process ``signum`` when the thread that started it exits (no-op elsewhere).

    With ``parent`` (the launcher's pid, read before the fork), a launcher that died before the request took
    effect is noticed too, and this process exits at once instead of living on as an orphan.
    """
    if _LIBC is None:
        return
    _LIBC.prctl(_PR_SET_PDEATHSIG, signum, 0, 0, 0)
    if parent is not None and os.getppid() != parent:
        os._exit(1)


def parent_death_preexec(signum: int = signal.SIGTERM) -> Callable[[], None] | None:
    """A ``preexec_fn`` for ``subprocess.Popen``: the child gets ``signum`` when the calling thread exits.

    None where Linux's parent-death signal does not exist, so Popen forks without a hook. Call it in the
    parent, just before ``Popen``: it records the parent's pid for the race check of ``die_with_parent``.
    """
    if _LIBC is None:
        return None
    parent = os.getpid()

    def preexec() -> None:
        die_with_parent(signum, parent=parent)

    return preexec
