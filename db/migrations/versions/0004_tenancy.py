"""tenancy: tenant namespaces, model owners, key expiry, idempotent requests

Existing tenants get a namespace slug derived from their name; fine-tuned versions that exist already become
the property of the tenant whose job made them (they keep their names, so refs stored in that tenant's jobs,
batches and aliases keep resolving for it, and disappear from everyone else's view).

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30 20:45:00
"""

import re
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0004'
down_revision: str | None = '0003'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _slug(name: str) -> str:
    # The same rule as db.tenants.namespace_for, frozen here: a migration must not change when that code does.
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:40].strip("-")
    return slug or "tenant"


def upgrade() -> None:
    with op.batch_alter_table('tenants', schema=None) as batch_op:
        batch_op.add_column(sa.Column('namespace', sa.String(length=40), nullable=True))
    connection = op.get_bind()
    taken: set[str] = set()
    for tenant_id, name in connection.execute(sa.text("SELECT id, name FROM tenants ORDER BY id")).all():
        slug, number = _slug(name), 1
        while slug in taken:  # "Acme" and "acme" make one slug; a numbered one may be taken too ("acme-2")
            number += 1
            slug = f"{_slug(name)[:34]}-{number}"
        taken.add(slug)
        connection.execute(sa.text("UPDATE tenants SET namespace = :slug WHERE id = :id"), {"slug": slug, "id": tenant_id})
    with op.batch_alter_table('tenants', schema=None) as batch_op:
        batch_op.alter_column('namespace', existing_type=sa.String(length=40), nullable=False)
        batch_op.create_unique_constraint(batch_op.f('uq_tenants_namespace'), ['namespace'])

    with op.batch_alter_table('api_keys', schema=None) as batch_op:
        batch_op.add_column(sa.Column('expires_at', sa.DateTime(timezone=True), nullable=True))

    with op.batch_alter_table('model_versions', schema=None) as batch_op:
        batch_op.add_column(sa.Column('owner_tenant_id', sa.Integer(), nullable=True))
        batch_op.create_index(batch_op.f('ix_model_versions_owner_tenant_id'), ['owner_tenant_id'], unique=False)
        batch_op.create_foreign_key(
            batch_op.f('fk_model_versions_owner_tenant_id_tenants'), 'tenants', ['owner_tenant_id'], ['id'],
            ondelete='CASCADE',
        )
    connection.execute(
        sa.text(
            "UPDATE model_versions SET owner_tenant_id = "
            "(SELECT jobs.tenant_id FROM jobs WHERE jobs.id = model_versions.job_id) "
            "WHERE job_id IS NOT NULL"
        )
    )

    op.create_table(
        'idempotent_requests',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('tenant_id', sa.Integer(), nullable=False),
        sa.Column('key', sa.String(length=255), nullable=False),
        sa.Column('endpoint', sa.String(length=64), nullable=False),
        sa.Column('request_sha256', sa.String(length=64), nullable=False),
        sa.Column('status_code', sa.Integer(), nullable=True),
        sa.Column('response', sa.JSON(none_as_null=True), nullable=True),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ['tenant_id'], ['tenants.id'], name=op.f('fk_idempotent_requests_tenant_id_tenants'), ondelete='CASCADE'
        ),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_idempotent_requests')),
        sa.UniqueConstraint('tenant_id', 'key', name='uq_idempotent_requests_tenant_key'),
    )
    with op.batch_alter_table('idempotent_requests', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_idempotent_requests_created_at'), ['created_at'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('idempotent_requests', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_idempotent_requests_created_at'))
    op.drop_table('idempotent_requests')
    with op.batch_alter_table('model_versions', schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f('fk_model_versions_owner_tenant_id_tenants'), type_='foreignkey')
        batch_op.drop_index(batch_op.f('ix_model_versions_owner_tenant_id'))
        batch_op.drop_column('owner_tenant_id')
    with op.batch_alter_table('api_keys', schema=None) as batch_op:
        batch_op.drop_column('expires_at')
    with op.batch_alter_table('tenants', schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f('uq_tenants_namespace'), type_='unique')
        batch_op.drop_column('namespace')
