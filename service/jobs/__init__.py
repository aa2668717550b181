"""Durable job queue (claim batch, lease, heartbeat, sweep, quarantine) on SQLite and PostgreSQL."""

from service.jobs.queue import ClaimedJob, JobNotFoundError, JobQueue, JobView
from service.jobs.types import (
    TERMINAL_STATUSES,
    ImageJobSpec,
    JobKind,
    JobPriority,
    JobSpecError,
    JobStatus,
    bucket_of,
)

__all__ = [
    "TERMINAL_STATUSES",
    "ClaimedJob",
    "ImageJobSpec",
    "JobKind",
    "JobNotFoundError",
    "JobPriority",
    "JobQueue",
    "JobSpecError",
    "JobStatus",
    "JobView",
    "bucket_of",
]
