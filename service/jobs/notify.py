"""A doorbell across processes on PostgreSQL: NOTIFY when jobs are queued, LISTEN where a worker waits.

The transaction that queues jobs runs `NOTIFY carecanvas_jobs` (PostgreSQL delivers it at COMMIT, once per
transaction, and never for a rollback); a worker process keeps one connection of its own LISTENing and rings
its queue's doorbell on every notification, so an idle worker claims at once instead of at its next poll.
Losing the connection loses nothing but speed: the worker's poll still finds every job, and the listener
connects again with a growing pause. SQLite has no such channel: there a worker in another process polls.
"""

from __future__ import annotations

import asyncio
import contextlib

import psycopg
import structlog
from sqlalchemy import text
from sqlalchemy.engine import URL
from sqlalchemy.orm import Session

log = structlog.get_logger(__name__)

JOBS_CHANNEL = "carecanvas_jobs"
_RETRY_FIRST_SECONDS = 1.0
_RETRY_MAX_SECONDS = 30.0
_STOP_CHECK_SECONDS = 1.0


def announce_jobs(session: Session) -> None:
    """In the transaction that queues jobs (JobQueue calls it just before COMMIT): tell every listening worker
    at that COMMIT (PostgreSQL only)."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text(f"NOTIFY {JOBS_CHANNEL}"))


def libpq_url(url: URL) -> str:
    """The SQLAlchemy URL of a PostgreSQL engine as psycopg connects to it (password and options kept)."""
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


async def listen_for_jobs(conninfo: str, doorbell: asyncio.Event, stop: asyncio.Event) -> None:
    """Ring `doorbell` on every notification until `stop`; reconnect after a lost connection."""
    pause = _RETRY_FIRST_SECONDS
    failing = False
    while not stop.is_set():
        try:
            async with await psycopg.AsyncConnection.connect(conninfo, autocommit=True) as connection:
                await connection.execute(f"LISTEN {JOBS_CHANNEL}")
                if failing:
                    log.info("job notifications resumed")
                failing, pause = False, _RETRY_FIRST_SECONDS
                doorbell.set()  # jobs queued while no one listened: look once
                while not stop.is_set():
                    # Wakes at least every second to see `stop`; a notification rings at once (one that
                    # arrives between two waits stays in libpq's queue for the next).
                    async for _notification in connection.notifies(timeout=_STOP_CHECK_SECONDS):
                        doorbell.set()
        except psycopg.Error as error:
            if not failing:
                log.warning(
                    "job notifications lost; polling until they are back",
                    error_type=type(error).__name__,
                    retry_in_s=pause,
                )
            failing = True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=pause)
        pause = min(_RETRY_MAX_SECONDS, pause * 2)
