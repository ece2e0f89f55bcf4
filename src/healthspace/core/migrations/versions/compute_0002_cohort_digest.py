"""compute: each remembered person set keeps a digest of its ids, read with its size and time by one index

Revision ID: compute_0002
Revises: compute_0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "compute_0002"
down_revision = "compute_0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Nullable: sets stored before keep no digest and are compared by their ids (no data rewrite).
    with op.batch_alter_table("compute_cohort_history") as batch:
        batch.add_column(sa.Column("digest", sa.LargeBinary(32), nullable=True))
    op.drop_index("ix_compute_cohort_history_dataset_size", table_name="compute_cohort_history")
    op.create_index(
        "ix_compute_cohort_history_near",
        "compute_cohort_history",
        ["dataset_id", "size", "recorded_at", "digest"],
    )


def downgrade() -> None:
    op.drop_index("ix_compute_cohort_history_near", table_name="compute_cohort_history")
    op.create_index(
        "ix_compute_cohort_history_dataset_size", "compute_cohort_history", ["dataset_id", "size"]
    )
    with op.batch_alter_table("compute_cohort_history") as batch:
        batch.drop_column("digest")
