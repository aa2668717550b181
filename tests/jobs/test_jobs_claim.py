"""Claims on SQLite and PostgreSQL: poison specs fail alone, crash-twice jobs run alone, priority, index."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import event, func, select, text, update

from service.crypto import Keyring
from service.crypto.envelope import aad_for
from service.crypto.keyring import new_key_material
from service.db.models import Artifact, Job
from service.jobs import JobPriority, JobQueue, JobStatus
from service.jobs.queue import claim_bucket_query, claim_head_query


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def queue(sessionmaker, clock) -> JobQueue:
    return JobQueue(sessionmaker, Keyring(new_key_material()), lease_seconds=30, max_attempts=2, clock=clock)


async def enqueue(queue, sessionmaker, clock, count, *, bucket="b", priority=JobPriority.INTERACTIVE):
    ids = []
    for index in range(count):
        clock.advance(1)
        async with sessionmaker() as session, session.begin():
            ids.append(
                await queue.enqueue(
                    session,
                    kind="illustration",
                    bucket=bucket,
                    spec={"prompt": f"p{index}", "seed": index},
                    session_id_hash=None,
                    priority=priority,
                )
            )
    return ids


async def test_a_spec_that_cannot_be_decrypted_fails_alone_and_its_batch_mates_are_claimed(
    queue, sessionmaker, clock
) -> None:
    first, poison, third, not_json = await enqueue(queue, sessionmaker, clock, 4)
    async with sessionmaker() as session, session.begin():
        # Another job's ciphertext: authenticated for another row, so it cannot be opened for this one.
        stolen = (await session.execute(select(Job.spec).where(Job.id == first))).scalar_one()
        await session.execute(update(Job).where(Job.id == poison).values(spec=stolen))
    async with sessionmaker() as session, session.begin():
        # Sealed for its own row with the right key, but not JSON: unreadable all the same.
        sealed = queue._keyring.encrypt(b"\xff not json", aad=aad_for("jobs", not_json, "spec"))
        await session.execute(update(Job).where(Job.id == not_json).values(spec=sealed))
    claimed = await queue.claim_batch(worker_id="w1", max_jobs=8)
    assert [job.id for job in claimed] == [first, third]
    view = await queue.get(poison)
    assert (view.status, view.error, view.attempts) == ("quarantined", "spec unreadable: DecryptionError", 1)
    assert view.finished_at == clock.now
    assert (await queue.get(not_json)).status == "quarantined"
    assert (await queue.get(first)).status == "running"


async def test_a_batch_that_crashed_its_worker_twice_is_retried_one_by_one(
    queue, sessionmaker, clock
) -> None:
    ids = await enqueue(queue, sessionmaker, clock, 3)
    poison = ids[1]
    for crash in range(2):
        batch = await queue.claim_batch(worker_id=f"crashing-{crash}", max_jobs=8)
        assert sorted(job.id for job in batch) == sorted(ids)  # still together: it may have been bad luck
        clock.advance(31)
        assert await queue.sweep_expired() == 3
    for job_id in ids:
        view = await queue.get(job_id)
        # max_attempts=2 is used up, but by crashes in company: nobody is quarantined yet.
        assert (view.status, view.crashes, view.solo, view.attempts) == ("queued", 2, True, 2)
    # Item by item now: the poison crashes its worker alone, the others finish.
    for expected in ids:
        [alone] = await queue.claim_batch(worker_id="careful", max_jobs=8)
        assert (alone.id, alone.solo) == (expected, True)
        if alone.id == poison:
            clock.advance(31)
            assert await queue.sweep_expired() == 1
        else:
            assert await queue.complete(alone.id, "careful", artifacts={"png": b"\x89PNG"})
    views = {job_id: await queue.get(job_id) for job_id in ids}
    assert [views[job_id].status for job_id in ids] == ["succeeded", "quarantined", "succeeded"]
    assert (
        views[poison].error
        == "lease expired (worker stopped or stalled) 3 times, the last time running alone"
    )
    # Visible to operators: the quarantined list shows attempts, crashes and the reason.
    [listed] = await queue.list_jobs(status=JobStatus.QUARANTINED)
    assert (listed.id, listed.attempts, listed.crashes) == (poison, 3, 3)


async def test_a_solo_job_never_takes_batch_mates(queue, sessionmaker, clock) -> None:
    [suspect] = await enqueue(queue, sessionmaker, clock, 1)
    async with sessionmaker() as session, session.begin():
        await session.execute(update(Job).where(Job.id == suspect).values(solo=True))
    others = await enqueue(queue, sessionmaker, clock, 3)
    assert [job.id for job in await queue.claim_batch(worker_id="w", max_jobs=8)] == [suspect]
    # A straggler claim for the bucket never adds a solo job either.
    assert sorted(job.id for job in await queue.claim_batch(worker_id="w", max_jobs=8, bucket="b")) == sorted(
        others
    )


async def test_interactive_jobs_are_claimed_ahead_of_bulk(queue, sessionmaker, clock) -> None:
    bulk = await enqueue(queue, sessionmaker, clock, 3, bucket="bulk", priority=JobPriority.BULK)
    [interactive] = await enqueue(queue, sessionmaker, clock, 1, bucket="page")
    assert [job.id for job in await queue.claim_batch(worker_id="w", max_jobs=8)] == [interactive]
    assert [job.id for job in await queue.claim_batch(worker_id="w", max_jobs=8)] == bulk


async def test_released_jobs_are_queued_again_without_an_attempt(queue, sessionmaker, clock) -> None:
    ids = await enqueue(queue, sessionmaker, clock, 2)
    await queue.claim_batch(worker_id="stopping", max_jobs=8)
    assert await queue.release("someone-else", ids) == 0
    assert await queue.release("stopping", ids) == 2
    assert [(await queue.get(job_id)).attempts for job_id in ids] == [0, 0]
    assert [job.id for job in await queue.claim_batch(worker_id="next", max_jobs=8)] == ids


async def test_a_batch_is_progressed_and_completed_in_a_constant_number_of_statements(
    queue, sessionmaker, clock
) -> None:
    ids = await enqueue(queue, sessionmaker, clock, 8)
    await queue.claim_batch(worker_id="w", max_jobs=8)
    statements: list[str] = []

    def count(conn, cursor, statement, parameters, context, executemany) -> None:
        verb = statement.split(None, 1)[0].upper()
        if verb in {"SELECT", "INSERT", "UPDATE", "DELETE"}:  # not BEGIN (IMMEDIATE) and friends
            statements.append(verb)

    sync_engine = sessionmaker.kw["bind"].sync_engine
    event.listen(sync_engine, "before_cursor_execute", count)
    try:
        assert await queue.report_batch_progress(ids, 1, 4) == set()
        progress_statements = len(statements)
        await queue.store_previews([queue.seal(job_id, "preview", b"\x89PNG p") for job_id in ids])
        preview_statements = len(statements) - progress_statements
        sealed = {job_id: [queue.seal(job_id, "png", f"png {job_id}".encode())] for job_id in ids}
        before = len(statements)
        assert sorted(await queue.complete_many("w", sealed)) == sorted(ids)
        completion_statements = len(statements) - before
        assert await queue.complete_many("late-worker", sealed) == []  # idempotent: nothing twice
    finally:
        event.remove(sync_engine, "before_cursor_execute", count)
    assert progress_statements == 1  # one UPDATE for the batch, not one per job
    assert preview_statements == 3  # which are running, delete the old previews, insert the new
    assert (
        completion_statements <= 3
    )  # lock, insert artifacts, update jobs (plus BEGIN/COMMIT on some drivers)
    async with sessionmaker() as session:
        pngs = (await session.execute(select(func.count()).where(Artifact.kind == "png"))).scalar_one()
    assert pngs == 8
    assert (await queue.get(ids[0])).progress_step == 4  # completion sets the last step


async def test_cancel_reaches_the_in_process_board(queue, sessionmaker, clock) -> None:
    [job_id] = await enqueue(queue, sessionmaker, clock, 1)
    await queue.claim_batch(worker_id="w", max_jobs=1)
    queue.board.publish([job_id], 3, 8)
    view = await queue.get(job_id)
    assert (view.progress_step, view.progress_total) == (3, 8)  # live, before any row write
    await queue.request_cancel(job_id)
    assert queue.board.cancel_requested([job_id]) == {job_id}


def _plan_text(rows) -> str:
    return "\n".join(" ".join(str(part) for part in row) for row in rows)


async def test_the_claim_walks_the_partial_index_instead_of_sorting(queue, sessionmaker, clock) -> None:
    await enqueue(queue, sessionmaker, clock, 3)
    async with sessionmaker() as session, session.begin():
        dialect = session.get_bind().dialect
        plans = {}
        for name, query in (("head", claim_head_query()), ("bucket", claim_bucket_query("b", 8))):
            compiled = query.compile(dialect=dialect, compile_kwargs={"literal_binds": True})
            if dialect.name == "postgresql":
                # A three-row table is cheaper to scan: forbid that, so the plan shows what the index serves.
                await session.execute(text("SET LOCAL enable_seqscan = off"))
                await session.execute(text("SET LOCAL enable_sort = off"))
                plans[name] = _plan_text((await session.execute(text(f"EXPLAIN {compiled}"))).all())
            else:
                plans[name] = _plan_text(
                    (await session.execute(text(f"EXPLAIN QUERY PLAN {compiled}"))).all()
                )
    assert "ix_jobs_queued_claim_order" in plans["head"], plans["head"]
    assert "ix_jobs_queued_bucket_claim_order" in plans["bucket"], plans["bucket"]
    for plan in plans.values():
        assert "TEMP B-TREE" not in plan  # SQLite: no sort of the queue
        assert "Sort" not in plan.split("Index")[0]  # PostgreSQL: no Sort node above the index scan
