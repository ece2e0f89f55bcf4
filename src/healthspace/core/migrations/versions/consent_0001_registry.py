"""consent registry: append-only decisions and per-patient receipt chains

Revision ID: consent_0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from healthspace.core.db import UtcDateTime

revision = "consent_0001"
down_revision = None
branch_labels = ("consent",)
depends_on = None

_SEQ = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "consent_decisions",
        sa.Column("seq", _SEQ, primary_key=True, autoincrement=True),
        sa.Column("decision_id", sa.String(64), nullable=False),
        sa.Column("fhir_id", sa.String(64), nullable=True),
        sa.Column("person_id", sa.BigInteger(), nullable=False),
        sa.Column("scenario_id", sa.String(200), nullable=False),
        sa.Column("decision", sa.String(8), nullable=False),
        sa.Column("decided_at", UtcDateTime(), nullable=False),
        sa.Column("valid_from", UtcDateTime(), nullable=False),
        sa.Column("valid_until", UtcDateTime(), nullable=True),
        sa.Column("class_mask", sa.Integer(), nullable=True),
        sa.Column("recorded_at", UtcDateTime(), nullable=False),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("actor", sa.String(256), nullable=False),
        sa.PrimaryKeyConstraint("seq", name="pk_consent_decisions"),
        sa.UniqueConstraint("decision_id", name="uq_consent_decisions_decision_id"),
        sa.UniqueConstraint("fhir_id", name="uq_consent_decisions_fhir_id"),
        sa.CheckConstraint("decision IN ('permit', 'deny')", name="ck_consent_decisions_decision"),
    )
    op.create_index("ix_consent_decisions_scenario_person", "consent_decisions", ["scenario_id", "person_id"])
    op.create_index("ix_consent_decisions_person", "consent_decisions", ["person_id"])
    op.create_table(
        "consent_receipts",
        sa.Column("receipt_id", sa.String(64), nullable=False),
        sa.Column("person_id", sa.BigInteger(), nullable=False),
        sa.Column("chain_seq", sa.Integer(), nullable=False),
        sa.Column("decision_id", sa.String(64), nullable=False),
        sa.Column("document", sa.Text(), nullable=False),
        sa.Column("digest", sa.String(64), nullable=False),
        sa.Column("issued_at", UtcDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("receipt_id", name="pk_consent_receipts"),
        sa.UniqueConstraint("person_id", "chain_seq", name="uq_consent_receipts_person_id"),
    )


def downgrade() -> None:
    op.drop_table("consent_receipts")
    op.drop_index("ix_consent_decisions_person", table_name="consent_decisions")
    op.drop_index("ix_consent_decisions_scenario_person", table_name="consent_decisions")
    op.drop_table("consent_decisions")
