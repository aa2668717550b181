"""Group commit (service.db.group_commit) on SQLite and PostgreSQL: shared transactions, a failing unit rolled
back alone, a failed COMMIT that writes nothing, cancellation, and each unit in its caller's context."""

from __future__ import annotations

import asyncio
import contextvars
import types
from collections.abc import Sequence
from typing import Any

import pytest
from sqlalchemy import event, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from service.db.group_commit import GroupCommit
from service.workflows.context import WorkflowContext

REQUEST = contextvars.ContextVar[str]("request", default="none")


@pytest.fixture
async def tables(engine: AsyncEngine, sessionmaker: async_sessionmaker[AsyncSession]) -> None:
    async with sessionmaker() as db, db.begin():
        await db.execute(text("CREATE TABLE gc_rows (n INTEGER PRIMARY KEY, request TEXT)"))
        await db.execute(text("CREATE TABLE gc_parent (id INTEGER PRIMARY KEY)"))
        await db.execute(
            text(
                "CREATE TABLE gc_child (id INTEGER PRIMARY KEY, parent INTEGER "
                "REFERENCES gc_parent (id) DEFERRABLE INITIALLY DEFERRED)"
            )
        )


def insert(n: int, *, then_fail: bool = False) -> Any:
    async def unit(db: AsyncSession) -> int:
        values = {"n": n, "r": REQUEST.get()}
        await db.execute(text("INSERT INTO gc_rows (n, request) VALUES (:n, :r)"), values)
        if then_fail:
            raise ValueError(f"unit {n} failed after its insert")
        return n

    return unit


async def rows(sessionmaker: async_sessionmaker[AsyncSession]) -> dict[int, str]:
    async with sessionmaker() as db:
        result = await db.execute(text("SELECT n, request FROM gc_rows ORDER BY n"))
        return {n: request for n, request in result.all()}


def count_begins(engine: AsyncEngine) -> list[int]:
    begins: list[int] = []
    event.listen(engine.sync_engine, "begin", lambda _connection: begins.append(1))
    return begins


async def test_a_burst_of_units_shares_transactions(
    engine: AsyncEngine, sessionmaker: async_sessionmaker[AsyncSession], tables: None
) -> None:
    group = GroupCommit(sessionmaker)
    begins = count_begins(engine)
    results = await asyncio.gather(*(group.run(insert(n)) for n in range(32)))
    # All 32 were handed in before the drain first ran: one transaction.
    assert len(begins) == 1
    assert group.transactions == 1
    assert results == list(range(32))
    assert sorted(await rows(sessionmaker)) == list(range(32))


async def test_units_beyond_the_cap_wait_for_the_next_transaction(
    sessionmaker: async_sessionmaker[AsyncSession], tables: None
) -> None:
    group = GroupCommit(sessionmaker, max_units=4)
    await asyncio.gather(*(group.run(insert(n)) for n in range(10)))
    assert len(await rows(sessionmaker)) == 10
    assert group.transactions == 3  # 4, 4 and 2


async def test_a_failing_unit_is_rolled_back_alone_and_raises_to_its_caller(
    sessionmaker: async_sessionmaker[AsyncSession], tables: None
) -> None:
    group = GroupCommit(sessionmaker)
    outcomes = await asyncio.gather(
        *(group.run(insert(n, then_fail=n == 5)) for n in range(10)), return_exceptions=True
    )
    assert isinstance(outcomes[5], ValueError)
    assert [o for i, o in enumerate(outcomes) if i != 5] == [0, 1, 2, 3, 4, 6, 7, 8, 9]
    assert sorted(await rows(sessionmaker)) == [0, 1, 2, 3, 4, 6, 7, 8, 9]


async def test_a_unit_whose_commit_fails_fails_alone_after_the_group_is_tried_again_one_by_one(
    sessionmaker: async_sessionmaker[AsyncSession], tables: None
) -> None:
    async def dangling_child(db: AsyncSession) -> None:
        # A deferred foreign key: the statement succeeds, the COMMIT fails (nothing to blame in the unit).
        await db.execute(text("INSERT INTO gc_child (id, parent) VALUES (1, 999)"))

    group = GroupCommit(sessionmaker)
    blocker = asyncio.Event()

    async def first(db: AsyncSession) -> None:
        await blocker.wait()  # holds the first transaction open while the others queue for the second

    held = asyncio.create_task(group.run(first))
    await asyncio.sleep(0)
    queued = [asyncio.create_task(group.run(insert(n))) for n in range(3)]
    queued.append(asyncio.create_task(group.run(dangling_child)))
    await asyncio.sleep(0.05)
    blocker.set()
    await held
    outcomes = await asyncio.gather(*queued, return_exceptions=True)
    # The shared COMMIT failed (nothing of it was written); then each unit alone: only the bad one fails.
    assert outcomes[:3] == [0, 1, 2]
    assert isinstance(outcomes[3], IntegrityError), outcomes
    assert group.transactions == 1 + 1 + 4  # the held one, the shared one that failed, then 4 alone
    assert sorted(await rows(sessionmaker)) == [0, 1, 2]
    async with sessionmaker() as db:
        assert (await db.execute(text("SELECT count(*) FROM gc_child"))).scalar_one() == 0
    assert await group.run(insert(7)) == 7


async def test_a_caller_cancelled_before_its_unit_ran_is_never_written(
    sessionmaker: async_sessionmaker[AsyncSession], tables: None
) -> None:
    group = GroupCommit(sessionmaker)
    blocker = asyncio.Event()

    async def first(db: AsyncSession) -> int:
        await blocker.wait()
        return await insert(0)(db)  # type: ignore[no-any-return]

    held = asyncio.create_task(group.run(first))
    await asyncio.sleep(0)
    gone = asyncio.create_task(group.run(insert(1)))
    kept = asyncio.create_task(group.run(insert(2)))
    await asyncio.sleep(0.05)
    gone.cancel()
    blocker.set()
    assert await held == 0
    assert await kept == 2
    with pytest.raises(asyncio.CancelledError):
        await gone
    assert sorted(await rows(sessionmaker)) == [0, 2]


async def test_each_unit_runs_in_its_callers_context(
    sessionmaker: async_sessionmaker[AsyncSession], tables: None
) -> None:
    group = GroupCommit(sessionmaker)

    async def caller(n: int) -> int:
        REQUEST.set(f"request-{n}")  # as the logging context binds a request id
        return await group.run(insert(n))

    await asyncio.gather(*(caller(n) for n in range(6)))
    assert await rows(sessionmaker) == {n: f"request-{n}" for n in range(6)}


async def test_a_request_that_already_wrote_is_committed_first_so_the_group_gets_the_writer(
    sessionmaker: async_sessionmaker[AsyncSession], tables: None
) -> None:
    """On SQLite the writer pool has one connection: the request's own open transaction holds it, so the
    group would wait for it forever (pool timeout) unless the request commits first."""
    group = GroupCommit(sessionmaker)
    async with sessionmaker() as request_db:
        await request_db.execute(text("INSERT INTO gc_rows (n, request) VALUES (100, 'own')"))
        unused: Any = None
        ctx = WorkflowContext(
            services=types.SimpleNamespace(group_commit=group),  # type: ignore[arg-type]
            db=request_db,
            ehr=unused,
            actor=None,
            patient_id=None,
            encounter_id=None,
            session_id_hash="session",
            request_id=None,
            scopes=unused,
        )

        async def writer(db: AsyncSession, items: Sequence[int]) -> list[int]:
            assert db is not request_db
            return [await insert(n)(db) for n in items]

        assert await asyncio.wait_for(ctx.grouped(1, writer), timeout=10) == 1
    assert sorted(await rows(sessionmaker)) == [1, 100]
