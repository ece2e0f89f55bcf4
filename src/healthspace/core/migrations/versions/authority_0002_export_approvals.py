"""authority registry: export approvals for cross-border transfers

Revision ID: authority_0002
Revises: authority_0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "authority_0002"
down_revision = "authority_0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "export_approvals",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("provider_id", sa.String(64), nullable=False),
        sa.Column("dataset_id", sa.String(200), nullable=False),
        sa.Column("consumer_id", sa.String(64), nullable=False),
        sa.Column("scenario_id", sa.String(64), nullable=False),
        sa.Column("reference", sa.String(200), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("registered_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("registered_by", sa.String(200), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("revocation_reason", sa.Text, nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_export_approvals"),
    )
    op.create_index("ix_export_approvals_provider", "export_approvals", ["provider_id"])


def downgrade() -> None:
    op.drop_index("ix_export_approvals_provider", table_name="export_approvals")
    op.drop_table("export_approvals")
