"""One database read per interval for all the jobs this process's streams follow, not one per stream.

Every open progress stream (SSE, both faces) used to read its job's row every poll: a burst of 64 queued jobs
meant 256 reads a second on the read pool, most of the API process's time during the burst. A ``JobWatch``
reads the rows of every followed job in one query per round and wakes the followers; it runs only while
someone follows (started by the first, stopped with the last).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Generic, TypeVar

ViewT = TypeVar("ViewT")
# SQLite allows 32,766 bound variables since 3.32; stay far below any server's limit.
_CHUNK = 500


class JobWatch(Generic[ViewT]):
    """Rounds of ``read(ids) -> {id: view}`` every ``interval`` seconds while at least one job is followed."""

    def __init__(
        self, read: Callable[[Sequence[str]], Awaitable[dict[str, ViewT]]], *, interval: float
    ) -> None:
        if interval <= 0:
            raise ValueError("interval must be > 0")
        self._read = read
        self._interval = interval
        self._followers: dict[str, int] = {}
        self._views: dict[str, ViewT] = {}
        self._asked: set[str] = set()  # the ids the last round read
        self._error: BaseException | None = None
        self._round: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self.rounds = 0  # reads made so far (for tests and the metrics of a burst)

    @contextlib.asynccontextmanager
    async def following(self, job_id: str) -> AsyncIterator[None]:
        """Follow one job for as long as the block runs (its row is read in every round)."""
        self._followers[job_id] = self._followers.get(job_id, 0) + 1
        try:
            yield
        finally:
            left = self._followers[job_id] - 1
            if left:
                self._followers[job_id] = left
            else:
                del self._followers[job_id]
                self._views.pop(job_id, None)
            if not self._followers:
                await self.aclose()

    async def next_round(self, job_ids: Iterable[str]) -> Mapping[str, ViewT]:
        """The views after the next round that read all of ``job_ids`` (followed; a job missing from the
        answer no longer exists). A round already reading when a follower joined does not count for it."""
        wanted = set(job_ids)
        while True:
            if self._task is None or self._task.done():
                self._round = asyncio.Event()
                self._task = asyncio.create_task(self._run(), name="job-watch")
            assert self._round is not None  # noqa: S101 - set together with the task above
            await self._round.wait()
            if self._error is not None:
                raise self._error
            if wanted <= self._asked:
                return self._views

    async def _run(self) -> None:
        while self._followers:
            await asyncio.sleep(self._interval)
            ids = list(self._followers)
            try:
                views: dict[str, ViewT] = {}
                for start in range(0, len(ids), _CHUNK):
                    views.update(await self._read(ids[start : start + _CHUNK]))
            except Exception as error:
                self._error = error
            else:
                self._error = None
                self._views = views
            self._asked = set(ids)
            self.rounds += 1
            done, self._round = self._round, asyncio.Event()
            if done is not None:
                done.set()

    async def aclose(self) -> None:
        """Stop the rounds (the last follower left, or the process stops)."""
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
