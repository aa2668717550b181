"""Migrations from empty on SQLite and PostgreSQL, schema matches the models, engine settings, app role."""

from __future__ import annotations

import secrets

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from service.db.engine import grant_app_role, make_engine, make_read_sessionmaker, migrate, normalise_url
from service.db.models import Base

POSTGRES_SERVER_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


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
    assert version == "0001_initial"
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


@pytest.mark.postgres
async def test_app_role_can_insert_but_not_change_audit_records():
    role = f"cc_app_{secrets.token_hex(4)}"
    schema = f"cc_test_{secrets.token_hex(6)}"
    admin = make_engine(POSTGRES_SERVER_URL)
    url = f"{POSTGRES_SERVER_URL}?options=-csearch_path%3D{schema}"
    try:
        async with admin.begin() as connection:
            await connection.execute(text(f'CREATE ROLE "{role}"'))
            await connection.execute(text(f'CREATE SCHEMA "{schema}"'))
        await migrate(url, app_role=role)
        await grant_app_role(url, role)  # idempotent re-application
        engine = make_engine(url)
        insert = text(
            "INSERT INTO audit_records (seq, recorded_at, action, outcome, sealed, prev_hash, hash) "
            "VALUES (1, now(), 'view', 'success', 'x', :h, :h)"
        )
        try:
            async with engine.begin() as connection:
                await connection.execute(text(f'SET LOCAL ROLE "{role}"'))
                await connection.execute(insert, {"h": "0" * 64})
                await connection.execute(text("SELECT count(*) FROM jobs"))
            for statement in (
                "UPDATE audit_records SET action = 'x'",
                "DELETE FROM audit_records",
                "TRUNCATE audit_records",
            ):
                async with engine.begin() as connection:
                    await connection.execute(text(f'SET LOCAL ROLE "{role}"'))
                    with pytest.raises(DBAPIError, match="permission denied"):
                        await connection.execute(text(statement))
                    await connection.rollback()
        finally:
            await engine.dispose()
        with pytest.raises(ValueError, match="lower-case PostgreSQL identifier"):
            await migrate(url, app_role='x"; DROP TABLE jobs; --')
    finally:
        async with admin.begin() as connection:
            await connection.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
            await connection.execute(text(f'DROP OWNED BY "{role}"'))
            await connection.execute(text(f'DROP ROLE IF EXISTS "{role}"'))
        await admin.dispose()
