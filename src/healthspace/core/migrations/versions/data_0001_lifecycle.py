"""clinical data: dataset lifecycle, signed ingest provenance, destruction certificates

Revision ID: data_0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from healthspace.core.db import UtcDateTime

revision = "data_0001"
down_revision = None
branch_labels = ("data",)
depends_on = None


def upgrade() -> None:
    op.create_table(
        "data_datasets",
        sa.Column("dataset_id", sa.String(100), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("key_id", sa.String(128), nullable=False),
        sa.Column("created_at", UtcDateTime(), nullable=False),
        sa.Column("updated_at", UtcDateTime(), nullable=False),
        sa.Column("updated_by", sa.String(256), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("archived_at", UtcDateTime(), nullable=True),
        sa.Column("retain_until", UtcDateTime(), nullable=True),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("dataset_id", name="pk_data_datasets"),
    )
    op.create_table(
        "data_provenance",
        sa.Column("batch_id", sa.String(100), nullable=False),
        sa.Column("dataset_id", sa.String(100), nullable=False),
        sa.Column("recorded_at", UtcDateTime(), nullable=False),
        sa.Column("record", sa.Text(), nullable=False),
        sa.Column("signature", sa.String(128), nullable=False),
        sa.Column("key_id", sa.String(64), nullable=False),
        sa.Column("public_key", sa.String(64), nullable=False),
        sa.PrimaryKeyConstraint("batch_id", name="pk_data_provenance"),
    )
    op.create_index("ix_data_provenance_dataset_id", "data_provenance", ["dataset_id"])
    op.create_table(
        "data_destruction_certificates",
        sa.Column("dataset_id", sa.String(100), nullable=False),
        sa.Column("destroyed_at", UtcDateTime(), nullable=False),
        sa.Column("certificate", sa.Text(), nullable=False),
        sa.Column("signature", sa.String(128), nullable=False),
        sa.Column("key_id", sa.String(64), nullable=False),
        sa.Column("public_key", sa.String(64), nullable=False),
        sa.PrimaryKeyConstraint("dataset_id", name="pk_data_destruction_certificates"),
    )


def downgrade() -> None:
    op.drop_table("data_destruction_certificates")
    op.drop_index("ix_data_provenance_dataset_id", table_name="data_provenance")
    op.drop_table("data_provenance")
    op.drop_table("data_datasets")
