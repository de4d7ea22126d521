"""shard costs remember what they measured: characters of text and candidate labels per item

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-01 11:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # The estimates so far do not say what they measured, so none of them can bound a new job's shards by it: they
    # are dropped, and each model's next shard measures afresh (until then its jobs get shards of shard_size).
    op.execute("DELETE FROM shard_costs")
    with op.batch_alter_table("shard_costs") as batch:
        batch.add_column(sa.Column("chars_per_item", sa.Float(), server_default="0", nullable=False))
        batch.add_column(sa.Column("labels_per_item", sa.Float(), server_default="1", nullable=False))


def downgrade() -> None:
    with op.batch_alter_table("shard_costs") as batch:
        batch.drop_column("labels_per_item")
        batch.drop_column("chars_per_item")
