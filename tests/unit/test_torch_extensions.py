"""A build lock left by a killed JIT build is cleared; a live build's lock is not."""

from __future__ import annotations

import os
import time
from pathlib import Path

from workers.torch_extensions import STALE_LOCK_SECONDS, clear_stale_locks, prepare_extensions_dir


def lock_at(path: Path, age_seconds: float) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()
    then = time.time() - age_seconds
    os.utime(path, (then, then))
    return path


def test_an_old_lock_is_removed_and_a_fresh_one_kept(tmp_path: Path) -> None:
    dead = lock_at(tmp_path / "deepspeed_shm_comm" / "lock", STALE_LOCK_SECONDS + 60)
    nested = lock_at(tmp_path / "py311_cpu" / "other_op" / "lock", STALE_LOCK_SECONDS + 60)
    building = lock_at(tmp_path / "fresh_op" / "lock", 5)
    assert sorted(clear_stale_locks(tmp_path)) == sorted([dead, nested])
    assert not dead.exists() and not nested.exists()
    assert building.exists()


def test_a_missing_directory_has_nothing_to_clear(tmp_path: Path) -> None:
    assert clear_stale_locks(tmp_path / "never-built") == []


def test_the_directory_is_this_installations_unless_set(tmp_path: Path) -> None:
    env: dict[str, str] = {}
    assert prepare_extensions_dir(env).name == "torch_extensions"
    chosen = {"TORCH_EXTENSIONS_DIR": str(tmp_path)}
    lock = lock_at(tmp_path / "op" / "lock", STALE_LOCK_SECONDS * 2)
    assert prepare_extensions_dir(chosen) == tmp_path
    assert not lock.exists()
