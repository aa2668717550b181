"""The pipelined worker on a real queue and the tiny engine: overlap, coalesced progress, seeds, backoff."""

from __future__ import annotations

import asyncio
import io
import threading
from typing import Any

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import event, text

import service.worker as worker_module
from service.db.engine import make_engine, make_sessionmaker
from service.generation.engine import ImageRequest, bucket_key
from service.generation.safety import SafetyVerdict
from service.generation.tiny import TINY_MODEL_NAME
from service.jobs import JobQueue
from service.worker import Worker


def job_spec(seed: int, *, steps: int = 2) -> dict[str, Any]:
    return {
        "model": TINY_MODEL_NAME,
        "prompt": "a calm garden",
        "negative_prompt": None,
        "seed": seed,
        "width": 64,
        "height": 64,
        "steps": steps,
        "guidance": 5.0,
    }


async def enqueue(queue: JobQueue, sessionmaker, specs: list[dict[str, Any]]) -> list[str]:
    ids = []
    for spec in specs:
        bucket = bucket_key(ImageRequest("b", "p", None, 0, 64, 64, int(spec["steps"]), 5.0), TINY_MODEL_NAME)
        async with sessionmaker() as session, session.begin():
            ids.append(
                await queue.enqueue(
                    session, kind="illustration", bucket=bucket, spec=spec, session_id_hash=None
                )
            )
    return ids


def make_worker(queue: JobQueue, engine, **overrides: Any) -> Worker:
    options: dict[str, Any] = {
        "queue": queue,
        "engines": {TINY_MODEL_NAME: engine},
        "batch_size": 8,
        "batch_wait_ms": 0,
        "poll_seconds": 0.05,
        "worker_id": "pipelined-worker",
        "encode_workers": 2,
    }
    options.update(overrides)
    return Worker(**options)


async def wait_until(predicate, *, within: float = 60.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not await predicate():
        if loop.time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)


async def pixels(queue: JobQueue, job_id: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(await queue.read_artifact(job_id, "png"))), dtype=np.int16)


class WaitsForTheNextBatch:
    """A safety classifier (it runs in the storing stage) that holds batch 1's storing until the device has
    started batch 2. A worker that stores before it claims and runs the next batch never gets there."""

    name = "waits-for-next-batch"

    def __init__(self, second_call_started: threading.Event) -> None:
        self.second_call_started = second_call_started
        self.overlapped: list[bool] = []

    def check(self, image: Image.Image, *, prompt: str) -> SafetyVerdict:
        if not self.overlapped:
            self.overlapped.append(self.second_call_started.wait(timeout=20))
        return SafetyVerdict(flagged=False, reason=None)


async def test_the_device_runs_the_next_batch_while_the_last_one_is_stored(
    queue, sessionmaker, worker_engine
) -> None:
    ids = await enqueue(queue, sessionmaker, [job_spec(seed) for seed in range(4)])
    second_call_started = threading.Event()
    calls: list[int] = []
    original = worker_engine.generate

    def generate(requests, **kwargs):
        calls.append(len(requests))
        if len(calls) == 2:
            second_call_started.set()
        return original(requests, **kwargs)

    classifier = WaitsForTheNextBatch(second_call_started)
    worker = make_worker(queue, worker_engine, batch_size=2, safety=classifier)
    worker_engine.generate = generate  # type: ignore[method-assign]
    stop = asyncio.Event()
    try:
        running = asyncio.create_task(worker.run(stop))

        async def all_done() -> bool:
            return [(await queue.get(job_id)).status for job_id in ids] == ["succeeded"] * len(ids)

        await wait_until(all_done)
        stop.set()
        await asyncio.wait_for(running, timeout=30)
    finally:
        del worker_engine.generate
    assert calls == [2, 2]
    assert classifier.overlapped == [True]  # batch 2 was on the device while batch 1 was being stored


async def test_progress_costs_one_write_per_batch_per_report_and_reaches_the_status(
    queue, sessionmaker, worker_engine
) -> None:
    steps = 4
    ids = await enqueue(queue, sessionmaker, [job_spec(seed, steps=steps) for seed in range(4)])
    writes: list[str] = []

    def count(conn, cursor, statement, parameters, context, executemany) -> None:
        verb = statement.lstrip().split(None, 1)[0].upper()
        if verb in {"INSERT", "UPDATE", "DELETE"}:
            writes.append(statement)

    sync_engine = sessionmaker.kw["bind"].sync_engine
    seen: list[tuple[str, int]] = []

    async def watch() -> None:
        while True:
            view = await queue.get(ids[-1])
            seen.append((view.status, view.progress_step))
            await asyncio.sleep(0.01)

    # Report every step (interval 0) and a preview every 2 steps: the most writes this worker can make.
    worker = make_worker(queue, worker_engine, progress_interval_seconds=0, preview_every=2)
    event.listen(sync_engine, "before_cursor_execute", count)
    watcher = asyncio.create_task(watch())
    try:
        assert await worker.run_once() == 4
    finally:
        watcher.cancel()
        event.remove(sync_engine, "before_cursor_execute", count)
    # The progress reports (the claim and the completion also touch progress_step, once per batch each).
    progress_updates = [s for s in writes if s.startswith("UPDATE jobs") and "progress_total=" in s]
    preview_inserts = [s for s in writes if s.lstrip().startswith("INSERT INTO artifacts")]
    # At most one UPDATE per step for all 4 jobs together (one per job per step would be 16); previews: one
    # insert for the batch per preview point (steps 1, 2, 4), + the PNGs'.
    assert 1 <= len(progress_updates) <= steps, len(progress_updates)
    assert len(preview_inserts) <= 3 + 1, len(preview_inserts)
    assert any(status == "running" and step > 0 for status, step in seen), seen
    for job_id in ids:
        view = await queue.get(job_id)
        assert (view.status, view.progress_step, view.progress_total) == ("succeeded", steps, steps)
        assert (await queue.read_artifact(job_id, "preview")).startswith(b"\x89PNG")


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)  # pixels, not storage: one database is enough
async def test_a_seed_gives_the_same_image_in_any_batch_position_and_size(
    queue, sessionmaker, worker_engine
) -> None:
    async def image_of(seed: int, *, position: int, size: int) -> np.ndarray:
        seeds = [100 + index for index in range(size)]
        seeds[position] = seed
        ids = await enqueue(queue, sessionmaker, [job_spec(s) for s in seeds])
        assert await make_worker(queue, worker_engine, batch_size=size).run_once() == size
        return await pixels(queue, ids[position])

    alone = await image_of(42, position=0, size=1)
    for position, size in ((1, 2), (4, 5), (0, 3)):
        other = await image_of(42, position=position, size=size)
        # CPU float32 kernels block a batch differently (a few 1e-6), which can flip a rare 8-bit rounding.
        difference = np.abs(alone - other)
        assert difference.max() <= 1, (position, size)
        assert (difference > 0).mean() <= 0.001, (position, size)


class RecordingLog:
    def __init__(self) -> None:
        self.lines: list[tuple[str, str]] = []

    def _record(self, level: str):
        def record(message: str, **fields: Any) -> None:
            self.lines.append((level, message))

        return record

    def __getattr__(self, level: str):
        return self._record(level)


async def test_storage_errors_back_off_with_one_line_per_state_change(
    queue, sessionmaker, worker_engine, monkeypatch
) -> None:
    recording = RecordingLog()
    monkeypatch.setattr(worker_module, "log", recording)
    # A real database that refuses connections (nothing listens on port 1), then the real one again.
    refused = make_engine("postgresql+psycopg://postgres@127.0.0.1:1/test?connect_timeout=2")
    working = queue._sessionmaker
    queue._sessionmaker = make_sessionmaker(refused)
    attempts = {"sweeps": 0}
    original_sweep = queue.sweep_expired

    async def counted_sweep():
        attempts["sweeps"] += 1
        return await original_sweep()

    monkeypatch.setattr(queue, "sweep_expired", counted_sweep)
    worker = make_worker(queue, worker_engine, poll_seconds=0.05)
    stop = asyncio.Event()
    running = asyncio.create_task(worker.run(stop))
    try:
        await asyncio.sleep(2.0)
        failing_sweeps = attempts["sweeps"]
        queue._sessionmaker = working
        [job_id] = await enqueue(queue, sessionmaker, [job_spec(7)])

        async def done() -> bool:
            return (await queue.get(job_id)).status == "succeeded"

        await wait_until(done)
    finally:
        stop.set()
        await asyncio.wait_for(running, timeout=30)
        await refused.dispose()
    messages = [message for _level, message in recording.lines]
    assert messages.count("worker paused: storage unavailable") == 1, messages
    assert messages.count("worker resumed") == 1, messages
    assert "worker iteration failed" not in messages
    # Backing off (0.05, 0.1, 0.2, 0.4, 0.8 s ...): a handful of tries in 2 s, not one per 50 ms poll.
    assert 2 <= failing_sweeps <= 8, failing_sweeps


async def test_a_job_queued_in_this_process_wakes_the_idle_worker_at_once(
    queue, sessionmaker, worker_engine
) -> None:
    """The embedded worker waits on the queue's doorbell: the commit that queued a job rings it, so the job
    starts without waiting for the next poll (30 s here; the old idle wait slept the whole poll)."""
    worker = make_worker(queue, worker_engine, poll_seconds=30)
    stop = asyncio.Event()
    running = asyncio.create_task(worker.run(stop))
    try:
        await asyncio.sleep(0.5)  # the worker found nothing and waits
        (job_id,) = await enqueue(queue, sessionmaker, [job_spec(1)])

        async def done() -> bool:
            return (await queue.get(job_id)).status == "succeeded"

        await wait_until(done, within=10)
    finally:
        stop.set()
        await asyncio.wait_for(running, timeout=30)  # a stop still ends the idle wait at once


async def test_the_doorbell_rings_on_commit_only(queue, sessionmaker) -> None:
    spec = job_spec(2)
    queue.doorbell.clear()
    async with sessionmaker() as session:
        await queue.enqueue(session, kind="illustration", bucket="b", spec=spec, session_id_hash=None)
        assert not queue.doorbell.is_set()  # flushed, not committed: a claim would not see it yet
        await session.rollback()
    assert not queue.doorbell.is_set()
    async with sessionmaker() as session, session.begin():
        await queue.enqueue(session, kind="illustration", bucket="b", spec=spec, session_id_hash=None)
    assert queue.doorbell.is_set()
    queue.doorbell.clear()
    async with sessionmaker() as session, session.begin():  # a later transaction that queues nothing
        await session.execute(text("SELECT 1"))
    assert not queue.doorbell.is_set()


@pytest.mark.postgres
@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)  # LISTEN/NOTIFY is PostgreSQL's
async def test_on_postgresql_a_job_queued_by_another_process_wakes_the_idle_worker(
    queue, keyring, db_url, worker_engine
) -> None:
    """A separate `carecanvas worker` hears of jobs other processes queue (LISTEN/NOTIFY), so it does not
    wait for its next poll (30 s here)."""
    api_engine = make_engine(db_url)  # another process: its own engine and queue, its own doorbell
    api_sessions = make_sessionmaker(api_engine)
    api_queue = JobQueue(api_sessions, keyring, lease_seconds=30, max_attempts=2)
    worker = make_worker(queue, worker_engine, poll_seconds=30)
    stop = asyncio.Event()
    running = asyncio.create_task(worker.run(stop))
    try:
        await asyncio.sleep(1.0)  # listening, and idle
        (job_id,) = await enqueue(api_queue, api_sessions, [job_spec(3)])

        async def done() -> bool:
            return (await queue.get(job_id)).status == "succeeded"

        await wait_until(done, within=10)
    finally:
        stop.set()
        await asyncio.wait_for(running, timeout=30)
        await api_engine.dispose()
