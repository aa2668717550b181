"""Alembic environment: runs on the connection ``service.db.engine.migrate`` hands over, or its own engine."""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy import Connection

from service.db.engine import make_engine
from service.db.models import Base

config = context.config
target_metadata = Base.metadata


def run_on_connection(connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=target_metadata, compare_type=True)
    with context.begin_transaction():
        context.run_migrations()


async def run_with_own_engine(url: str) -> None:
    engine = make_engine(url)
    try:
        async with engine.begin() as connection:
            await connection.run_sync(run_on_connection)
    finally:
        await engine.dispose()


if context.is_offline_mode():
    raise SystemExit("offline (SQL script) migrations are not supported; use service.db.engine.migrate(url)")

shared_connection = config.attributes.get("connection")
if shared_connection is not None:
    run_on_connection(shared_connection)
else:
    # `alembic -x url=... upgrade head` from the command line.
    url = context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option("sqlalchemy.url")
    if not url:
        raise SystemExit("pass the database URL: alembic -x url=postgresql://... upgrade head")
    asyncio.run(run_with_own_engine(url))
