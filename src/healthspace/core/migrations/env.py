"""Alembic environment: runs on the engine handed over in `config.attributes` (see core.db.migrate)."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Engine

from healthspace.core.db import Base

config = context.config
engine = config.attributes.get("engine")
if not isinstance(engine, Engine):
    raise RuntimeError("healthspace migrations run through healthspace.core.db.migrate(engine, branches)")

with engine.connect() as connection:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()
    connection.commit()
