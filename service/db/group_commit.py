"""Group commit: short write units from many requests run in one transaction (docs/decisions/0005).

A burst of requests that each queue a job used to take the writer (SQLite's one connection; PostgreSQL's audit
chain lock) one after another, each holding it across several awaits on a busy event loop. Here the first
caller starts a drain task; units that arrive while a transaction is open wait for the next one, which takes
all of them. Each unit runs in a SAVEPOINT of its own, so one that fails (a job cap, a bug) is rolled back and
raises to its own caller while the others commit. When the COMMIT itself fails, nothing of that transaction
was written and every unit's caller gets the error. A unit is database work only: never an EHR call.

Each unit runs in its caller's context (contextvars), so its log lines carry its own request id. A caller
cancelled before its unit started is dropped; one cancelled after that is committed with the rest (the job
exists, as it would had the answer been lost on the wire).
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

T = TypeVar("T")
Unit = Callable[[AsyncSession], Awaitable[T]]

MAX_UNITS_PER_TRANSACTION = 64


@dataclass
class _Pending:
    unit: Unit[Any]
    future: asyncio.Future[Any]
    context: contextvars.Context
    started: bool = False


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
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        item = _Pending(unit, future, contextvars.copy_context())
        self._pending.append(item)
        if self._drain is None or self._drain.done():
            self._drain = asyncio.create_task(self._drain_all(), name="carecanvas-group-commit")
        try:
            # Shielded: a cancelled caller must not cancel the drain that carries the other callers' units.
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            if not item.started:
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
                await self._commit([item for item in batch if not item.future.cancelled()])
        finally:  # cancelled at shutdown: units not started are never written, and their callers hear so
            for item in self._pending:
                item.future.cancel()
            self._pending.clear()

    async def _commit(self, batch: list[_Pending]) -> None:
        if not batch:
            return
        outcomes: list[tuple[_Pending, Any, BaseException | None]] = []
        self.transactions += 1
        try:
            async with self._sessionmaker() as session, session.begin():
                for item in batch:
                    if not item.future.cancelled():
                        outcomes.append(await self._run_unit(session, item))
        except BaseException as failure:  # BEGIN or COMMIT failed: nothing of this transaction was written
            for item in batch:
                _settle(item.future, None, failure)
            if not isinstance(failure, Exception):
                raise  # the drain itself was cancelled (shutdown): its callers were told above
            return
        for item, value, error in outcomes:
            _settle(item.future, value, error)

    @staticmethod
    async def _run_unit(session: AsyncSession, item: _Pending) -> tuple[_Pending, Any, BaseException | None]:
        async def in_savepoint() -> Any:
            async with session.begin_nested():
                return await item.unit(session)

        item.started = True
        try:
            value = await asyncio.create_task(in_savepoint(), context=item.context)
        except Exception as error:  # this unit's own failure: its savepoint is rolled back, the rest go on
            return item, None, error
        return item, value, None


def _settle(future: asyncio.Future[Any], value: Any, error: BaseException | None) -> None:
    if future.done():  # the caller was cancelled meanwhile
        return
    if isinstance(error, asyncio.CancelledError):
        future.cancel()
    elif error is None:
        future.set_result(value)
    else:
        future.set_exception(error)
