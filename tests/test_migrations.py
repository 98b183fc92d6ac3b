"""The Alembic migrations build exactly the schema the models describe, on SQLite and PostgreSQL."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlmodel import SQLModel

import controller.store.models  # noqa: F401  (registers the tables)
from controller.store.db import create_db_engine, migrate


def test_migrations_match_the_models(database_url: str):
    engine = create_db_engine(database_url)
    try:
        migrate(engine)
        migrate(engine)  # idempotent at start-up
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            differences = compare_metadata(context, SQLModel.metadata)
    finally:
        engine.dispose()
    assert differences == []
