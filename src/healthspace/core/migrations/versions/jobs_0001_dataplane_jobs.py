"""jobs: data-plane job records

Revision ID: jobs_0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from healthspace.core.db import UtcDateTime

revision = "jobs_0001"
down_revision = None
branch_labels = ("jobs",)
depends_on = None


def upgrade() -> None:
    op.create_table(
        "dataplane_jobs",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("agreement_id", sa.String(256), nullable=False),
        sa.Column("transfer_id", sa.String(256), nullable=False),
        sa.Column("consumer_id", sa.String(256), nullable=False),
        sa.Column("scenario_id", sa.String(200), nullable=False),
        sa.Column("dataset_id", sa.String(200), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("spec", sa.Text(), nullable=False),
        sa.Column("result", sa.Text(), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("epsilon", sa.Float(), nullable=False),
        sa.Column("created_at", UtcDateTime(), nullable=False),
        sa.Column("updated_at", UtcDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_dataplane_jobs"),
    )
    op.create_index("ix_dataplane_jobs_agreement_state", "dataplane_jobs", ["agreement_id", "state"])


def downgrade() -> None:
    op.drop_index("ix_dataplane_jobs_agreement_state", table_name="dataplane_jobs")
    op.drop_table("dataplane_jobs")
