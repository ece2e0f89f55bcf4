"""authority: published data standards

Revision ID: authority_0003
Revises: authority_0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "authority_0003"
down_revision = "authority_0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "standards",
        sa.Column("id", sa.String(100), nullable=False),
        sa.Column("version", sa.String(50), nullable=False),
        sa.Column("title", sa.String(300), nullable=False),
        sa.Column("document", sa.JSON, nullable=False),
        sa.Column("published_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("published_by", sa.String(200), nullable=False),
        sa.PrimaryKeyConstraint("id", "version", name="pk_standards"),
    )


def downgrade() -> None:
    op.drop_table("standards")
