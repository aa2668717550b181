"""Progress streams share one read per interval (JobWatch): many followers, one query a round; followers see
every change, an error reaches them, and the rounds stop with the last follower."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

import pytest
from sqlalchemy import event

from service.crypto import Keyring
from service.crypto.keyring import new_key_material
from service.db.engine import make_engine, make_read_sessionmaker, make_sessionmaker, migrate, read_engine
from service.jobs import JobQueue, JobStatus
from service.jobs.watch import JobWatch
from service.workflows.errors import JobNotOwnedError
from service.workflows.jobs import follow, follow_many, owned_progress

OWNER = "o" * 64


class CountingRead:
    def __init__(self) -> None:
        self.calls: list[tuple[str, ...]] = []
        self.views: dict[str, str] = {}
        self.fail_next = False

    async def __call__(self, ids: Sequence[str]) -> dict[str, str]:
        self.calls.append(tuple(ids))
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("database went away")
        return {job_id: self.views[job_id] for job_id in ids if job_id in self.views}


async def test_fifty_followers_cost_one_read_a_round() -> None:
    read = CountingRead()
    read.views = {f"job-{n}": "queued" for n in range(50)}
    watch: JobWatch[str] = JobWatch(read, interval=0.01)
    seen: dict[str, list[str]] = {}

    async def follower(job_id: str) -> None:
        async with watch.following(job_id):
            for _ in range(3):
                seen.setdefault(job_id, []).append((await watch.next_round([job_id]))[job_id])

    await asyncio.gather(*(follower(f"job-{n}") for n in range(50)))
    assert len(read.calls) == 3  # not 150
    assert all(len(call) == 50 for call in read.calls)
    assert all(values == ["queued"] * 3 for values in seen.values())
    await asyncio.sleep(0.05)
    assert len(read.calls) == 3  # nobody follows: no more reads


async def test_a_failed_read_reaches_the_followers_and_the_next_round_recovers() -> None:
    read = CountingRead()
    read.views = {"job-1": "running"}
    watch: JobWatch[str] = JobWatch(read, interval=0.01)
    async with watch.following("job-1"):
        read.fail_next = True
        with pytest.raises(RuntimeError, match="went away"):
            await watch.next_round(["job-1"])
        assert (await watch.next_round(["job-1"]))["job-1"] == "running"
    await watch.aclose()


def test_the_interval_must_be_positive() -> None:
    with pytest.raises(ValueError, match="interval"):
        JobWatch(CountingRead(), interval=0)


@pytest.fixture
async def sqlite_queue(tmp_path: Path):
    url = f"sqlite+aiosqlite:///{tmp_path / 'carecanvas.db'}"
    await migrate(url)
    engine = make_engine(url)
    queue = JobQueue(
        make_sessionmaker(engine),
        Keyring(new_key_material()),
        read_sessionmaker=make_read_sessionmaker(engine),
        watch_interval=0.05,
    )
    yield queue, engine
    await queue.watch.aclose()
    await engine.dispose()


async def enqueue(queue: JobQueue, engine, count: int, owner: str = OWNER) -> list[str]:
    ids = []
    async with make_sessionmaker(engine)() as db, db.begin():
        for n in range(count):
            ids.append(await queue.enqueue(db, kind="k", bucket="b", spec={"seed": n}, session_id_hash=owner))
    return ids


async def test_thirty_two_streams_read_the_jobs_table_once_a_round_and_see_every_job_finish(
    sqlite_queue,
) -> None:
    queue, engine = sqlite_queue
    ids = await enqueue(queue, engine, 32)
    selects: list[str] = []

    def count(_conn, _cursor, statement, *_args) -> None:
        if statement.lstrip().upper().startswith("SELECT") and "jobs" in statement:
            selects.append(statement)

    reader = read_engine(engine).sync_engine
    event.listen(reader, "before_cursor_execute", count)
    try:
        finals: dict[str, JobStatus] = {}

        async def stream(job_id: str) -> None:
            first = await owned_progress(queue, session_id_hash=OWNER, job_id=job_id)
            async for progress in follow(queue, session_id_hash=OWNER, first=first):
                finals[job_id] = progress.status

        streams = [asyncio.create_task(stream(job_id)) for job_id in ids]
        await asyncio.sleep(0.6)  # ~12 rounds with every stream open and every job queued
        claimed = await queue.claim_batch(worker_id="w1", max_jobs=32)
        for job in claimed:
            assert await queue.complete(job.id, "w1", artifacts={"png": b"png"})
        await asyncio.wait_for(asyncio.gather(*streams), timeout=10)
    finally:
        event.remove(reader, "before_cursor_execute", count)
    assert finals == dict.fromkeys(ids, JobStatus.SUCCEEDED)
    rounds = queue.watch.rounds
    # One read per stream to start it (ownership), then one per round for all of them — not 32 a round.
    assert len(selects) <= len(ids) + rounds + 2
    assert rounds >= 5


async def test_a_variants_stream_sees_each_job_and_another_sessions_job_is_refused(sqlite_queue) -> None:
    queue, engine = sqlite_queue
    ids = await enqueue(queue, engine, 3)
    firsts = [await owned_progress(queue, session_id_hash=OWNER, job_id=job_id) for job_id in ids]
    seen: list[tuple[str, JobStatus]] = []

    async def consume() -> None:
        async for progress in follow_many(queue, session_id_hash=OWNER, first=firsts):
            seen.append((progress.job_id, progress.status))

    task = asyncio.create_task(consume())
    await asyncio.sleep(0.1)
    for job in await queue.claim_batch(worker_id="w1", max_jobs=3):
        await queue.complete(job.id, "w1", artifacts={"png": b"png"})
    await asyncio.wait_for(task, timeout=10)
    assert [status for job_id, status in seen if job_id == ids[0]][-1] == JobStatus.SUCCEEDED
    assert {job_id for job_id, status in seen if status == JobStatus.SUCCEEDED} == set(ids)

    [other] = await enqueue(queue, engine, 1, owner="x" * 64)
    forged = firsts[0].__class__(job_id=other, status=JobStatus.QUEUED, step=0, total=0, error=None)
    with pytest.raises(JobNotOwnedError):
        async for _ in follow(queue, session_id_hash=OWNER, first=forged):
            pass
