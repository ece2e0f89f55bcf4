"""The migrations build exactly the tables the models declare, on both backends."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from healthspace.authority.app import BRANCHES as AUTHORITY_BRANCHES
from healthspace.connector.app import BRANCHES as CONNECTOR_BRANCHES
from healthspace.core.db import Base, Database


def test_every_branch_migrated_matches_the_models(db_url: str) -> None:
    # Importing both apps imports every table module, so `Base.metadata` holds every model.
    db = Database(db_url, branches=sorted({*CONNECTOR_BRANCHES, *AUTHORITY_BRANCHES}))
    try:
        with db.engine.connect() as conn:
            assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
    finally:
        db.dispose()
