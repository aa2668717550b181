"""The queue's reads (status, artifacts, cancellation, depth) on SQLite never wait for the writer lock, so a
page following a job answers while a worker (here: another process's connection) holds a write open."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from sqlalchemy import text

from service.crypto import Keyring
from service.crypto.keyring import new_key_material
from service.db.engine import make_engine, make_read_sessionmaker, make_sessionmaker, migrate
from service.jobs import JobQueue
from service.services import build_services
from service.settings import Settings

# Waiting for the lock would take SQLite's 30 s busy timeout; a read-only reader answers at once.
NO_WAIT_S = 10


@pytest.fixture
async def sqlite_url(tmp_path: Path) -> str:
    url = f"sqlite+aiosqlite:///{tmp_path / 'carecanvas.db'}"
    await migrate(url)
    return url


async def test_status_artifact_cancel_and_depth_reads_do_not_wait_for_a_held_writer_lock(
    sqlite_url: str,
) -> None:
    engine = make_engine(sqlite_url)
    other_process = make_engine(sqlite_url)  # a separate `carecanvas worker`: its own connection
    writes = make_sessionmaker(engine)
    queue = JobQueue(writes, Keyring(new_key_material()), read_sessionmaker=make_read_sessionmaker(engine))
    try:
        async with writes() as db, db.begin():
            job_id = await queue.enqueue(db, kind="k", bucket="b", spec={"seed": 1}, session_id_hash=None)
        [claimed] = await queue.claim_batch(worker_id="w1", max_jobs=1)
        assert await queue.complete(claimed.id, "w1", artifacts={"png": b"\x89PNG-bytes"})
        async with make_sessionmaker(other_process)() as holder:
            await holder.execute(text("UPDATE jobs SET updated_at = updated_at"))  # BEGIN IMMEDIATE: held
            view = await asyncio.wait_for(queue.get(job_id), timeout=NO_WAIT_S)
            assert view is not None
            assert view.status == "succeeded"
            png = await asyncio.wait_for(queue.read_artifact(job_id, "png"), timeout=NO_WAIT_S)
            assert png == b"\x89PNG-bytes"
            assert await asyncio.wait_for(queue.cancel_requested([job_id]), timeout=NO_WAIT_S) == set()
            assert await asyncio.wait_for(queue.queue_depth(), timeout=NO_WAIT_S) == 0
            listed = await asyncio.wait_for(queue.list_jobs(), timeout=NO_WAIT_S)
            assert [job.id for job in listed] == [job_id]
            await holder.rollback()
    finally:
        await other_process.dispose()
        await engine.dispose()


async def test_the_services_queue_reads_on_the_read_only_pool(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data")  # the embedded install: SQLite in the data dir
    services = await build_services(settings)
    other_process = make_engine(settings.resolved_database_url)
    try:
        async with services.sessionmaker() as db, db.begin():
            job_id = await services.queue.enqueue(db, kind="k", bucket="b", spec={}, session_id_hash=None)
        async with make_sessionmaker(other_process)() as holder:
            await holder.execute(text("UPDATE jobs SET updated_at = updated_at"))
            view = await asyncio.wait_for(services.queue.get(job_id), timeout=NO_WAIT_S)
            assert view is not None
            assert view.status == "queued"
            await holder.rollback()
    finally:
        await other_process.dispose()
        await services.aclose()
