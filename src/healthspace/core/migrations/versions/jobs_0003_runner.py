"""jobs: which connector process runs a job (several processes may serve one database)

Revision ID: jobs_0003
Revises: jobs_0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "jobs_0003"
down_revision = "jobs_0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Nullable: jobs from before this column were run by the one process there was.
    with op.batch_alter_table("dataplane_jobs") as batch:
        batch.add_column(sa.Column("runner", sa.String(200), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("dataplane_jobs") as batch:
        batch.drop_column("runner")
