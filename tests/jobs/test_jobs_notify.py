"""Job notifications across processes on PostgreSQL (service.jobs.notify): NOTIFY at COMMIT, a listener that
rings its queue's doorbell, and one that comes back after its connection was killed."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from service.crypto import Keyring
from service.crypto.keyring import new_key_material
from service.db.engine import make_engine, make_sessionmaker
from service.jobs import JobQueue
from service.jobs.notify import JOBS_CHANNEL, libpq_url, listen_for_jobs

SPEC = {"prompt": "a calm garden", "seed": 1}


@pytest.fixture
async def other_process(db_url: str) -> AsyncIterator[JobQueue]:
    """A queue on an engine of its own: another API process, with a doorbell of its own."""
    engine = make_engine(db_url)
    try:
        yield JobQueue(make_sessionmaker(engine), Keyring(new_key_material()))
    finally:
        await engine.dispose()


async def rung(doorbell: asyncio.Event, within: float) -> bool:
    try:
        await asyncio.wait_for(doorbell.wait(), timeout=within)
    except TimeoutError:
        return False
    return True


async def queue_one(queue: JobQueue, *, commit: bool) -> None:
    async with queue._sessionmaker() as session:
        await queue.enqueue(session, kind="illustration", bucket="b", spec=SPEC, session_id_hash=None)
        await (session.commit() if commit else session.rollback())


@pytest.mark.postgres
@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)  # LISTEN/NOTIFY is PostgreSQL's
async def test_jobs_queued_in_another_process_ring_the_listening_workers_doorbell(
    engine: AsyncEngine, other_process: JobQueue, db_url: str
) -> None:
    doorbell, stop = asyncio.Event(), asyncio.Event()
    listening = asyncio.create_task(listen_for_jobs(libpq_url(engine.url), doorbell, stop))
    try:
        assert await rung(doorbell, 10)  # connected: it rings once for whatever was queued meanwhile
        doorbell.clear()
        await queue_one(other_process, commit=False)
        assert not await rung(doorbell, 0.5)  # a rolled-back job announces nothing
        await queue_one(other_process, commit=True)
        assert await rung(doorbell, 5)

        # The listener's connection is killed (a failover, an idle timeout): it connects again and listens.
        doorbell.clear()
        async with make_sessionmaker(engine)() as admin:
            killed = await admin.execute(
                text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE query = :listen AND pid <> pg_backend_pid()"
                ),
                {"listen": f"LISTEN {JOBS_CHANNEL}"},
            )
            assert killed.all(), "the listener's connection was not found"
        assert await rung(doorbell, 10)  # back: the reconnect rings once
        doorbell.clear()
        await queue_one(other_process, commit=True)
        assert await rung(doorbell, 5)
    finally:
        stop.set()
        await asyncio.wait_for(listening, timeout=10)


async def test_a_sqlite_queue_has_no_listener(engine: AsyncEngine, db_url: str) -> None:
    queue = JobQueue(make_sessionmaker(engine), Keyring(new_key_material()))
    listener = queue.listener(asyncio.Event())
    if db_url.startswith("postgresql"):
        assert listener is not None
        listener.close()  # never started
    else:
        assert listener is None
