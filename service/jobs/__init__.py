"""Durable job queue (claim batch, lease, heartbeat, sweep, quarantine) on SQLite and PostgreSQL."""

from service.jobs.queue import TERMINAL_STATUSES, ClaimedJob, JobNotFoundError, JobQueue, JobView

__all__ = ["TERMINAL_STATUSES", "ClaimedJob", "JobNotFoundError", "JobQueue", "JobView"]
