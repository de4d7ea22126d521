"""`lmbatch db upgrade` / `keys create` / `keys revoke` as real processes on a real SQLite file."""

from __future__ import annotations

import hashlib
import os
import re
import sqlite3
import subprocess
from pathlib import Path

import pytest

from tests.stack import lmbatch_argv

KEY_LINE = re.compile(r"^lmb_[A-Za-z0-9_-]{20,}$")


def run_cli(database: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LMBATCH_")}
    env.update(LMBATCH_DATABASE_URL=f"sqlite:///{database}", LMBATCH_VAR_DIR=str(database.parent / "var"))
    return subprocess.run(
        [*lmbatch_argv(), *args], cwd=database.parent, env=env, capture_output=True, text=True, timeout=60
    )


@pytest.fixture
def database(tmp_path: Path) -> Path:
    path = tmp_path / "lmbatch.db"
    result = run_cli(path, "db", "upgrade", "--no-builtins")
    assert result.returncode == 0, result.stderr
    return path


def test_keys_create_prints_the_key_last_and_stores_only_its_hash(database: Path) -> None:
    # Given a migrated database
    # When an admin key is created
    result = run_cli(database, "keys", "create", "--tenant", "acme", "--admin")
    # Expect the key as the last line of output
    assert result.returncode == 0, result.stderr
    key = result.stdout.strip().splitlines()[-1]
    assert KEY_LINE.match(key), result.stdout
    # and the database holding its sha256, for tenant acme, with the admin scope ...
    with sqlite3.connect(database) as connection:
        rows = connection.execute(
            "SELECT k.key_hash, k.scope, t.name FROM api_keys k JOIN tenants t ON t.id = k.tenant_id"
        ).fetchall()
    assert rows == [(hashlib.sha256(key.encode()).hexdigest(), "admin", "acme")]
    # ... and the key itself nowhere on disk (the WAL file included)
    for path in database.parent.glob(database.name + "*"):
        assert key.encode() not in path.read_bytes(), path


def test_keys_revoke_refuses_a_key_that_is_not_live(database: Path) -> None:
    # Given a key that was created and then revoked
    key = run_cli(database, "keys", "create", "--tenant", "acme").stdout.strip().splitlines()[-1]
    assert run_cli(database, "keys", "revoke", key).returncode == 0
    # When it is revoked again, or an unknown key is revoked
    for result in (run_cli(database, "keys", "revoke", key), run_cli(database, "keys", "revoke", "lmb_unknown")):
        # Expect a non-zero exit and one readable line, no traceback
        assert result.returncode != 0
        assert result.stderr.strip().count("\n") == 0 and "no live key" in result.stderr, result.stderr
        assert "Traceback" not in result.stdout + result.stderr


def test_expected_errors_are_one_line(tmp_path: Path) -> None:
    # Given a database that was never migrated
    # When a key is created in it
    result = run_cli(tmp_path / "empty.db", "keys", "create", "--tenant", "acme")
    # Expect one line that says what to do
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert "lmbatch db upgrade" in result.stderr and "Traceback" not in result.stderr
