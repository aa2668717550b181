"""Durable job queue in the database: batch claims of one bucket, leases, heartbeats, sweep, quarantine.

Claims are one UPDATE ... WHERE id IN (SELECT ... FOR UPDATE SKIP LOCKED) ... RETURNING statement: on
PostgreSQL concurrent claimers skip each other's rows; on SQLite the statement runs under the writer lock
taken by BEGIN IMMEDIATE (see service.db.engine), so claims are serialised.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from service.crypto.envelope import aad_for
from service.crypto.keyring import Keyring
from service.db.models import ARTIFACT_KINDS, Artifact, Job
from service.jobs.types import TERMINAL_STATUSES, JobStatus

_MAX_REASON = 300


class JobNotFoundError(LookupError):
    """No job (or artifact) with that id."""


@dataclass(frozen=True)
class ClaimedJob:
    id: str
    kind: str
    bucket: str
    attempts: int
    spec: Mapping[str, Any]


@dataclass(frozen=True)
class JobView:
    """What a job's owner may see: status and progress, never the spec."""

    id: str
    kind: str
    bucket: str
    status: JobStatus
    attempts: int
    max_attempts: int
    progress_step: int
    progress_total: int
    cancel_requested: bool
    error: str | None
    session_id_hash: str | None
    lease_owner: str | None
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None

    @property
    def finished(self) -> bool:
        return self.status in TERMINAL_STATUSES


def _spec_aad(job_id: str) -> bytes:
    return aad_for("jobs", job_id, "spec")


def _artifact_aad(artifact_id: str) -> bytes:
    return aad_for("artifacts", artifact_id, "ciphertext")


def _short_reason(reason: str) -> str:
    # Printable, single line, capped: the reason is shown to users and must stay a short category.
    cleaned = "".join(ch if ch.isprintable() else " " for ch in reason).strip()
    return (cleaned or "unspecified failure")[:_MAX_REASON]


class JobQueue:
    """The queue API used by the web app (enqueue, get, cancel) and the workers (claim ... complete)."""

    def __init__(
        self,
        sessionmaker: async_sessionmaker[AsyncSession],
        keyring: Keyring,
        *,
        lease_seconds: float = 60,
        max_attempts: int = 3,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        if lease_seconds <= 0 or max_attempts < 1:
            raise ValueError("lease_seconds must be > 0 and max_attempts ≥ 1")
        self._sessionmaker = sessionmaker
        self._keyring = keyring
        self._lease = timedelta(seconds=lease_seconds)
        self._max_attempts = max_attempts
        self._clock = clock

    def _now(self) -> datetime:
        return self._clock().astimezone(UTC)

    async def enqueue(
        self,
        session: AsyncSession,
        *,
        kind: str,
        bucket: str,
        spec: Mapping[str, Any],
        session_id_hash: str | None,
        job_id: str | None = None,
        priority: int = 0,
    ) -> str:
        """Add a queued job in the caller's transaction (so the caller audits in the same transaction)."""
        if not kind or not bucket:
            raise ValueError("a job needs a kind and a bucket")
        job_id = job_id or str(uuid.uuid4())
        now = self._now()
        spec_bytes = json.dumps(dict(spec), sort_keys=True).encode()
        session.add(
            Job(
                id=job_id,
                kind=kind,
                bucket=bucket,
                status=JobStatus.QUEUED,
                priority=priority,
                attempts=0,
                max_attempts=self._max_attempts,
                progress_step=0,
                progress_total=0,
                cancel_requested=False,
                spec=self._keyring.encrypt(spec_bytes, aad=_spec_aad(job_id)),
                session_id_hash=session_id_hash,
                created_at=now,
                updated_at=now,
            )
        )
        await session.flush()
        return job_id

    async def claim_batch(
        self, *, worker_id: str, max_jobs: int, bucket: str | None = None
    ) -> list[ClaimedJob]:
        """Claim up to ``max_jobs`` queued jobs of one bucket (the oldest queued job's bucket when None)."""
        if max_jobs < 1:
            return []
        now = self._now()
        queued = (Job.status == JobStatus.QUEUED) & Job.cancel_requested.is_(False)
        order = (Job.priority.desc(), Job.created_at, Job.id)
        if bucket is None:
            chosen_bucket: Any = (
                select(Job.bucket).where(queued).order_by(*order).limit(1).with_for_update(skip_locked=True)
            ).scalar_subquery()
        else:
            chosen_bucket = bucket
        picked = (
            select(Job.id)
            .where(queued, Job.bucket == chosen_bucket)
            .order_by(*order)
            .limit(max_jobs)
            .with_for_update(skip_locked=True)
        )
        statement = (
            update(Job)
            .where(Job.id.in_(picked))
            .values(
                status=JobStatus.RUNNING,
                lease_owner=worker_id,
                lease_expires_at=now + self._lease,
                attempts=Job.attempts + 1,
                started_at=func.coalesce(Job.started_at, now),
                updated_at=now,
                progress_step=0,
            )
            .returning(Job.id, Job.kind, Job.bucket, Job.attempts, Job.spec, Job.created_at, Job.priority)
            .execution_options(synchronize_session=False)
        )
        async with self._sessionmaker() as session, session.begin():
            rows = (await session.execute(statement)).all()
        rows = sorted(rows, key=lambda r: (-r.priority, r.created_at, r.id))
        return [
            ClaimedJob(
                id=row.id,
                kind=row.kind,
                bucket=row.bucket,
                attempts=row.attempts,
                spec=json.loads(self._keyring.decrypt(row.spec, aad=_spec_aad(row.id))),
            )
            for row in rows
        ]

    async def heartbeat(self, worker_id: str, job_ids: Iterable[str]) -> set[str]:
        """Extend the leases of the given jobs this worker still owns; returns those job ids."""
        ids = list(job_ids)
        if not ids:
            return set()
        now = self._now()
        statement = (
            update(Job)
            .where(Job.id.in_(ids), Job.status == JobStatus.RUNNING, Job.lease_owner == worker_id)
            .values(lease_expires_at=now + self._lease, updated_at=now)
            .returning(Job.id)
            .execution_options(synchronize_session=False)
        )
        async with self._sessionmaker() as session, session.begin():
            return set((await session.execute(statement)).scalars().all())

    async def report_progress(self, job_id: str, step: int, total: int) -> bool:
        """Record step ``step`` of ``total`` for a running job; returns whether cancellation was requested."""
        statement = (
            update(Job)
            .where(Job.id == job_id, Job.status == JobStatus.RUNNING)
            .values(progress_step=max(0, step), progress_total=max(0, total), updated_at=self._now())
            .returning(Job.cancel_requested)
            .execution_options(synchronize_session=False)
        )
        async with self._sessionmaker() as session, session.begin():
            flag = (await session.execute(statement)).scalar_one_or_none()
        return bool(flag)

    async def cancel_requested(self, job_ids: Iterable[str]) -> set[str]:
        """Which of these jobs have a pending cancellation request (or were already cancelled)."""
        ids = list(job_ids)
        if not ids:
            return set()
        query = select(Job.id).where(
            Job.id.in_(ids), Job.cancel_requested.is_(True) | (Job.status == JobStatus.CANCELLED)
        )
        async with self._sessionmaker() as session, session.begin():
            return set((await session.execute(query)).scalars().all())

    async def complete(self, job_id: str, worker_id: str, *, artifacts: Mapping[str, bytes]) -> bool:
        """Store the artifacts and mark the job succeeded; returns False when it was already finished (no-op).

        A worker whose lease expired may still complete a job that is queued or running elsewhere: steps are
        idempotent and its result is as good; the other worker's completion then becomes the no-op.
        """
        unknown = set(artifacts) - set(ARTIFACT_KINDS)
        if unknown:
            raise ValueError(f"artifact kinds must be among {list(ARTIFACT_KINDS)}, not {sorted(unknown)}")
        now = self._now()
        async with self._sessionmaker() as session, session.begin():
            job = await self._locked_job(session, job_id)
            if job.status in TERMINAL_STATUSES:
                return False
            dialect = session.get_bind().dialect.name
            for kind, payload in artifacts.items():
                artifact_id = str(uuid.uuid4())
                values = {
                    "id": artifact_id,
                    "job_id": job_id,
                    "kind": kind,
                    "ciphertext": self._keyring.encrypt(bytes(payload), aad=_artifact_aad(artifact_id)),
                    "size": len(payload),
                    "sha256": hashlib.sha256(payload).hexdigest(),
                    "created_at": now,
                }
                insert = postgresql.insert(Artifact) if dialect == "postgresql" else sqlite.insert(Artifact)
                await session.execute(
                    insert.values(**values).on_conflict_do_nothing(index_elements=["job_id", "kind"])
                )
            job.status = JobStatus.SUCCEEDED
            job.lease_owner = None
            job.lease_expires_at = None
            job.error = None
            if job.progress_total:
                job.progress_step = job.progress_total
            job.finished_at = now
            job.updated_at = now
        return True

    async def fail(self, job_id: str, worker_id: str, reason: str) -> str:
        """This worker's attempt failed: re-queue, or quarantine once attempts are used up.

        Returns the new status.

        A worker that no longer owns the job (lease lost) changes nothing and gets the current status back.
        """
        now = self._now()
        async with self._sessionmaker() as session, session.begin():
            job = await self._locked_job(session, job_id)
            if job.status != JobStatus.RUNNING or job.lease_owner != worker_id:
                return job.status
            job.error = _short_reason(reason)
            self._release(job, now)
            return job.status

    async def mark_cancelled(self, job_id: str, worker_id: str) -> bool:
        """The worker stopped a job whose cancellation was requested; returns whether it is now cancelled."""
        now = self._now()
        async with self._sessionmaker() as session, session.begin():
            job = await self._locked_job(session, job_id)
            if job.status == JobStatus.CANCELLED:
                return True
            if job.status != JobStatus.RUNNING or job.lease_owner != worker_id or not job.cancel_requested:
                return False
            self._finish(job, JobStatus.CANCELLED, now)
            return True

    async def request_cancel(self, job_id: str) -> str:
        """Cancel a queued job now; flag a running one for its worker. Returns the status afterwards."""
        now = self._now()
        async with self._sessionmaker() as session, session.begin():
            job = await self._locked_job(session, job_id)
            if job.status == JobStatus.QUEUED:
                job.cancel_requested = True
                self._finish(job, JobStatus.CANCELLED, now)
            elif job.status == JobStatus.RUNNING:
                job.cancel_requested = True
                job.updated_at = now
            return job.status

    async def sweep_expired(self) -> int:
        """Re-queue running jobs whose lease expired (quarantine when attempts are used up); returns count."""
        now = self._now()
        async with self._sessionmaker() as session, session.begin():
            query = (
                select(Job)
                .where(Job.status == JobStatus.RUNNING, Job.lease_expires_at < now)
                .order_by(Job.created_at)
            )
            if session.get_bind().dialect.name == "postgresql":
                query = query.with_for_update(skip_locked=True)
            jobs = (await session.execute(query)).scalars().all()
            for job in jobs:
                job.error = "lease expired (worker stopped or stalled)"
                self._release(job, now)
            return len(jobs)

    async def get(self, job_id: str) -> JobView | None:
        async with self._sessionmaker() as session, session.begin():
            job = await session.get(Job, job_id)
            return None if job is None else _view(job)

    async def store_preview(self, job_id: str, png: bytes) -> bool:
        """Replace a running job's low-cost preview; False (nothing stored) once the job has finished."""
        now = self._now()
        async with self._sessionmaker() as session, session.begin():
            job = await self._locked_job(session, job_id)
            if job.status != JobStatus.RUNNING:
                return False
            await session.execute(
                delete(Artifact).where(Artifact.job_id == job_id, Artifact.kind == "preview")
            )
            artifact_id = str(uuid.uuid4())
            session.add(
                Artifact(
                    id=artifact_id,
                    job_id=job_id,
                    kind="preview",
                    ciphertext=self._keyring.encrypt(bytes(png), aad=_artifact_aad(artifact_id)),
                    size=len(png),
                    sha256=hashlib.sha256(png).hexdigest(),
                    created_at=now,
                )
            )
        return True

    async def read_artifact(self, job_id: str, kind: str) -> bytes:
        """The decrypted artifact; raises JobNotFoundError when missing, DecryptionError when tampered."""
        async with self._sessionmaker() as session, session.begin():
            artifact = (
                await session.execute(
                    select(Artifact).where(Artifact.job_id == job_id, Artifact.kind == kind)
                )
            ).scalar_one_or_none()
        if artifact is None:
            raise JobNotFoundError(f"no {kind!r} artifact for that job")
        return self._keyring.decrypt(artifact.ciphertext, aad=_artifact_aad(artifact.id))

    async def queue_depth(self, bucket: str | None = None) -> int:
        """Queued jobs (for autoscaling on queue depth)."""
        query = select(func.count()).select_from(Job).where(Job.status == JobStatus.QUEUED)
        if bucket is not None:
            query = query.where(Job.bucket == bucket)
        async with self._sessionmaker() as session, session.begin():
            return int((await session.execute(query)).scalar_one())

    async def wait_for_work(
        self,
        *,
        timeout: float,  # noqa: ASYNC109 - a polling helper with its own deadline
        poll_interval: float = 0.1,
        bucket: str | None = None,
    ) -> bool:
        """Poll until a job is queued (True) or ``timeout`` seconds pass (False)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            if await self.queue_depth(bucket) > 0:
                return True
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            await asyncio.sleep(min(poll_interval, remaining))

    async def _locked_job(self, session: AsyncSession, job_id: str) -> Job:
        job = (
            await session.execute(select(Job).where(Job.id == job_id).with_for_update())
        ).scalar_one_or_none()
        if job is None:
            raise JobNotFoundError("no job with that id")
        return job

    def _release(self, job: Job, now: datetime) -> None:
        if job.cancel_requested:
            self._finish(job, JobStatus.CANCELLED, now)
        elif job.attempts >= job.max_attempts:
            self._finish(job, JobStatus.QUARANTINED, now)
        else:
            job.status = JobStatus.QUEUED
            job.lease_owner = None
            job.lease_expires_at = None
            job.updated_at = now

    @staticmethod
    def _finish(job: Job, status: str, now: datetime) -> None:
        job.status = status
        job.lease_owner = None
        job.lease_expires_at = None
        job.finished_at = now
        job.updated_at = now


def _view(job: Job) -> JobView:
    return JobView(
        id=job.id,
        kind=job.kind,
        bucket=job.bucket,
        status=JobStatus(job.status),
        attempts=job.attempts,
        max_attempts=job.max_attempts,
        progress_step=job.progress_step,
        progress_total=job.progress_total,
        cancel_requested=job.cancel_requested,
        error=job.error,
        session_id_hash=job.session_id_hash,
        lease_owner=job.lease_owner,
        created_at=job.created_at,
        updated_at=job.updated_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
    )
