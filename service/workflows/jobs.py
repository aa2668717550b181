"""A session's own jobs: ownership, progress as both faces show it, cancellation."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from service.jobs import JobQueue, JobStatus, JobView
from service.workflows.errors import JobNotOwnedError

SSE_POLL_SECONDS = 0.25
SSE_MAX_SECONDS = 600
# With an embedded worker the stream reads its in-memory progress, and the row only this often (status).
LIVE_ROW_CHECK_SECONDS = 2.0
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


async def follow(
    queue: JobQueue, *, session_id_hash: str, first: JobProgress, poll_seconds: float = SSE_POLL_SECONDS
) -> AsyncIterator[JobProgress]:
    """Each change of the job's progress until it is final (or the stream's time is up): both faces' SSE."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + SSE_MAX_SECONDS
    progress, last = first, None
    row_read_at = loop.time()
    while True:
        if progress != last:
            yield progress
            last = progress
        if progress.final or loop.time() >= deadline:
            return
        await asyncio.sleep(poll_seconds)
        live = queue.live(first.job_id)
        if live is not None and loop.time() - row_read_at < LIVE_ROW_CHECK_SECONDS:
            # An embedded worker runs it: its in-memory step, no database read (the row comes every few s).
            progress = dataclasses.replace(
                progress, status=JobStatus.RUNNING, step=live.step, total=live.total
            )
            continue
        progress = await owned_progress(queue, session_id_hash=session_id_hash, job_id=first.job_id)
        row_read_at = loop.time()
