"""Engine and session factories for SQLite (aiosqlite) and PostgreSQL (psycopg 3); programmatic migrations.

SQLite locking (docs/decisions/0001 and 0004): the ``sqlite3`` module behind aiosqlite normally issues a
deferred ``BEGIN`` itself. We switch that off (``isolation_level = None`` on the raw connection at connect
time) and emit the ``BEGIN`` ourselves from SQLAlchemy's ``begin`` event.

- Sessions from ``make_sessionmaker`` write: ``BEGIN IMMEDIATE`` takes the writer lock at the start of the
  transaction, so audit sequence numbers and job claims are linearised and a transaction that read first can
  never fail to upgrade to a writer with SQLITE_BUSY. The writer pool holds one connection: in one process,
  writers queue for it in order (woken at once when it comes back) instead of sleeping in SQLite's busy
  handler; ``busy_timeout`` still makes a writer in another process (a separate worker) wait, not fail.
- Sessions from ``make_read_sessionmaker`` only read: a pool of their own whose connections are
  ``query_only`` (a write there fails at once instead of trying to upgrade), plain deferred ``BEGIN``. Under
  WAL they read one consistent snapshot and never wait for, or block, the writer.

PostgreSQL: one pool; the read sessionmaker is the same engine (MVCC readers take no locks that matter).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.migration import MigrationContext
from sqlalchemy import Connection, Engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from service.db.roles import AppRoleError, AppRoleGrants, apply_app_role_grants, check_app_role, checked_role

SQLITE_BUSY_TIMEOUT_MS = 30_000
READ_POOL_SIZE = 10
_BEGIN_OPTION = "carecanvas_sqlite_begin"
_MIGRATIONS = Path(__file__).with_name("migrations")
# The read-only sibling of each SQLite writer engine, made on first use and disposed with the writer.
_READERS: weakref.WeakKeyDictionary[Engine, AsyncEngine] = weakref.WeakKeyDictionary()


def normalise_url(url: str) -> str:
    """Pick the async driver for a plain ``sqlite://`` or ``postgresql://`` URL."""
    parsed = make_url(url)
    if parsed.drivername in ("sqlite", "sqlite+aiosqlite"):
        return parsed.set(drivername="sqlite+aiosqlite").render_as_string(hide_password=False)
    if parsed.drivername in ("postgresql", "postgres", "postgresql+psycopg"):
        return parsed.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)
    raise ValueError("database URL must be sqlite:// (aiosqlite) or postgresql:// (psycopg)")


def make_engine(url: str, **engine_options: Any) -> AsyncEngine:
    """An async engine: SQLite (WAL, foreign keys, busy_timeout, one writer connection) or PostgreSQL."""
    url = normalise_url(url)
    if url.startswith("sqlite"):
        if _is_file_database(url):
            # One writer at a time is all SQLite allows; queueing in the pool wakes the next one at once.
            engine_options.setdefault("pool_size", 1)
            engine_options.setdefault("max_overflow", 0)
            engine_options.setdefault("pool_timeout", SQLITE_BUSY_TIMEOUT_MS / 1000)
        engine = create_async_engine(url, **engine_options)
        _configure_sqlite(engine, read_only=False)
        return engine
    engine_options.setdefault("pool_pre_ping", True)
    return create_async_engine(url, **engine_options)


def _is_file_database(url: str) -> bool:
    database = make_url(url).database or ""
    return database not in ("", ":memory:") and "mode=memory" not in url


def _configure_sqlite(engine: AsyncEngine, *, read_only: bool) -> None:
    @event.listens_for(engine.sync_engine, "connect")
    def on_connect(dbapi_connection: Any, _record: Any) -> None:
        # We emit BEGIN ourselves (see the module docstring), so the driver must not.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA synchronous=NORMAL")
        if read_only:
            cursor.execute("PRAGMA query_only=ON")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def on_begin(connection: Connection) -> None:
        deferred = read_only or connection.get_execution_options().get(_BEGIN_OPTION) == "DEFERRED"
        connection.exec_driver_sql("BEGIN" if deferred else "BEGIN IMMEDIATE")


def make_sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    """Sessions for work that may write (on SQLite each transaction holds the writer lock from its start)."""
    return async_sessionmaker(engine, expire_on_commit=False)


def read_engine(engine: AsyncEngine) -> AsyncEngine:
    """The engine read sessions use: on SQLite a read-only sibling pool (disposed with ``engine``)."""
    if engine.dialect.name != "sqlite" or not _is_file_database(str(engine.url)):
        return engine
    reader = _READERS.get(engine.sync_engine)
    if reader is None:
        # Connections are kept, not opened per burst: each aiosqlite connection starts a thread and runs
        # its PRAGMAs, which cost more than the read itself when overflow connections came and went.
        reader = create_async_engine(engine.url, pool_size=READ_POOL_SIZE, max_overflow=READ_POOL_SIZE)
        _configure_sqlite(reader, read_only=True)
        _READERS[engine.sync_engine] = reader
        event.listen(engine.sync_engine, "engine_disposed", _dispose_reader)
    return reader


def _dispose_reader(writer: Engine) -> None:
    # Runs inside AsyncEngine.dispose()'s greenlet, so the sync dispose may close aiosqlite connections.
    reader = _READERS.pop(writer, None)
    if reader is not None:
        reader.sync_engine.dispose()


def make_read_sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    """Sessions for read-only work: on SQLite they never take or wait for the writer lock; writes fail."""
    return async_sessionmaker(read_engine(engine), expire_on_commit=False)


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
