"""Migrations from empty on SQLite and PostgreSQL, schema matches the models, engine settings."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import text

from service.db.engine import alembic_config, make_engine, make_read_sessionmaker, migrate, normalise_url
from service.db.models import Base

HEAD = ScriptDirectory.from_config(alembic_config()).get_current_head()


async def test_migrate_from_empty_matches_models(db_url):
    await migrate(db_url)
    await migrate(db_url)  # a second run is a no-op
    engine = make_engine(db_url)
    try:
        async with engine.connect() as connection:
            version = (await connection.execute(text("SELECT version_num FROM alembic_version"))).scalar_one()
            differences = await connection.run_sync(
                lambda sync: compare_metadata(MigrationContext.configure(sync), Base.metadata)
            )
    finally:
        await engine.dispose()
    assert version == HEAD
    assert differences == []


async def test_sqlite_engine_settings(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'x.db'}")
    try:
        async with engine.connect() as connection:
            pragmas = [
                (await connection.execute(text(f"PRAGMA {name}"))).scalar_one()
                for name in ("journal_mode", "foreign_keys", "busy_timeout")
            ]
        reader = make_read_sessionmaker(engine)
        async with reader() as session, session.begin():
            assert (await session.execute(text("SELECT 1"))).scalar_one() == 1
    finally:
        await engine.dispose()
    assert pragmas == ["wal", 1, 30000]


def test_url_normalisation():
    assert normalise_url("sqlite:///a.db") == "sqlite+aiosqlite:///a.db"
    assert normalise_url("postgresql://u@h/db").startswith("postgresql+psycopg://")
    with pytest.raises(ValueError, match="must be sqlite"):
        normalise_url("mysql://u@h/db")
