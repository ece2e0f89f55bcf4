"""dsp: datasets, negotiations, agreements, transfers, outbox

Revision ID: dsp_0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "dsp_0001"
down_revision = None
branch_labels = ("dsp",)
depends_on = None

_TS = sa.DateTime(timezone=True)


def _process_columns() -> list[sa.Column[object]]:
    return [
        sa.Column("id", sa.String(200), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("provider_pid", sa.String(200), nullable=True),
        sa.Column("consumer_pid", sa.String(200), nullable=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("counterparty_id", sa.String(200), nullable=False),
        sa.Column("counterparty_address", sa.String(500), nullable=False),
    ]


def upgrade() -> None:
    op.create_table(
        "dsp_datasets",
        sa.Column("id", sa.String(200), nullable=False),
        sa.Column("title", sa.String(300), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("keywords", sa.JSON(), nullable=False),
        sa.Column("metadata_json", sa.JSON(), nullable=False),
        sa.Column("offer", sa.JSON(), nullable=False),
        sa.Column("approval", sa.String(16), nullable=False),
        sa.Column("created_at", _TS, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_dsp_datasets"),
    )
    op.create_table(
        "dsp_negotiations",
        *_process_columns(),
        sa.Column("dataset_id", sa.String(200), nullable=True),
        sa.Column("offer", sa.JSON(), nullable=False),
        sa.Column("agreement_id", sa.String(200), nullable=True),
        sa.Column("auto", sa.Boolean(), nullable=False),
        sa.Column("pending", sa.String(32), nullable=True),
        sa.Column("terminal_reason", sa.Text(), nullable=True),
        sa.Column("created_at", _TS, nullable=False),
        sa.Column("updated_at", _TS, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_dsp_negotiations"),
        sa.UniqueConstraint("role", "counterparty_id", "consumer_pid", name="uq_dsp_negotiations_peer_cpid"),
    )
    for col in ("provider_pid", "consumer_pid", "state", "pending"):
        op.create_index(f"ix_dsp_negotiations_{col}", "dsp_negotiations", [col])
    op.create_table(
        "dsp_agreements",
        sa.Column("id", sa.String(200), nullable=False),
        sa.Column("negotiation_id", sa.String(200), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("provider_id", sa.String(200), nullable=False),
        sa.Column("consumer_id", sa.String(200), nullable=False),
        sa.Column("dataset_id", sa.String(200), nullable=False),
        sa.Column("policy", sa.JSON(), nullable=False),
        sa.Column("signed_at", _TS, nullable=False),
        sa.Column("retired_at", _TS, nullable=True),
        sa.Column("retired_reason", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_dsp_agreements"),
    )
    op.create_index("ix_dsp_agreements_negotiation_id", "dsp_agreements", ["negotiation_id"])
    op.create_table(
        "dsp_transfers",
        *_process_columns(),
        sa.Column("agreement_id", sa.String(200), nullable=False),
        sa.Column("format", sa.String(100), nullable=False),
        sa.Column("data_address", sa.JSON(), nullable=True),
        sa.Column("auto", sa.Boolean(), nullable=False),
        sa.Column("pending", sa.String(32), nullable=True),
        sa.Column("terminal_reason", sa.Text(), nullable=True),
        sa.Column("created_at", _TS, nullable=False),
        sa.Column("updated_at", _TS, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_dsp_transfers"),
        sa.UniqueConstraint("role", "counterparty_id", "consumer_pid", name="uq_dsp_transfers_peer_cpid"),
    )
    for col in ("provider_pid", "consumer_pid", "state", "agreement_id", "pending"):
        op.create_index(f"ix_dsp_transfers_{col}", "dsp_transfers", [col])
    op.create_table(
        "dsp_outbox",
        sa.Column("seq", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("process_id", sa.String(200), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("peer_id", sa.String(200), nullable=False),
        sa.Column("url", sa.String(600), nullable=False),
        sa.Column("message_type", sa.String(64), nullable=False),
        sa.Column("body", sa.Text(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_at", _TS, nullable=False),
        sa.Column("lease_until", _TS, nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("created_at", _TS, nullable=False),
        sa.PrimaryKeyConstraint("seq", name="pk_dsp_outbox"),
    )
    op.create_index("ix_dsp_outbox_process_id", "dsp_outbox", ["process_id"])
    op.create_index("ix_dsp_outbox_status", "dsp_outbox", ["status"])


def downgrade() -> None:
    op.drop_table("dsp_outbox")
    op.drop_table("dsp_transfers")
    op.drop_table("dsp_agreements")
    op.drop_table("dsp_negotiations")
    op.drop_table("dsp_datasets")
