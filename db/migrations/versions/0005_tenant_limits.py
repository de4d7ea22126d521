"""tenant limits: per-tenant overrides of the request rate, queued items and stored bytes; model version sizes

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30 22:20:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0005'
down_revision: str | None = '0004'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('tenants', schema=None) as batch_op:
        batch_op.add_column(sa.Column('max_requests_per_second', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('max_queued_items', sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column('max_stored_bytes', sa.BigInteger(), nullable=True))
    with op.batch_alter_table('model_versions', schema=None) as batch_op:
        batch_op.add_column(sa.Column('bytes', sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('model_versions', schema=None) as batch_op:
        batch_op.drop_column('bytes')
    with op.batch_alter_table('tenants', schema=None) as batch_op:
        batch_op.drop_column('max_stored_bytes')
        batch_op.drop_column('max_queued_items')
        batch_op.drop_column('max_requests_per_second')
