"""Group commit: short write units from many requests run in one transaction (docs/decisions/0005).

A burst of requests that each queue a job used to take the writer (SQLite's one connection; PostgreSQL's audit
chain lock) one after another, each holding it across several awaits on a busy event loop. Here the first
caller starts a drain task; what arrives while a transaction is open waits for the next one, which takes all
of it. A unit is database work only: never an EHR call.

Two kinds of unit:
- `submit(item, writer)`: items handed to the same `writer` are written together by one call,
  `writer(session, items)`, which answers one outcome per item: its result, or an Exception that refuses
  that item alone (it must then have written nothing of it). A handful of statements for the whole group,
  whatever its size: this is what keeps the lock short.
- `run(unit)`: any `unit(session)` coroutine, in a SAVEPOINT of its own, in its caller's context.

When a writer raises, or BEGIN or COMMIT fails, nothing of that transaction was written; each of its units is
then tried again alone, in a transaction of its own, so one bad unit fails alone (its caller gets the error)
and the others are committed. A caller cancelled before its unit started is dropped; one cancelled after
that is committed with the rest (the job exists, as it would had the answer been lost on the wire).
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

T = TypeVar("T")
Unit = Callable[[AsyncSession], Awaitable[T]]
# Writes `items` in the caller's transaction; one outcome per item (a result, or an Exception refusing it).
BatchWriter = Callable[[AsyncSession, Sequence[Any]], Awaitable[Sequence[Any]]]

MAX_UNITS_PER_TRANSACTION = 64


@dataclass
class _Pending:
    item: Any
    writer: BatchWriter
    future: asyncio.Future[Any]
    started: bool = False


@dataclass(frozen=True)
class _ContextUnit:
    unit: Unit[Any]
    context: contextvars.Context


async def _savepoint_units(session: AsyncSession, units: Sequence[_ContextUnit]) -> list[Any]:
    """The writer of `run`: each unit in its own SAVEPOINT and its caller's context, one after another."""
    outcomes: list[Any] = []
    for unit in units:

        async def in_savepoint(unit: _ContextUnit = unit) -> Any:
            async with session.begin_nested():
                return await unit.unit(session)

        try:
            outcomes.append(await asyncio.create_task(in_savepoint(), context=unit.context))
        except Exception as error:  # this unit's own failure: its savepoint is rolled back, the rest go on
            outcomes.append(error)
    return outcomes


class GroupCommit:
    """Write units in shared transactions: `await group.run(unit)` is the unit's result once committed."""

    def __init__(
        self,
        sessionmaker: async_sessionmaker[AsyncSession],
        *,
        max_units: int = MAX_UNITS_PER_TRANSACTION,
    ) -> None:
        if max_units < 1:
            raise ValueError("max_units must be at least 1")
        self._sessionmaker = sessionmaker
        self._max_units = max_units
        self._pending: list[_Pending] = []
        self._drain: asyncio.Task[None] | None = None
        self.transactions = 0  # committed or failed, for tests and metrics

    async def run(self, unit: Unit[T]) -> T:
        """Run `unit(session)` in the next shared transaction; its result after COMMIT, or its error."""
        result: T = await self.submit(_ContextUnit(unit, contextvars.copy_context()), _savepoint_units)
        return result

    async def submit(self, item: Any, writer: BatchWriter) -> Any:
        """Have `writer` write `item` with the others handed to it meanwhile; the item's outcome."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        pending = _Pending(item, writer, future)
        self._pending.append(pending)
        if self._drain is None or self._drain.done():
            self._drain = asyncio.create_task(self._drain_all(), name="carecanvas-group-commit")
        try:
            # Shielded: a cancelled caller must not cancel the drain that carries the other callers' units.
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            if not pending.started:
                future.cancel()  # dropped: the drain skips it
            raise

    async def aclose(self) -> None:
        """Wait for the units already handed in (at shutdown)."""
        if self._drain is not None:
            await asyncio.gather(self._drain, return_exceptions=True)

    async def _drain_all(self) -> None:
        try:
            while self._pending:
                batch = self._pending[: self._max_units]
                del self._pending[: len(batch)]
                live = [item for item in batch if not item.future.cancelled()]
                if live and not await self._commit(live) and len(live) > 1:
                    for item in live:  # one bad unit must not cost the others: each again, alone
                        await self._commit([item])
        finally:  # cancelled at shutdown: units not started are never written, and their callers hear so
            for item in self._pending:
                item.future.cancel()
            self._pending.clear()

    async def _commit(self, batch: list[_Pending]) -> bool:
        """One transaction for `batch`; False when it failed (nothing written; alone, the caller is told)."""
        outcomes: list[tuple[_Pending, Any]] = []
        self.transactions += 1
        try:
            async with self._sessionmaker() as session, session.begin():
                for writer, items in _by_writer(batch):
                    for item in items:
                        item.started = True
                    results = await writer(session, [item.item for item in items])
                    if len(results) != len(items):
                        raise RuntimeError(
                            f"a batch writer answered {len(results)} outcomes for {len(items)}"
                        )
                    outcomes.extend(zip(items, results, strict=True))
        except BaseException as failure:  # BEGIN, a writer or COMMIT failed: nothing of this was written
            if len(batch) == 1 or not isinstance(failure, Exception):
                for item in batch:
                    _settle(item.future, failure)
            if not isinstance(failure, Exception):
                raise  # the drain itself was cancelled (shutdown): its callers were told above
            return False
        for item, outcome in outcomes:
            _settle(item.future, outcome)
        return True


def _by_writer(batch: list[_Pending]) -> list[tuple[BatchWriter, list[_Pending]]]:
    groups: dict[BatchWriter, list[_Pending]] = {}
    for item in batch:
        groups.setdefault(item.writer, []).append(item)
    return list(groups.items())


def _settle(future: asyncio.Future[Any], outcome: Any) -> None:
    if future.done():  # the caller was cancelled meanwhile
        return
    if isinstance(outcome, asyncio.CancelledError):
        future.cancel()
    elif isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)
