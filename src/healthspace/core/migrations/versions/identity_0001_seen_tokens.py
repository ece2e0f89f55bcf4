"""identity: request tokens already seen (replay guard)

Revision ID: identity_0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "identity_0001"
down_revision = None
branch_labels = ("identity",)
depends_on = None


def upgrade() -> None:
    op.create_table(
        "identity_seen_tokens",
        sa.Column("issuer", sa.String(64), nullable=False),
        sa.Column("token_id", sa.String(64), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("issuer", "token_id", name="pk_identity_seen_tokens"),
    )
    op.create_index("ix_identity_seen_tokens_expires_at", "identity_seen_tokens", ["expires_at"])


def downgrade() -> None:
    op.drop_index("ix_identity_seen_tokens_expires_at", table_name="identity_seen_tokens")
    op.drop_table("identity_seen_tokens")
