"""In-memory progress of the jobs this process's worker is running: the embedded worker's live feed.

The worker publishes every step here (a dict write, no database) and writes a coalesced row per batch only
every reporting interval; readers in the same process (the SSE stream, the status endpoint) read this first.
Cancellation requested in this process reaches the worker between two steps without a database round trip.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class LiveProgress:
    step: int
    total: int


class ProgressBoard:
    """Step k of n per running job, and pending cancellations; safe to call from the pipeline's thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._live: dict[str, LiveProgress] = {}
        self._cancels: set[str] = set()

    def publish(self, job_ids: Iterable[str], step: int, total: int) -> None:
        progress = LiveProgress(step=max(0, step), total=max(0, total))
        with self._lock:
            for job_id in job_ids:
                self._live[job_id] = progress

    def get(self, job_id: str) -> LiveProgress | None:
        with self._lock:
            return self._live.get(job_id)

    def request_cancel(self, job_id: str) -> None:
        with self._lock:
            if job_id in self._live:
                self._cancels.add(job_id)

    def cancel_requested(self, job_ids: Iterable[str]) -> set[str]:
        with self._lock:
            return {job_id for job_id in job_ids if job_id in self._cancels}

    def forget(self, job_ids: Iterable[str]) -> None:
        """The jobs finished (or left this worker): readers go back to the database row."""
        with self._lock:
            for job_id in job_ids:
                self._live.pop(job_id, None)
                self._cancels.discard(job_id)
