"""fair scheduling: tenant weights and running caps, each job's queue and its place in it, dispatched shards

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01 00:20:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0006'
down_revision: str | None = '0005'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

MULTI_GPU_QUEUE = 'finetune.multi'


def _queue_of(kind: str, params: object) -> str:
    # db.names.queue_for as it stands at this revision, copied: a migration must not change with later code.
    num_gpus = params.get('num_gpus', 1) if isinstance(params, dict) else 1
    return MULTI_GPU_QUEUE if kind == 'finetune' and int(num_gpus or 1) > 1 else kind


def upgrade() -> None:
    with op.batch_alter_table('tenants', schema=None) as batch_op:
        batch_op.add_column(sa.Column('weight', sa.Float(), nullable=True))
        batch_op.add_column(sa.Column('max_running_shards', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('max_concurrent_finetunes', sa.Integer(), nullable=True))
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('queue', sa.String(length=32), nullable=True))
        batch_op.add_column(sa.Column('shards_ahead', sa.Integer(), nullable=True))
    jobs = sa.table('jobs', sa.column('id', sa.String), sa.column('kind', sa.String), sa.column('params', sa.JSON),
                    sa.column('queue', sa.String))
    connection = op.get_bind()
    # Every kind's queue is its name, except multi-GPU fine-tunes: one statement for the many, a row at a time for
    # the fine-tunes (params is JSON, read the same way on SQLite and PostgreSQL here).
    connection.execute(sa.update(jobs).where(jobs.c.kind != 'finetune').values(queue=jobs.c.kind))
    for job_id, kind, params in connection.execute(
        sa.select(jobs.c.id, jobs.c.kind, jobs.c.params).where(jobs.c.kind == 'finetune')
    ).all():
        connection.execute(sa.update(jobs).where(jobs.c.id == job_id).values(queue=_queue_of(kind, params)))
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.alter_column('queue', existing_type=sa.String(length=32), nullable=False)
    with op.batch_alter_table('shards', schema=None) as batch_op:
        batch_op.create_index('ix_shards_job_status_index', ['job_id', 'status', 'index'], unique=False)


def downgrade() -> None:
    # Dispatched shards were waiting: queued again, they are sent as before this revision (all at once).
    shards = sa.table('shards', sa.column('status', sa.String))
    op.get_bind().execute(sa.update(shards).where(shards.c.status == 'dispatched').values(status='queued'))
    with op.batch_alter_table('shards', schema=None) as batch_op:
        batch_op.drop_index('ix_shards_job_status_index')
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('shards_ahead')
        batch_op.drop_column('queue')
    with op.batch_alter_table('tenants', schema=None) as batch_op:
        batch_op.drop_column('max_concurrent_finetunes')
        batch_op.drop_column('max_running_shards')
        batch_op.drop_column('weight')
