"""A session's own jobs: ownership, progress as both faces show it, cancellation."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from service.jobs import JobQueue, JobStatus, JobView
from service.workflows.errors import JobNotOwnedError

SSE_MAX_SECONDS = 600
_NOT_OWNED = "It may belong to another session. Start from the workspace."


@dataclass(frozen=True)
class JobProgress:
    """What the job's owner sees: status and step k of n, the reason when it failed; never the spec."""

    job_id: str
    status: JobStatus
    step: int
    total: int
    error: str | None

    @property
    def final(self) -> bool:
        return self.status.final

    def to_dict(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "status": self.status.value,
            "step": self.step,
            "total": self.total,
            "error": self.error,
        }


def progress_of(job: JobView) -> JobProgress:
    failed = job.status in (JobStatus.FAILED, JobStatus.QUARANTINED)
    return JobProgress(
        job_id=job.id,
        status=job.status,
        step=job.progress_step or 0,
        total=job.progress_total or 0,
        error=job.error if failed else None,
    )


async def owned_job(queue: JobQueue, *, session_id_hash: str, job_id: str) -> JobView:
    """A job is visible only to the session that started it."""
    job = await queue.get(job_id)
    if job is None or job.session_id_hash != session_id_hash:
        raise JobNotOwnedError(_NOT_OWNED)
    return job


async def owned_progress(queue: JobQueue, *, session_id_hash: str, job_id: str) -> JobProgress:
    return progress_of(await owned_job(queue, session_id_hash=session_id_hash, job_id=job_id))


async def follow(queue: JobQueue, *, session_id_hash: str, first: JobProgress) -> AsyncIterator[JobProgress]:
    """Each change of the job's progress until it is final (or the stream's time is up): both faces' SSE."""
    async for progress in follow_many(queue, session_id_hash=session_id_hash, first=[first]):
        yield progress


async def follow_many(
    queue: JobQueue, *, session_id_hash: str, first: Sequence[JobProgress]
) -> AsyncIterator[JobProgress]:
    """``first``, then each change of any of these jobs until all are final or the stream's time is up.

    The rows come from the queue's watch (one read per interval for every stream of this process); with an
    embedded worker, a running job's step comes from its in-memory board.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + SSE_MAX_SECONDS
    last = {progress.job_id: progress for progress in first}
    for progress in last.values():
        yield progress
    async with contextlib.AsyncExitStack() as stack:
        for job_id in last:
            await stack.enter_async_context(queue.watch.following(job_id))
        while not all(progress.final for progress in last.values()) and loop.time() < deadline:
            views = await queue.watch.next_round(last)
            for job_id, before in list(last.items()):
                if before.final:
                    continue
                view = views.get(job_id)
                if view is None or view.session_id_hash != session_id_hash:
                    raise JobNotOwnedError(_NOT_OWNED)  # deleted (expired) since the stream began
                now = progress_of(view)  # a running job's step from this process's worker (JobQueue)
                if now != before:
                    last[job_id] = now
                    yield now
