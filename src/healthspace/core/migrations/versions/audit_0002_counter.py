"""audit log: the next index, in the database, so several processes can append

Revision ID: audit_0002
Revises: audit_0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "audit_0002"
down_revision = "audit_0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "audit_counter",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("next_seq", sa.BigInteger(), nullable=False),
        sa.CheckConstraint("id = 1", name="ck_audit_counter_one_row"),
        sa.PrimaryKeyConstraint("id", name="pk_audit_counter"),
    )
    # A log that already has entries continues after them.
    op.execute(
        "INSERT INTO audit_counter (id, next_seq) SELECT 1, COALESCE(MAX(seq) + 1, 0) FROM audit_entries"
    )


def downgrade() -> None:
    op.drop_table("audit_counter")
