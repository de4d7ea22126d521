"""Migration 0009 (console sessions and sign-in links), up and down, on SQLite and PostgreSQL."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from db.migrate import alembic_config, upgrade
from db.models import Base
from db.settings import Settings
from tests.stack import scratch_database

CONSOLE_TABLES = {"console_sessions", "console_sign_in_links"}


@pytest.mark.parametrize("which", ["sqlite", "postgresql"])
def test_migration_0009_adds_the_console_tables_and_takes_them_away(which: str, tmp_path: Path) -> None:
    with scratch_database(which, tmp_path, name=f"lmbatch_mig9_{os.getpid()}") as url:
        settings = Settings(database_url=url, var_dir=tmp_path)
        check = sa.create_engine(url)
        try:
            # Given a database at 0008, upgraded to the head
            upgrade(settings, "0008")
            upgrade(settings)
            with check.connect() as connection:
                # I expect the migrated schema to be the models' schema
                assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []
            # and a downgrade to 0008 to take the console's tables away, and nothing else
            command.downgrade(alembic_config(settings), "0008")
            with check.connect() as connection:
                tables = set(sa.inspect(connection).get_table_names())
                assert not tables & CONSOLE_TABLES and {"api_keys", "shard_costs"} <= tables
        finally:
            check.dispose()
