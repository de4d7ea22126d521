"""`lmbatch db upgrade` / `keys create` / `keys list` / `keys revoke` as real processes on a real SQLite file."""

from __future__ import annotations

import hashlib
import os
import re
import sqlite3
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tests.stack import lmbatch_argv

KEY_LINE = re.compile(r"^lmb_[A-Za-z0-9_-]{20,}$")
CREATED_LINE = re.compile(r"key, id (\d+), for tenant")


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


def created_key(result: subprocess.CompletedProcess[str]) -> tuple[int, str]:
    """The id `keys create` reports and the key it prints last."""
    assert result.returncode == 0, result.stderr
    match = CREATED_LINE.search(result.stdout)
    assert match, result.stdout
    return int(match[1]), result.stdout.strip().splitlines()[-1]


def listed(database: Path) -> tuple[dict[int, list[str]], str]:
    """`keys list` as rows by key id (TENANT SCOPE PREFIX STATE CREATED EXPIRES REVOKED), and as printed."""
    result = run_cli(database, "keys", "list")
    assert result.returncode == 0, result.stderr
    rows = [line.split() for line in result.stdout.splitlines()[1:] if line.strip()]
    return {int(row[0]): row[1:] for row in rows}, result.stdout


def test_keys_are_listed_revoked_by_id_and_made_to_expire(database: Path) -> None:
    # Given an admin key for ever and a tenant key that expires in 30 days
    admin_id, admin_key = created_key(run_cli(database, "keys", "create", "--tenant", "ops", "--admin"))
    tenant_result = run_cli(database, "keys", "create", "--tenant", "acme", "--expires-in", "30d")
    tenant_id, tenant_key = created_key(tenant_result)
    # When the keys are listed
    rows, shown = listed(database)
    # Expect each with its tenant, scope, prefix and state, the expiry 30 days away, and never the key or its hash
    assert rows[admin_id][:4] == ["ops", "admin", admin_key[:10] + "…", "live"]
    assert rows[tenant_id][:4] == ["acme", "tenant", tenant_key[:10] + "…", "live"]
    expires = datetime.strptime(rows[tenant_id][6] + " " + rows[tenant_id][7], "%Y-%m-%d %H:%M:%SZ")
    assert abs(expires.replace(tzinfo=UTC) - (datetime.now(UTC) + timedelta(days=30))) < timedelta(minutes=5)
    assert rows[admin_id][6] == "-"
    for secret in (admin_key, tenant_key, hashlib.sha256(tenant_key.encode()).hexdigest()):
        assert secret not in shown
    # When the tenant key is revoked by its id
    assert run_cli(database, "keys", "revoke", str(tenant_id)).returncode == 0
    # Expect it listed as revoked, the admin key still live, and the database refusing it
    rows, _ = listed(database)
    assert rows[tenant_id][3] == "revoked" and rows[admin_id][3] == "live"
    with sqlite3.connect(database) as connection:
        revoked = connection.execute("SELECT revoked_at FROM api_keys WHERE id = ?", (tenant_id,)).fetchone()
    assert revoked[0] is not None
    # And an expiry in the past refused in one line
    result = run_cli(database, "keys", "create", "--tenant", "acme", "--expires-at", "2001-01-01")
    assert result.returncode != 0 and "already past" in result.stderr and result.stderr.strip().count("\n") == 0
