"""Engine and session factories for SQLite (aiosqlite) and PostgreSQL (psycopg 3); programmatic migrations.

SQLite locking: the ``sqlite3`` module behind aiosqlite normally issues a deferred ``BEGIN`` itself. We switch
that off (``isolation_level = None`` on the raw connection at connect time) and emit the ``BEGIN`` ourselves
from SQLAlchemy's ``begin`` event: ``BEGIN IMMEDIATE`` for sessions from ``make_sessionmaker`` (the writer
lock is taken at the start of the transaction, so audit sequence numbers and job claims are linearised, and a
transaction that read first can never fail to upgrade to a writer with SQLITE_BUSY), plain deferred ``BEGIN``
for ``make_read_sessionmaker`` (readers never block the writer under WAL). ``busy_timeout`` makes a second
writer wait instead of failing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.migration import MigrationContext
from sqlalchemy import Connection, event
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from service.db.roles import AppRoleError, AppRoleGrants, apply_app_role_grants, check_app_role, checked_role

SQLITE_BUSY_TIMEOUT_MS = 30_000
_BEGIN_OPTION = "carecanvas_sqlite_begin"
_MIGRATIONS = Path(__file__).with_name("migrations")


def normalise_url(url: str) -> str:
    """Pick the async driver for a plain ``sqlite://`` or ``postgresql://`` URL."""
    parsed = make_url(url)
    if parsed.drivername in ("sqlite", "sqlite+aiosqlite"):
        return parsed.set(drivername="sqlite+aiosqlite").render_as_string(hide_password=False)
    if parsed.drivername in ("postgresql", "postgres", "postgresql+psycopg"):
        return parsed.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)
    raise ValueError("database URL must be sqlite:// (aiosqlite) or postgresql:// (psycopg)")


def make_engine(url: str, **engine_options: Any) -> AsyncEngine:
    """An async engine: SQLite with WAL, foreign keys and busy_timeout; PostgreSQL through psycopg 3."""
    url = normalise_url(url)
    if url.startswith("sqlite"):
        engine = create_async_engine(url, **engine_options)
        _configure_sqlite(engine)
        return engine
    engine_options.setdefault("pool_pre_ping", True)
    return create_async_engine(url, **engine_options)


def _configure_sqlite(engine: AsyncEngine) -> None:
    @event.listens_for(engine.sync_engine, "connect")
    def on_connect(dbapi_connection: Any, _record: Any) -> None:
        # We emit BEGIN ourselves (see the module docstring), so the driver must not.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def on_begin(connection: Connection) -> None:
        mode = connection.get_execution_options().get(_BEGIN_OPTION, "IMMEDIATE")
        connection.exec_driver_sql("BEGIN" if mode == "DEFERRED" else "BEGIN IMMEDIATE")


def make_sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    """Sessions for work that may write (on SQLite each transaction holds the writer lock from its start)."""
    return async_sessionmaker(engine, expire_on_commit=False)


def make_read_sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    """Sessions for read-only work (on SQLite a deferred transaction that does not block writers)."""
    reader = engine.execution_options(**{_BEGIN_OPTION: "DEFERRED"})
    return async_sessionmaker(reader, expire_on_commit=False)


@dataclass(frozen=True)
class MigrationReport:
    """Where ``migrate`` left the database: the revision, and the app role's grants when one was named."""

    revision: str | None
    app_role: AppRoleGrants | None


def alembic_config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(_MIGRATIONS))
    return config


async def migrate(url: str, *, app_role: str | None = None, revision: str = "head") -> MigrationReport:
    """Run Alembic ``upgrade`` to ``revision`` as the connecting (owner) role, then grant ``app_role``.

    ``app_role`` (PostgreSQL only; the role must exist and must not be, or be a member of, the owner): the
    application's login role. After the upgrade, in the same transaction, it gets SELECT/INSERT/UPDATE/DELETE
    on the working tables, only SELECT and INSERT on ``audit_records`` and SELECT on ``alembic_version``;
    every other privilege it held on them is revoked (see ``service.db.roles``). A refused role gets nothing.
    """
    if app_role is not None:
        checked_role(app_role)
    engine = make_engine(url)
    try:
        if app_role is not None and engine.dialect.name != "postgresql":
            raise AppRoleError("--app-role applies to PostgreSQL only (SQLite has no roles)")
        async with engine.begin() as connection:
            if app_role is not None:
                await connection.run_sync(check_app_role, app_role)  # refuse before creating anything
            await connection.run_sync(_upgrade, alembic_config(), revision)
            grants = None if app_role is None else await connection.run_sync(apply_app_role_grants, app_role)
            current = await connection.run_sync(_current_revision)
    finally:
        await engine.dispose()
    return MigrationReport(revision=current, app_role=grants)


def _upgrade(connection: Connection, config: Config, revision: str) -> None:
    config.attributes["connection"] = connection
    command.upgrade(config, revision)


def _current_revision(connection: Connection) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()


async def grant_app_role(url: str, role: str) -> AppRoleGrants:
    """Apply the application-role grants on an already migrated PostgreSQL database (as the owner)."""
    checked_role(role)
    engine = make_engine(url)
    try:
        if engine.dialect.name != "postgresql":
            raise AppRoleError("application-role grants exist only on PostgreSQL")
        async with engine.begin() as connection:
            return await connection.run_sync(apply_app_role_grants, role)
    finally:
        await engine.dispose()
