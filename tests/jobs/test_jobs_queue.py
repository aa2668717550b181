"""Job queue on SQLite and PostgreSQL: batch claims, concurrency, leases, attempts, idempotent completion."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import func, select

from service.crypto import DecryptionError, Keyring
from service.crypto.keyring import new_key_material
from service.db.models import Artifact, Job
from service.jobs import JobNotFoundError, JobQueue


class Clock:
    def __init__(self):
        self.now = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)

    def __call__(self):
        return self.now

    def advance(self, seconds):
        self.now += timedelta(seconds=seconds)


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def queue(sessionmaker, clock):
    return JobQueue(sessionmaker, Keyring(new_key_material()), lease_seconds=30, max_attempts=2, clock=clock)


async def enqueue(queue, sessionmaker, clock, buckets):
    ids = []
    for index, bucket in enumerate(buckets):
        clock.advance(1)
        async with sessionmaker() as session, session.begin():
            ids.append(
                await queue.enqueue(
                    session,
                    kind="illustration",
                    bucket=bucket,
                    spec={"prompt": f"p{index}", "seed": index},
                    session_id_hash="s" * 64,
                )
            )
    return ids


async def test_enqueue_in_callers_transaction_and_spec_encrypted(queue, sessionmaker):
    async with sessionmaker() as session, session.begin():
        job_id = await queue.enqueue(
            session, kind="k", bucket="b", spec={"story": "Maria's garden"}, session_id_hash=None
        )
        await session.rollback()
    assert await queue.get(job_id) is None
    async with sessionmaker() as session, session.begin():
        job_id = await queue.enqueue(
            session, kind="k", bucket="b", spec={"story": "Maria's garden"}, session_id_hash=None
        )
    async with sessionmaker() as session:
        stored = (await session.execute(select(Job.spec).where(Job.id == job_id))).scalar_one()
    assert b"Maria" not in stored
    view = await queue.get(job_id)
    assert (view.status, view.attempts, view.max_attempts) == ("queued", 0, 2)


async def test_claim_batch_takes_one_bucket_oldest_first(queue, sessionmaker, clock):
    ids = await enqueue(queue, sessionmaker, clock, ["sd-512", "sdxl-1024", "sd-512", "sd-512"])
    claimed = await queue.claim_batch(worker_id="w1", max_jobs=2)
    assert [j.id for j in claimed] == [ids[0], ids[2]]
    assert {j.bucket for j in claimed} == {"sd-512"}
    assert claimed[0].spec == {"prompt": "p0", "seed": 0}
    assert claimed[0].attempts == 1
    view = await queue.get(ids[0])
    assert (view.status, view.lease_owner, view.started_at) == ("running", "w1", clock.now)
    rest = await queue.claim_batch(worker_id="w1", max_jobs=5, bucket="sd-512")
    assert [j.id for j in rest] == [ids[3]]
    assert [j.id for j in await queue.claim_batch(worker_id="w2", max_jobs=5)] == [ids[1]]
    assert await queue.claim_batch(worker_id="w2", max_jobs=5) == []
    assert await queue.claim_batch(worker_id="w2", max_jobs=0) == []


async def test_concurrent_claimers_never_share_a_job(queue, sessionmaker, clock):
    ids = await enqueue(queue, sessionmaker, clock, ["b"] * 30)

    async def claimer(name):
        got = []
        while batch := await queue.claim_batch(worker_id=name, max_jobs=3):
            got.extend(job.id for job in batch)
        return got

    results = await asyncio.gather(*(claimer(f"w{i}") for i in range(4)))
    claimed = [job_id for result in results for job_id in result]
    assert sorted(claimed) == sorted(ids)
    assert len(set(claimed)) == len(claimed)
    async with sessionmaker() as session:
        owners = (await session.execute(select(Job.id, Job.lease_owner))).all()
    owner_of = dict(owners)
    for index, result in enumerate(results):
        assert all(owner_of[job_id] == f"w{index}" for job_id in result)


async def test_lease_expiry_sweep_requeues_then_quarantines(queue, sessionmaker, clock):
    [job_id] = await enqueue(queue, sessionmaker, clock, ["b"])
    await queue.claim_batch(worker_id="w1", max_jobs=1)
    clock.advance(20)
    assert await queue.sweep_expired() == 0
    clock.advance(11)
    assert await queue.sweep_expired() == 1
    assert (await queue.get(job_id)).status == "queued"
    [again] = await queue.claim_batch(worker_id="w2", max_jobs=1)
    assert again.attempts == 2
    clock.advance(31)
    assert await queue.sweep_expired() == 1
    # Attempts used up by crashes in company (as far as the queue knows): one more try, alone, first.
    view = await queue.get(job_id)
    assert (view.status, view.crashes, view.solo) == ("queued", 2, True)
    [alone] = await queue.claim_batch(worker_id="w3", max_jobs=5)
    assert alone.attempts == 3
    clock.advance(31)
    assert await queue.sweep_expired() == 1
    view = await queue.get(job_id)
    assert (view.status, view.crashes) == ("quarantined", 3)
    assert view.error == "lease expired (worker stopped or stalled) 3 times, the last time running alone"
    assert await queue.claim_batch(worker_id="w4", max_jobs=1) == []


async def test_fail_requeues_until_attempts_are_used_up(queue, sessionmaker, clock):
    [job_id] = await enqueue(queue, sessionmaker, clock, ["b"])
    await queue.claim_batch(worker_id="w1", max_jobs=1)
    assert await queue.fail(job_id, "someone-else", "x") == "running"  # not the owner: nothing changes
    assert await queue.fail(job_id, "w1", "generation failed: OutOfMemoryError") == "queued"
    await queue.claim_batch(worker_id="w1", max_jobs=1)
    assert await queue.fail(job_id, "w1", "generation failed:\nRuntimeError" + "x" * 500) == "quarantined"
    view = await queue.get(job_id)
    assert view.error.startswith("generation failed: RuntimeError")
    assert len(view.error) == 300
    assert view.finished_at == clock.now


async def test_complete_twice_stores_one_artifact_set(queue, sessionmaker, clock):
    [job_id] = await enqueue(queue, sessionmaker, clock, ["b"])
    await queue.claim_batch(worker_id="w1", max_jobs=1)
    await queue.report_progress(job_id, 2, 2)
    assert await queue.complete(job_id, "w1", artifacts={"png": b"\x89PNG first", "pdf": b"%PDF"})
    assert not await queue.complete(job_id, "w2", artifacts={"png": b"\x89PNG second"})
    assert await queue.read_artifact(job_id, "png") == b"\x89PNG first"
    async with sessionmaker() as session:
        count = (await session.execute(select(func.count()).select_from(Artifact))).scalar_one()
        stored = (
            await session.execute(select(Artifact.ciphertext).where(Artifact.kind == "png"))
        ).scalar_one()
    assert count == 2
    assert b"first" not in stored
    assert (await queue.get(job_id)).status == "succeeded"
    with pytest.raises(JobNotFoundError):
        await queue.read_artifact(job_id, "preview")
    with pytest.raises(ValueError, match="artifact kinds"):
        await queue.complete(job_id, "w1", artifacts={"exe": b""})


async def test_concurrent_completions_are_idempotent(queue, sessionmaker, clock):
    [job_id] = await enqueue(queue, sessionmaker, clock, ["b"])
    await queue.claim_batch(worker_id="w1", max_jobs=1)
    results = await asyncio.gather(
        *(queue.complete(job_id, f"w{i}", artifacts={"png": b"img"}) for i in range(4))
    )
    assert sorted(results) == [False, False, False, True]
    async with sessionmaker() as session:
        assert (await session.execute(select(func.count()).select_from(Artifact))).scalar_one() == 1


async def test_artifact_moved_to_another_job_fails_to_decrypt(queue, sessionmaker, clock):
    first, second = await enqueue(queue, sessionmaker, clock, ["b", "b"])
    await queue.claim_batch(worker_id="w1", max_jobs=2)
    await queue.complete(first, "w1", artifacts={"png": b"one"})
    await queue.complete(second, "w1", artifacts={"png": b"two"})
    async with sessionmaker() as session, session.begin():
        rows = (await session.execute(select(Artifact).order_by(Artifact.job_id))).scalars().all()
        rows[0].ciphertext, rows[1].ciphertext = rows[1].ciphertext, rows[0].ciphertext
    with pytest.raises(DecryptionError):
        await queue.read_artifact(first, "png")


async def test_cancel_queued_and_running(queue, sessionmaker, clock):
    queued_id, running_id = await enqueue(queue, sessionmaker, clock, ["a", "b"])
    await queue.claim_batch(worker_id="w1", max_jobs=1, bucket="b")
    assert await queue.request_cancel(queued_id) == "cancelled"
    assert await queue.claim_batch(worker_id="w1", max_jobs=1, bucket="a") == []
    assert await queue.request_cancel(running_id) == "running"
    assert await queue.report_progress(running_id, 1, 4) is True
    assert await queue.cancel_requested([queued_id, running_id, "nope"]) == {queued_id, running_id}
    assert not await queue.mark_cancelled(running_id, "w-other")
    assert await queue.mark_cancelled(running_id, "w1")
    assert (await queue.get(running_id)).status == "cancelled"
    assert not await queue.complete(running_id, "w1", artifacts={"png": b"late"})
    with pytest.raises(JobNotFoundError):
        await queue.request_cancel("no-such-job")


async def test_cancel_requested_job_that_fails_or_expires_is_cancelled(queue, sessionmaker, clock):
    first, second = await enqueue(queue, sessionmaker, clock, ["b", "b"])
    await queue.claim_batch(worker_id="w1", max_jobs=2)
    await queue.request_cancel(first)
    await queue.request_cancel(second)
    assert await queue.fail(first, "w1", "stopped") == "cancelled"
    clock.advance(31)
    assert await queue.sweep_expired() == 1
    assert (await queue.get(second)).status == "cancelled"


async def test_heartbeat_extends_only_the_owners_leases(queue, sessionmaker, clock):
    first, second = await enqueue(queue, sessionmaker, clock, ["b", "b"])
    await queue.claim_batch(worker_id="w1", max_jobs=1)
    await queue.claim_batch(worker_id="w2", max_jobs=1)
    clock.advance(20)
    assert await queue.heartbeat("w1", [first, second]) == {first}
    assert await queue.heartbeat("w1", []) == set()
    clock.advance(20)  # w2's lease (30 s) has run out; w1's was renewed 20 s ago
    assert await queue.sweep_expired() == 1
    assert (await queue.get(first)).status == "running"
    assert (await queue.get(second)).status == "queued"
    assert await queue.heartbeat("w2", [second]) == set()


async def test_progress_depth_and_wait_for_work(queue, sessionmaker, clock):
    assert await queue.wait_for_work(timeout=0.05, poll_interval=0.01) is False
    [job_id] = await enqueue(queue, sessionmaker, clock, ["b"])
    assert await queue.queue_depth() == 1
    assert await queue.queue_depth("other") == 0
    assert await queue.wait_for_work(timeout=1) is True
    assert await queue.report_progress(job_id, 1, 2) is False  # not running yet: ignored
    await queue.claim_batch(worker_id="w1", max_jobs=1)
    await queue.report_progress(job_id, 1, 2)
    view = await queue.get(job_id)
    assert (view.progress_step, view.progress_total) == (1, 2)
    assert await queue.queue_depth() == 0


async def test_previews_replace_each_other_only_while_running(queue, sessionmaker, clock):
    [job_id] = await enqueue(queue, sessionmaker, clock, ["b"])
    assert not await queue.store_preview(job_id, b"\x89PNG too early")  # still queued
    await queue.claim_batch(worker_id="w1", max_jobs=1)
    assert await queue.store_preview(job_id, b"\x89PNG step 1")
    assert await queue.store_preview(job_id, b"\x89PNG step 2")
    assert await queue.read_artifact(job_id, "preview") == b"\x89PNG step 2"
    async with sessionmaker() as session:
        previews = (
            await session.execute(
                select(func.count()).select_from(Artifact).where(Artifact.kind == "preview")
            )
        ).scalar_one()
    assert previews == 1
    assert await queue.complete(job_id, "w1", artifacts={"png": b"\x89PNG final"})
    assert not await queue.store_preview(job_id, b"\x89PNG late")  # a straggler after completion is dropped
    assert await queue.read_artifact(job_id, "preview") == b"\x89PNG step 2"
