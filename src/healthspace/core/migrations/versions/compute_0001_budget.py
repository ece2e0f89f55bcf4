"""compute: privacy budget ledger and recent-cohort memory

Revision ID: compute_0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from healthspace.core.db import UtcDateTime

revision = "compute_0001"
down_revision = None
branch_labels = ("compute",)
depends_on = None

_SEQ = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "compute_budget_accounts",
        sa.Column("consumer_id", sa.String(256), nullable=False),
        sa.Column("scenario_id", sa.String(200), nullable=False),
        sa.Column("dataset_id", sa.String(200), nullable=False),
        sa.Column("spent_micro", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", UtcDateTime(), nullable=False),
        sa.PrimaryKeyConstraint(
            "consumer_id", "scenario_id", "dataset_id", name="pk_compute_budget_accounts"
        ),
    )
    op.create_table(
        "compute_budget_spends",
        sa.Column("job_id", sa.String(128), nullable=False),
        sa.Column("consumer_id", sa.String(256), nullable=False),
        sa.Column("scenario_id", sa.String(200), nullable=False),
        sa.Column("dataset_id", sa.String(200), nullable=False),
        sa.Column("epsilon_micro", sa.BigInteger(), nullable=False),
        sa.Column("spent_at", UtcDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("job_id", name="pk_compute_budget_spends"),
    )
    op.create_table(
        "compute_cohort_history",
        sa.Column("seq", _SEQ, primary_key=True, autoincrement=True),
        sa.Column("dataset_id", sa.String(200), nullable=False),
        sa.Column("consumer_id", sa.String(256), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("ids", sa.LargeBinary(), nullable=False),
        sa.Column("recorded_at", UtcDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("seq", name="pk_compute_cohort_history"),
    )
    op.create_index(
        "ix_compute_cohort_history_dataset_size", "compute_cohort_history", ["dataset_id", "size"]
    )


def downgrade() -> None:
    op.drop_index("ix_compute_cohort_history_dataset_size", table_name="compute_cohort_history")
    op.drop_table("compute_cohort_history")
    op.drop_table("compute_budget_spends")
    op.drop_table("compute_budget_accounts")
