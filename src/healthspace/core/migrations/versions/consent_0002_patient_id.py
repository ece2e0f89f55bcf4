"""consent registry: each decision keeps the FHIR Patient id its person id derives from

Revision ID: consent_0002
Revises: consent_0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "consent_0002"
down_revision = "consent_0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("consent_decisions") as batch:
        batch.add_column(sa.Column("patient_id", sa.String(64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("consent_decisions") as batch:
        batch.drop_column("patient_id")
