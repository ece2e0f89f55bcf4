"""authority registry: participants and usage scenarios

Revision ID: authority_0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "authority_0001"
down_revision = None
branch_labels = ("authority",)
depends_on = None


def upgrade() -> None:
    op.create_table(
        "participants",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("legal_name", sa.String(200), nullable=False),
        sa.Column("type", sa.String(32), nullable=False),
        sa.Column("jurisdiction", sa.String(16), nullable=False),
        sa.Column("roles", sa.JSON, nullable=False),
        sa.Column("public_key", sa.String(64), nullable=False),
        sa.Column("connector_url", sa.String(500), nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("credential_id", sa.String(64), nullable=False),
        sa.Column("credential_expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("onboarded_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("revocation_reason", sa.Text, nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_participants"),
        sa.UniqueConstraint("credential_id", name="uq_participants_credential_id"),
    )
    op.create_table(
        "scenarios",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("title", sa.String(200), nullable=False),
        sa.Column("description", sa.Text, nullable=False),
        sa.Column("purpose_code", sa.String(100), nullable=False),
        sa.Column("data_classes", sa.JSON, nullable=False),
        sa.Column("output_types", sa.JSON, nullable=False),
        sa.Column("approving_body", sa.String(200), nullable=False),
        sa.Column("approval_reference", sa.String(200), nullable=False),
        sa.Column("valid_from", sa.Date, nullable=False),
        sa.Column("valid_until", sa.Date, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("registered_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_scenarios"),
    )


def downgrade() -> None:
    op.drop_table("scenarios")
    op.drop_table("participants")
