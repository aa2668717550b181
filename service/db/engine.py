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

import re
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import (
    AsyncConnection,
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

SQLITE_BUSY_TIMEOUT_MS = 30_000
_BEGIN_OPTION = "carecanvas_sqlite_begin"
_MIGRATIONS = Path(__file__).with_name("migrations")
_ROLE_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


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


def is_sqlite(bind: AsyncEngine | AsyncConnection | AsyncSession | Connection) -> bool:
    if isinstance(bind, AsyncSession):
        active = bind.get_bind()
        return active.dialect.name == "sqlite"
    return bind.dialect.name == "sqlite"


def alembic_config(*, app_role: str | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(_MIGRATIONS))
    config.attributes["app_role"] = _checked_role(app_role) if app_role else None
    return config


async def migrate(url: str, *, app_role: str | None = None, revision: str = "head") -> None:
    """Run Alembic ``upgrade`` to ``revision``.

    ``app_role`` (PostgreSQL only; the role must exist): the application's login role. The initial migration
    then grants it read/write on the working tables, but on ``audit_records`` only SELECT, INSERT and
    UPDATE of the ``sealed`` column (for key rotation, which the trigger limits to re-wrapping), with UPDATE,
    DELETE and TRUNCATE revoked. For a role added after the initial migration call ``grant_app_role``.
    """
    engine = make_engine(url)
    config = alembic_config(app_role=app_role)
    try:
        async with engine.begin() as connection:
            await connection.run_sync(_upgrade, config, revision)
    finally:
        await engine.dispose()


def _upgrade(connection: Connection, config: Config, revision: str) -> None:
    config.attributes["connection"] = connection
    command.upgrade(config, revision)


def _checked_role(role: str) -> str:
    if not _ROLE_NAME.match(role):
        raise ValueError("app role must be a lower-case PostgreSQL identifier ([a-z_][a-z0-9_]*, ≤63 chars)")
    return role


def app_role_grant_statements(role: str) -> list[str]:
    """The GRANT/REVOKE statements that make ``role`` an application role (audit table insert-only)."""
    quoted = f'"{_checked_role(role)}"'
    return [
        f"GRANT USAGE ON SCHEMA {{schema}} TO {quoted}",
        f"GRANT SELECT, INSERT, UPDATE, DELETE ON web_sessions, jobs, artifacts, documents TO {quoted}",
        f"GRANT SELECT ON alembic_version TO {quoted}",
        f"REVOKE ALL ON audit_records FROM {quoted}",
        "REVOKE UPDATE, DELETE, TRUNCATE ON audit_records FROM PUBLIC",
        f"GRANT SELECT, INSERT ON audit_records TO {quoted}",
        f"GRANT UPDATE (sealed) ON audit_records TO {quoted}",
    ]


def apply_app_role_grants(connection: Connection, role: str) -> None:
    """Run ``app_role_grant_statements`` in the current schema (migration and ``grant_app_role``)."""
    schema = connection.execute(text("SELECT current_schema()")).scalar_one()
    quoted_schema = '"' + str(schema).replace('"', '""') + '"'
    for statement in app_role_grant_statements(role):
        connection.exec_driver_sql(statement.replace("{schema}", quoted_schema))


async def grant_app_role(url: str, role: str) -> None:
    """Apply the application-role grants on an already migrated PostgreSQL database."""
    engine = make_engine(url)
    try:
        if engine.dialect.name != "postgresql":
            raise ValueError("application-role grants exist only on PostgreSQL")
        async with engine.begin() as connection:
            await connection.run_sync(apply_app_role_grants, role)
    finally:
        await engine.dispose()
