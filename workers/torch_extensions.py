"""Where torch JIT-builds the C++ extensions DeepSpeed needs, and recovery from a build that was killed.

On a CPU host ``deepspeed.init_distributed`` compiles a small shared-memory comm op with gcc the first time.
torch guards the build with a lock file (``<dir>/<op>/lock``) and every other process waits, with no
timeout, until that file is gone. A build that is SIGKILLed (a fine-tune cancelled or a worker killed in its
first minute) leaves the file behind, and from then on every fine-tune on the host hangs in
``init_distributed``. Hence two things here: each installation builds in a directory of its own (two
checkouts sharing ``~/.cache`` would also rebuild over each other, since their source paths differ), and a
lock older than any real build is removed before DeepSpeed starts.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import MutableMapping
from pathlib import Path

log = logging.getLogger(__name__)

# The shm op builds in ~30 s on a loaded 2-core machine; a lock this old belongs to a process that died.
STALE_LOCK_SECONDS = 600.0


def default_extensions_dir() -> Path:
    """Inside the virtual environment: the build matches the installed torch and DeepSpeed it was made with."""
    return Path(sys.prefix) / "torch_extensions"


def prepare_extensions_dir(env: MutableMapping[str, str] = os.environ) -> Path:
    """Point torch at this installation's extension directory (unless set already) and clear stale locks."""
    env.setdefault("TORCH_EXTENSIONS_DIR", str(default_extensions_dir()))
    root = Path(env["TORCH_EXTENSIONS_DIR"])
    for lock in clear_stale_locks(root):
        log.warning("removed %s: left by a build that was killed; the op will be rebuilt", lock)
    return root


def clear_stale_locks(root: Path, *, older_than: float = STALE_LOCK_SECONDS) -> list[Path]:
    """Remove build locks under ``root`` older than ``older_than`` seconds; returns those removed."""
    removed = []
    now = time.time()
    # <root>/<op>/lock under TORCH_EXTENSIONS_DIR; <root>/<python>_<accelerator>/<op>/lock under torch's default.
    locks = [*root.glob("*/lock"), *root.glob("*/*/lock")] if root.is_dir() else []
    for lock in locks:
        try:
            if now - lock.stat().st_mtime > older_than:
                lock.unlink()
                removed.append(lock)
        except FileNotFoundError:
            continue  # the build finished (or another process cleared it) meanwhile
    return removed


def build_deepspeed_ops() -> None:
    """Build what ``deepspeed.init_distributed`` would build on first use (``make install`` calls this)."""
    prepare_extensions_dir()
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None:  # GPU accelerators have no such op
        builder.load(verbose=False)


if __name__ == "__main__":
    build_deepspeed_ops()
