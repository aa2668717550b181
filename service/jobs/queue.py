"""Durable job queue in the database: batch claims of one bucket, leases, heartbeats, sweep, quarantine.

Claims are one UPDATE ... WHERE id IN (SELECT ... FOR UPDATE SKIP LOCKED) ... RETURNING statement: on
PostgreSQL concurrent claimers skip each other's rows; on SQLite the statement runs under the writer lock
taken by BEGIN IMMEDIATE (see service.db.engine), so claims are serialised.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog
from sqlalchemy import case, delete, event, func, insert, literal_column, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import ColumnClause

from service.crypto.envelope import aad_for
from service.crypto.keyring import Keyring
from service.db.models import ARTIFACT_KINDS, Artifact, Job
from service.jobs.notify import announce_jobs, libpq_url, listen_for_jobs
from service.jobs.progress import LiveProgress, ProgressBoard
from service.jobs.types import TERMINAL_STATUSES, JobPriority, JobStatus
from service.jobs.watch import JobWatch

log = structlog.get_logger("carecanvas.jobs")

_MAX_REASON = 300
_DOORBELL = "carecanvas_doorbell"


@event.listens_for(Session, "before_commit")
def _announce_jobs(session: Session) -> None:
    # Other processes (a separate worker on PostgreSQL) hear of the jobs at this COMMIT (service.jobs.notify).
    if _DOORBELL in session.info:
        announce_jobs(session)


@event.listens_for(Session, "after_commit")
def _ring_doorbell(session: Session) -> None:
    doorbell = session.info.pop(_DOORBELL, None)
    if doorbell is not None:
        doorbell.set()


@event.listens_for(Session, "after_rollback")
def _forget_doorbell(session: Session) -> None:
    session.info.pop(_DOORBELL, None)


# A job whose worker died under it this many times is claimed alone from then on: if it is the poison, only it
# is charged for the next crash; if it is not, it runs without the poison and succeeds.
SOLO_AFTER_CRASHES = 2
LEASE_EXPIRED = "lease expired (worker stopped or stalled)"
# Written as SQL literals, not bound parameters, so the planner can match the partial claim indexes.
_QUEUED: ColumnClause[str] = literal_column("'queued'")
_CLAIM_ORDER = (Job.priority, Job.created_at, Job.id)

# Runs inside complete_many's transaction with the ids of the jobs it is completing (the safety flag).
CompletionHook = Callable[[AsyncSession, list[str]], Awaitable[None]]


class JobNotFoundError(LookupError):
    """No job (or artifact) with that id."""


@dataclass(frozen=True)
class ClaimedJob:
    id: str
    kind: str
    bucket: str
    attempts: int
    spec: Mapping[str, Any]
    solo: bool = False  # claimed alone after crashing its worker: never batch it with others


@dataclass(frozen=True)
class SealedArtifact:
    """An artifact encrypted for its row (made off the event loop), ready to insert."""

    id: str
    job_id: str
    kind: str
    ciphertext: bytes
    size: int
    sha256: str

    def row(self, now: datetime) -> dict[str, Any]:
        return {
            "id": self.id,
            "job_id": self.job_id,
            "kind": self.kind,
            "ciphertext": self.ciphertext,
            "size": self.size,
            "sha256": self.sha256,
            "created_at": now,
        }


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
    priority: int = 0
    crashes: int = 0
    solo: bool = False

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
        read_sessionmaker: async_sessionmaker[AsyncSession] | None = None,
        watch_interval: float = 0.25,
    ) -> None:
        if lease_seconds <= 0 or max_attempts < 1:
            raise ValueError("lease_seconds must be > 0 and max_attempts ≥ 1")
        self._sessionmaker = sessionmaker
        # Status, artifact and cancellation reads: on SQLite a read-only pool that never queues for the
        # writer lock, so pages following a job (SSE, polling) do not wait behind the worker's writes.
        self._reads = read_sessionmaker or sessionmaker
        self._keyring = keyring
        self._lease = timedelta(seconds=lease_seconds)
        self._max_attempts = max_attempts
        self._clock = clock
        # Live progress of the jobs this process's worker runs (embedded mode); empty in an API-only process.
        self.board = ProgressBoard()
        # The rows of every job this process's progress streams follow, read together once per interval.
        self.watch: JobWatch[JobView] = JobWatch(self._views_of, interval=watch_interval)
        # Rung when a transaction that queued jobs commits in this process: an embedded worker waiting
        # for work claims at once instead of at its next poll. (A separate worker process polls.)
        self.doorbell = asyncio.Event()

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
        priority: int = JobPriority.INTERACTIVE,
        owner_key: str | None = None,
    ) -> str:
        """Add a queued job in the caller's transaction (so the caller audits in the same transaction)."""
        job_id = self.add_job(
            session,
            kind=kind,
            bucket=bucket,
            spec=spec,
            session_id_hash=session_id_hash,
            job_id=job_id,
            priority=priority,
            owner_key=owner_key,
        )
        await session.flush()
        return job_id

    def add_job(
        self,
        session: AsyncSession,
        *,
        kind: str,
        bucket: str,
        spec: Mapping[str, Any],
        session_id_hash: str | None,
        job_id: str | None = None,
        priority: int = JobPriority.INTERACTIVE,
        owner_key: str | None = None,
    ) -> str:
        """`enqueue` without the flush: many jobs go out in one INSERT at the caller's next flush."""
        if not kind or not bucket:
            raise ValueError("a job needs a kind and a bucket")
        self._ring_after_commit(session)
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
                owner_key=owner_key,
                created_at=now,
                updated_at=now,
            )
        )
        return job_id

    def listener(self, stop: asyncio.Event) -> Coroutine[Any, Any, None] | None:
        """On PostgreSQL, what keeps this process's doorbell rung for jobs queued by other processes."""
        engine = self._sessionmaker.kw.get("bind")
        if not isinstance(engine, AsyncEngine) or engine.dialect.name != "postgresql":
            return None
        return listen_for_jobs(libpq_url(engine.url), self.doorbell, stop)

    def _ring_after_commit(self, session: AsyncSession) -> None:
        """At this session's COMMIT, tell other processes (NOTIFY) and this one (the doorbell, after it: a
        claim before the commit would miss the job)."""
        session.sync_session.info[_DOORBELL] = self.doorbell

    async def claim_batch(
        self, *, worker_id: str, max_jobs: int, bucket: str | None = None
    ) -> list[ClaimedJob]:
        """Claim up to ``max_jobs`` queued jobs of one bucket (the first queued job's bucket when None).

        Order: priority (interactive first), then age. A job marked solo (it crashed its worker twice) is
        claimed alone. Specs are decrypted one by one: a job whose spec cannot be read is quarantined here,
        with the reason, in the claim's own transaction, and its batch-mates are returned as usual.
        """
        if max_jobs < 1:
            return []
        now = self._now()
        async with self._sessionmaker() as session, session.begin():
            if bucket is None:
                head = (await session.execute(claim_head_query())).one_or_none()
                if head is None:
                    return []
                bucket = head.bucket
                picked: list[str] | None = [head.id] if head.solo else None
            else:
                picked = None
            if picked is None:
                # Selected (and on PostgreSQL locked) first, then updated by id: an UPDATE ... IN (SELECT ...
                # LIMIT) may re-run its subquery on PostgreSQL and claim more than the limit.
                picked = list((await session.execute(claim_bucket_query(bucket, max_jobs))).scalars())
                if not picked:
                    return []
            statement = (
                update(Job)
                .where(Job.id.in_(picked), Job.status == _QUEUED)
                .values(
                    status=JobStatus.RUNNING,
                    lease_owner=worker_id,
                    lease_expires_at=now + self._lease,
                    attempts=Job.attempts + 1,
                    started_at=func.coalesce(Job.started_at, now),
                    updated_at=now,
                    progress_step=0,
                )
                .returning(
                    Job.id,
                    Job.kind,
                    Job.bucket,
                    Job.attempts,
                    Job.spec,
                    Job.created_at,
                    Job.priority,
                    Job.solo,
                )
                .execution_options(synchronize_session=False)
            )
            rows = sorted(
                (await session.execute(statement)).all(), key=lambda r: (r.priority, r.created_at, r.id)
            )
            claimed: list[ClaimedJob] = []
            unreadable: dict[str, str] = {}
            for row in rows:
                try:
                    spec = self._open_spec(row.id, row.spec)
                except _UnreadableSpecError as error:
                    unreadable[row.id] = str(error)
                    continue
                claimed.append(
                    ClaimedJob(
                        id=row.id,
                        kind=row.kind,
                        bucket=row.bucket,
                        attempts=row.attempts,
                        spec=spec,
                        solo=row.solo,
                    )
                )
            for job_id, reason in unreadable.items():
                # Retrying cannot make it readable: quarantined now, so it never shares a batch again.
                await session.execute(
                    update(Job)
                    .where(Job.id == job_id)
                    .values(**_finished_values(JobStatus.QUARANTINED, now), error=_short_reason(reason))
                    .execution_options(synchronize_session=False)
                )
                log.warning("job quarantined", job_id=job_id, reason=reason)
        return claimed

    def _open_spec(self, job_id: str, sealed: bytes) -> Mapping[str, Any]:
        try:
            plain = self._keyring.decrypt(sealed, aad=_spec_aad(job_id))
        except Exception as error:  # any failure to open it is this job's alone (tampered, unknown key)
            raise _UnreadableSpecError(f"spec unreadable: {type(error).__name__}") from None
        try:
            spec = json.loads(plain)
        except ValueError:
            raise _UnreadableSpecError("spec unreadable: not JSON") from None
        if not isinstance(spec, dict):
            raise _UnreadableSpecError("spec unreadable: not a JSON object")
        return spec

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

    async def report_batch_progress(self, job_ids: Iterable[str], step: int, total: int) -> set[str]:
        """One UPDATE for a whole batch's step k of n; returns the ids whose cancellation was requested."""
        ids = list(job_ids)
        if not ids:
            return set()
        statement = (
            update(Job)
            .where(Job.id.in_(ids), Job.status == JobStatus.RUNNING)
            .values(progress_step=max(0, step), progress_total=max(0, total), updated_at=self._now())
            .returning(Job.id, Job.cancel_requested)
            .execution_options(synchronize_session=False)
        )
        async with self._sessionmaker() as session, session.begin():
            rows = (await session.execute(statement)).all()
        return {row.id for row in rows if row.cancel_requested}

    def seal(self, job_id: str, kind: str, payload: bytes) -> SealedArtifact:
        """Encrypt an artifact for its row (CPU work: the worker runs it in its encoding pool)."""
        if kind not in ARTIFACT_KINDS:
            raise ValueError(f"artifact kinds must be among {list(ARTIFACT_KINDS)}, not {kind!r}")
        artifact_id = str(uuid.uuid4())
        data = bytes(payload)
        return SealedArtifact(
            id=artifact_id,
            job_id=job_id,
            kind=kind,
            ciphertext=self._keyring.encrypt(data, aad=_artifact_aad(artifact_id)),
            size=len(data),
            sha256=hashlib.sha256(data).hexdigest(),
        )

    async def cancel_requested(self, job_ids: Iterable[str]) -> set[str]:
        """Which of these jobs have a pending cancellation request (or were already cancelled)."""
        ids = list(job_ids)
        if not ids:
            return set()
        query = select(Job.id).where(
            Job.id.in_(ids), Job.cancel_requested.is_(True) | (Job.status == JobStatus.CANCELLED)
        )
        async with self._reads() as session, session.begin():
            return set((await session.execute(query)).scalars().all())

    async def complete(self, job_id: str, worker_id: str, *, artifacts: Mapping[str, bytes]) -> bool:
        """Store the artifacts and mark the job succeeded; returns False when it was already finished (no-op).

        A worker whose lease expired may still complete a job that is queued or running elsewhere: steps are
        idempotent and its result is as good; the other worker's completion then becomes the no-op.
        """
        sealed = [self.seal(job_id, kind, payload) for kind, payload in artifacts.items()]
        return bool(await self.complete_many(worker_id, {job_id: sealed}))

    async def complete_many(
        self,
        worker_id: str,
        results: Mapping[str, Sequence[SealedArtifact]],
        *,
        hook: CompletionHook | None = None,
    ) -> list[str]:
        """Store a batch's artifacts and mark its jobs succeeded in ONE transaction; returns ids completed.

        Jobs already finished (cancelled, or completed by another worker after a lease was lost) are skipped:
        with the (job, kind) unique constraint that keeps exactly one result per job. ``hook`` runs in the
        same transaction, for the jobs being completed, before they turn succeeded.
        """
        ids = sorted(results)  # one lock order for every worker: no deadlock between two batches
        if not ids:
            return []
        now = self._now()
        async with self._sessionmaker() as session, session.begin():
            rows = (
                await session.execute(
                    select(Job.id, Job.status).where(Job.id.in_(ids)).order_by(Job.id).with_for_update()
                )
            ).all()
            open_ids = [row.id for row in rows if row.status not in TERMINAL_STATUSES]
            if not open_ids:
                return []
            artifacts = [artifact.row(now) for job_id in open_ids for artifact in results[job_id]]
            if artifacts:
                dialect = session.get_bind().dialect.name
                statement = (
                    postgresql.insert(Artifact) if dialect == "postgresql" else sqlite.insert(Artifact)
                )
                await session.execute(
                    statement.on_conflict_do_nothing(index_elements=["job_id", "kind"]), artifacts
                )
            if hook is not None:
                await hook(session, open_ids)
            await session.execute(
                update(Job)
                .where(Job.id.in_(open_ids))
                .values(
                    status=JobStatus.SUCCEEDED,
                    lease_owner=None,
                    lease_expires_at=None,
                    error=None,
                    progress_step=case((Job.progress_total > 0, Job.progress_total), else_=Job.progress_step),
                    finished_at=now,
                    updated_at=now,
                )
                .execution_options(synchronize_session=False)
            )
        self.board.forget(open_ids)
        return open_ids

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

    async def release(self, worker_id: str, job_ids: Iterable[str]) -> int:
        """Give back claimed jobs this worker never started (it is stopping): queued, attempt uncounted."""
        ids = list(job_ids)
        if not ids:
            return 0
        now = self._now()
        statement = (
            update(Job)
            .where(Job.id.in_(ids), Job.status == JobStatus.RUNNING, Job.lease_owner == worker_id)
            .values(
                status=JobStatus.QUEUED,
                lease_owner=None,
                lease_expires_at=None,
                attempts=Job.attempts - 1,
                updated_at=now,
            )
            .returning(Job.id)
            .execution_options(synchronize_session=False)
        )
        async with self._sessionmaker() as session, session.begin():
            released = list((await session.execute(statement)).scalars())
        self.board.forget(released)
        return len(released)

    async def quarantine(self, job_id: str, worker_id: str, reason: str) -> str:
        """This worker's job can never succeed (its spec is unusable): quarantine it now, without retries."""
        now = self._now()
        async with self._sessionmaker() as session, session.begin():
            job = await self._locked_job(session, job_id)
            if job.status != JobStatus.RUNNING or job.lease_owner != worker_id:
                return job.status
            job.error = _short_reason(reason)
            self._finish(job, JobStatus.QUARANTINED, now)
        log.warning("job quarantined", job_id=job_id, reason=job.error)
        return JobStatus.QUARANTINED

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
                self.board.request_cancel(job_id)  # an embedded worker sees it at its next step
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
                self._release_crashed(job, now)
            return len(jobs)

    def _release_crashed(self, job: Job, now: datetime) -> None:
        """A lease expired: count the crash; a job is quarantined for crashes only after crashing alone."""
        was_solo = job.solo
        job.crashes += 1
        job.error = LEASE_EXPIRED
        if job.cancel_requested:
            self._finish(job, JobStatus.CANCELLED, now)
        elif was_solo and job.attempts >= job.max_attempts:
            job.error = _short_reason(f"{LEASE_EXPIRED} {job.crashes} times, the last time running alone")
            self._finish(job, JobStatus.QUARANTINED, now)
            log.warning("job quarantined", job_id=job.id, reason=job.error, attempts=job.attempts)
        else:
            if job.crashes >= SOLO_AFTER_CRASHES or job.attempts >= job.max_attempts:
                # Crashed in company: it may be a batch-mate's fault. Retried alone before being charged.
                job.solo = True
            job.status = JobStatus.QUEUED
            job.lease_owner = None
            job.lease_expires_at = None
            job.updated_at = now

    async def get(self, job_id: str) -> JobView | None:
        async with self._reads() as session, session.begin():
            job = await session.get(Job, job_id)
        return None if job is None else self._with_live_step(_view(job))

    async def _views_of(self, job_ids: Sequence[str]) -> dict[str, JobView]:
        async with self._reads() as session, session.begin():
            jobs = (await session.execute(select(Job).where(Job.id.in_(job_ids)))).scalars().all()
        return {job.id: self._with_live_step(_view(job)) for job in jobs}

    def _with_live_step(self, view: JobView) -> JobView:
        live = self.board.get(view.id)
        if live is not None and view.status == JobStatus.RUNNING:
            # The row is written once per reporting interval; this process's worker knows the current step.
            return dataclasses.replace(view, progress_step=live.step, progress_total=live.total)
        return view

    def live(self, job_id: str) -> LiveProgress | None:
        """Step k of n from this process's own worker (embedded mode), without a database read."""
        return self.board.get(job_id)

    async def list_jobs(self, *, status: JobStatus | None = None, limit: int = 100) -> list[JobView]:
        """Newest first, for operators: status, attempts, crashes and the reason; never the spec."""
        return await list_jobs(self._reads, status=status, limit=limit)

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

    async def store_previews(self, previews: Sequence[SealedArtifact]) -> int:
        """Replace the previews of a batch's running jobs in one transaction (three statements, any size)."""
        if not previews:
            return 0
        now = self._now()
        ids = [preview.job_id for preview in previews]
        async with self._sessionmaker() as session, session.begin():
            running = set(
                (
                    await session.execute(
                        select(Job.id).where(Job.id.in_(ids), Job.status == JobStatus.RUNNING)
                    )
                ).scalars()
            )
            if not running:
                return 0
            await session.execute(
                delete(Artifact).where(Artifact.job_id.in_(running), Artifact.kind == "preview")
            )
            rows = [preview.row(now) for preview in previews if preview.job_id in running]
            await session.execute(insert(Artifact), rows)
        return len(rows)

    async def read_artifact(self, job_id: str, kind: str) -> bytes:
        """The decrypted artifact; raises JobNotFoundError when missing, DecryptionError when tampered."""
        async with self._reads() as session, session.begin():
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
        async with self._reads() as session, session.begin():
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
    def _finish(job: Job, status: str, now: datetime) -> None:  # keep in step with _finished_values
        job.status = status
        job.lease_owner = None
        job.lease_expires_at = None
        job.finished_at = now
        job.updated_at = now


async def list_jobs(
    sessionmaker: async_sessionmaker[AsyncSession], *, status: JobStatus | None = None, limit: int = 100
) -> list[JobView]:
    """Newest first: what an operator may see of jobs (no keys needed: nothing is decrypted)."""
    query = select(Job).order_by(Job.updated_at.desc(), Job.id).limit(max(1, limit))
    if status is not None:
        query = query.where(Job.status == status)
    async with sessionmaker() as session, session.begin():
        return [_view(job) for job in (await session.execute(query)).scalars().all()]


def _claimable() -> Any:
    return (Job.status == _QUEUED) & Job.cancel_requested.is_(False)


def claim_head_query() -> Any:
    """The first queued job in claim order (walks ix_jobs_queued_claim_order)."""
    return (
        select(Job.id, Job.bucket, Job.solo)
        .where(_claimable())
        .order_by(*_CLAIM_ORDER)
        .limit(1)
        .with_for_update(skip_locked=True)
    )


def claim_bucket_query(bucket: str, limit: int) -> Any:
    """Up to ``limit`` queued jobs of one bucket in claim order (walks ix_jobs_queued_bucket_claim_order)."""
    return (
        select(Job.id)
        .where(_claimable(), Job.bucket == bucket, Job.solo.is_(False))
        .order_by(*_CLAIM_ORDER)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )


class _UnreadableSpecError(ValueError):
    """A claimed job's spec cannot be decrypted or parsed (the message is a short category)."""


def _finished_values(status: str, now: datetime) -> dict[str, Any]:
    return {
        "status": status,
        "lease_owner": None,
        "lease_expires_at": None,
        "finished_at": now,
        "updated_at": now,
    }


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
        priority=job.priority,
        crashes=job.crashes,
        solo=job.solo,
    )
