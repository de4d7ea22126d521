"""workers/process.py: a child started with the parent-death hook does not outlive a parent killed outright.

The one implementation behind ``lmbatch up``'s supervisor and the fine-tune launcher, checked with real
processes: a middle process starts a sleeper, then gets SIGKILL (no chance to stop its children itself).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.stack import REPO

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux's parent-death signal")

MIDDLE = """
import subprocess, sys, time
from workers.process import parent_death_preexec
hook = parent_death_preexec() if sys.argv[1] == "hook" else None
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], preexec_fn=hook)
print(child.pid, flush=True)
time.sleep(60)
"""


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has ended; only its exit status is left


def orphan_of_a_killed_parent(mode: str) -> int:
    """The pid of the sleeper a middle process started (with or without the hook) before it was SIGKILLed."""
    middle = subprocess.Popen([sys.executable, "-c", MIDDLE, mode], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert middle.stdout is not None
    try:
        child = int(middle.stdout.readline())
    finally:
        middle.kill()
        middle.wait()
        middle.stdout.close()
    return child


def gone_within(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not alive(pid)


def test_given_the_hook_expect_the_child_to_die_with_its_killed_parent() -> None:
    # Given a child started with parent_death_preexec(), When its parent is SIGKILLed
    child = orphan_of_a_killed_parent("hook")
    # Expect the kernel to end the child too
    assert gone_within(child, 10.0), f"pid {child} outlived its parent"


def test_without_the_hook_the_child_would_outlive_its_parent() -> None:
    # The control: the same tree without the hook leaves an orphan, so the test above measures the hook.
    child = orphan_of_a_killed_parent("none")
    try:
        assert not gone_within(child, 1.0)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)


def test_given_a_parent_already_gone_expect_the_child_to_exit_at_once() -> None:
    # Given a child whose recorded launcher pid is not its parent (the launcher died before the request took effect)
    code = "from workers.process import die_with_parent; die_with_parent(parent=-1); print('still here')"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=30)
    # Expect it to exit 1 before running anything else
    assert result.returncode == 1 and result.stdout == ""
