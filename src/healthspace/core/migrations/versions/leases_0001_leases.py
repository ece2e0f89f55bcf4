"""leases: named, expiring leases (process liveness, duties one process does for all)

Revision ID: leases_0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from healthspace.core.db import UtcDateTime

revision = "leases_0001"
down_revision = None
branch_labels = ("leases",)
depends_on = None


def upgrade() -> None:
    op.create_table(
        "leases",
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("holder", sa.String(200), nullable=False),
        sa.Column("acquired_at", UtcDateTime(), nullable=False),
        sa.Column("expires_at", UtcDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_leases"),
    )


def downgrade() -> None:
    op.drop_table("leases")
