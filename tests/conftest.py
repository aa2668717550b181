"""Shared database fixtures: storage tests run on SQLite (a temp file) and PostgreSQL (a fresh schema)."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from service.db.engine import make_engine, make_sessionmaker, migrate

POSTGRES_SERVER_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def postgres_schema_url(schema: str) -> str:
    """A URL whose connections use ``schema`` first on the search path (so parallel runs never collide)."""
    return f"{POSTGRES_SERVER_URL}?options=-csearch_path%3D{schema}"


@pytest.fixture(
    params=[
        pytest.param("sqlite", id="sqlite"),
        pytest.param("postgres", id="postgres", marks=pytest.mark.postgres),
    ]
)
async def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """URL of an empty database: a new SQLite file, or a new PostgreSQL schema dropped afterwards."""
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'carecanvas.db'}"
        return
    schema = f"cc_test_{secrets.token_hex(6)}"
    admin = make_engine(POSTGRES_SERVER_URL)
    try:
        async with admin.begin() as connection:
            await connection.execute(text(f'CREATE SCHEMA "{schema}"'))
        yield postgres_schema_url(schema)
    finally:
        async with admin.begin() as connection:
            await connection.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        await admin.dispose()


@pytest.fixture
async def engine(db_url: str) -> AsyncIterator[AsyncEngine]:
    """An engine on a database migrated to head."""
    await migrate(db_url)
    engine = make_engine(db_url)
    try:
        yield engine
    finally:
        await engine.dispose()


@pytest.fixture
def sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return make_sessionmaker(engine)
