"""jobs: token refreshes, the output-review airlock and persistent GLM sessions

Revision ID: jobs_0002
Revises: jobs_0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from healthspace.core.db import UtcDateTime

revision = "jobs_0002"
down_revision = "jobs_0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "dataplane_token_refreshes",
        sa.Column("jti", sa.String(64), nullable=False),
        sa.Column("transfer_id", sa.String(256), nullable=False),
        sa.Column("expires_at", UtcDateTime(), nullable=False),
        sa.Column("refreshed_at", UtcDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("jti", name="pk_dataplane_token_refreshes"),
    )
    op.create_index("ix_dataplane_token_refreshes_expires_at", "dataplane_token_refreshes", ["expires_at"])
    op.create_table(
        "dataplane_reviews",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("job_id", sa.String(64), nullable=False),
        sa.Column("agreement_id", sa.String(256), nullable=False),
        sa.Column("consumer_id", sa.String(256), nullable=False),
        sa.Column("scenario_id", sa.String(200), nullable=False),
        sa.Column("dataset_id", sa.String(200), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("required", sa.Integer(), nullable=False),
        sa.Column("result", sa.Text(), nullable=False),
        sa.Column("epsilon", sa.Float(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("decided_by", sa.String(256), nullable=True),
        sa.Column("created_at", UtcDateTime(), nullable=False),
        sa.Column("updated_at", UtcDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_dataplane_reviews"),
        sa.ForeignKeyConstraint(
            ["job_id"], ["dataplane_jobs.id"], name="fk_dataplane_reviews_job_id_dataplane_jobs"
        ),
        sa.UniqueConstraint("job_id", name="uq_dataplane_reviews_job_id"),
    )
    op.create_index("ix_dataplane_reviews_state", "dataplane_reviews", ["state"])
    op.create_table(
        "dataplane_review_approvals",
        sa.Column("review_id", sa.String(64), nullable=False),
        sa.Column("reviewer", sa.String(256), nullable=False),
        sa.Column("label", sa.String(200), nullable=False),
        sa.Column("approved_at", UtcDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("review_id", "reviewer", name="pk_dataplane_review_approvals"),
        sa.ForeignKeyConstraint(
            ["review_id"],
            ["dataplane_reviews.id"],
            name="fk_dataplane_review_approvals_review_id_dataplane_reviews",
        ),
    )
    op.create_table(
        "dataplane_glm_sessions",
        sa.Column("job_id", sa.String(64), nullable=False),
        sa.Column("analyses", sa.Text(), nullable=False),
        sa.Column("iterations", sa.Integer(), nullable=False),
        sa.Column("max_iterations", sa.Integer(), nullable=False),
        sa.Column("last_beta", sa.Text(), nullable=True),
        sa.Column("opened_at", UtcDateTime(), nullable=False),
        sa.Column("updated_at", UtcDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("job_id", name="pk_dataplane_glm_sessions"),
        sa.ForeignKeyConstraint(
            ["job_id"], ["dataplane_jobs.id"], name="fk_dataplane_glm_sessions_job_id_dataplane_jobs"
        ),
    )


def downgrade() -> None:
    op.drop_table("dataplane_glm_sessions")
    op.drop_table("dataplane_review_approvals")
    op.drop_index("ix_dataplane_reviews_state", table_name="dataplane_reviews")
    op.drop_table("dataplane_reviews")
    op.drop_index("ix_dataplane_token_refreshes_expires_at", table_name="dataplane_token_refreshes")
    op.drop_table("dataplane_token_refreshes")
