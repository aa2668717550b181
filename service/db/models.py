"""SQLAlchemy 2 models: web sessions, jobs, artifacts, documents and the append-only audit records."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Dialect,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    UniqueConstraint,
    false,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

JOB_STATUSES = ("queued", "running", "succeeded", "failed", "cancelled", "quarantined")
ARTIFACT_KINDS = ("png", "pdf", "preview")
DOCUMENT_STATUSES = ("draft", "approved", "written", "retracted", "failed")


def utc_now() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes on every backend (SQLite stores naive UTC text, PostgreSQL timestamptz)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("timestamps must be timezone-aware (UTC)")
        value = value.astimezone(UTC)
        # SQLite compares timestamps as text: store one naive UTC format so ordering is chronological.
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


# BIGINT on PostgreSQL; INTEGER on SQLite, where only INTEGER is the 64-bit rowid type.
BigInt = BigInteger().with_variant(Integer(), "sqlite")

naming_convention = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=naming_convention)


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


class WebSession(Base):
    """Server-side session; the browser holds only the opaque id whose SHA-256 is the key."""

    __tablename__ = "web_sessions"

    id_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utc_now)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utc_now, onupdate=utc_now)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    ehr_name: Mapped[str | None] = mapped_column(String(128))
    csrf_token: Mapped[str] = mapped_column(String(128))
    data: Mapped[bytes] = mapped_column(
        LargeBinary
    )  # envelope ciphertext, aad_for("web_sessions", id_hash, "data")
    version: Mapped[int] = mapped_column(Integer, default=1)


class SpentLaunchState(Base):
    """A SMART launch `state` (SHA-256) already presented to /callback: single use, kept until it expires."""

    __tablename__ = "spent_launch_states"

    state_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)


class ReadinessProbe(Base):
    """One row per probe that /readyz rewrites: proof that the database still commits."""

    __tablename__ = "readiness_probes"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    checked_at: Mapped[datetime] = mapped_column(UTCDateTime)


class Job(Base):
    """A unit of GPU work; claimed in batches of one bucket under a lease."""

    __tablename__ = "jobs"
    __table_args__ = (
        Index("ix_jobs_status_bucket_created_at", "status", "bucket", "created_at"),
        Index("ix_jobs_status_lease_expires_at", "status", "lease_expires_at"),
        # The claim's two queries walk these in ORDER BY order and stop at LIMIT (no sort of the queue);
        # partial, so they hold only queued rows. The claim writes status = 'queued' as a literal to match;
        # status leads so that SQLite's planner (no statistics) prefers them to the plain status index.
        Index(
            "ix_jobs_queued_claim_order",
            "status",
            "priority",
            "created_at",
            "id",
            postgresql_where=text("status = 'queued'"),
            sqlite_where=text("status = 'queued'"),
        ),
        Index(
            "ix_jobs_queued_bucket_claim_order",
            "status",
            "bucket",
            "priority",
            "created_at",
            "id",
            postgresql_where=text("status = 'queued'"),
            sqlite_where=text("status = 'queued'"),
        ),
        CheckConstraint(_in("status", JOB_STATUSES), name="status"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    kind: Mapped[str] = mapped_column(String(64))
    bucket: Mapped[str] = mapped_column(String(255))
    status: Mapped[str] = mapped_column(String(16), default="queued")
    priority: Mapped[int] = mapped_column(Integer, default=0)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    lease_owner: Mapped[str | None] = mapped_column(String(255))
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    progress_step: Mapped[int] = mapped_column(Integer, default=0)
    progress_total: Mapped[int] = mapped_column(Integer, default=0)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    # Leases that expired under this job (its worker died or stalled); after two, it is claimed alone.
    crashes: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    solo: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    error: Mapped[str | None] = mapped_column(String(300))  # short reason, never patient data
    spec: Mapped[bytes] = mapped_column(LargeBinary)  # envelope ciphertext, aad_for("jobs", id, "spec")
    session_id_hash: Mapped[str | None] = mapped_column(String(64), index=True)
    # Keyed digest of (EHR, user): the per-user cap on queued jobs counts by it (service.workflows.job_caps).
    owner_key: Mapped[str | None] = mapped_column(String(64), index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utc_now)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utc_now)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class Artifact(Base):
    """An encrypted result of a job (image, handout PDF, preview); one per (job, kind)."""

    __tablename__ = "artifacts"
    __table_args__ = (
        UniqueConstraint("job_id", "kind"),
        CheckConstraint(_in("kind", ARTIFACT_KINDS), name="kind"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(16))
    ciphertext: Mapped[bytes] = mapped_column(LargeBinary)  # aad_for("artifacts", id, "ciphertext")
    size: Mapped[int] = mapped_column(Integer)  # plaintext bytes
    sha256: Mapped[str] = mapped_column(String(64))  # of the plaintext, to check integrity after decryption
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utc_now)


class Document(Base):
    """One reviewed result and its write-back state; ``version`` is for optimistic compare-and-set."""

    __tablename__ = "documents"
    __table_args__ = (CheckConstraint(_in("status", DOCUMENT_STATUSES), name="status"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), unique=True)
    status: Mapped[str] = mapped_column(String(16), default="draft")
    content: Mapped[bytes] = mapped_column(LargeBinary)  # aad_for("documents", id, "content")
    fhir_document_id: Mapped[str | None] = mapped_column(String(255))
    identifier: Mapped[str | None] = mapped_column(String(255), index=True)
    ehr_name: Mapped[str | None] = mapped_column(String(128))
    approved_by_hash: Mapped[str | None] = mapped_column(String(64))
    approved_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    written_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    error: Mapped[str | None] = mapped_column(String(300))
    version: Mapped[int] = mapped_column(Integer, default=1)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utc_now)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utc_now, onupdate=utc_now)


class AuditRecord(Base):
    """Append-only, hash-chained audit record (see service.audit.chain for what the hash covers).

    ``sealed`` is an envelope blob (aad_for("audit_records", seq, "sealed")) of actor, patient, resource and
    detail. The hash covers only its body (nonce + ciphertext), so key rotation may re-wrap its header; the
    PostgreSQL trigger allows exactly that UPDATE and nothing else.
    """

    __tablename__ = "audit_records"

    seq: Mapped[int] = mapped_column(BigInt, primary_key=True, autoincrement=False)
    recorded_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    action: Mapped[str] = mapped_column(String(64), index=True)
    outcome: Mapped[str] = mapped_column(String(16))
    actor_digest: Mapped[str | None] = mapped_column(String(64), index=True)
    patient_digest: Mapped[str | None] = mapped_column(String(64), index=True)
    ehr: Mapped[str | None] = mapped_column(String(128))
    resource_type: Mapped[str | None] = mapped_column(String(64))
    request_id: Mapped[str | None] = mapped_column(String(128))
    sealed: Mapped[bytes] = mapped_column(LargeBinary)
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64), unique=True)


PORTRAIT_REVIEW_STATUSES = ("waiting", "sent_back", "approved")
PORTRAIT_NOTE_KINDS = ("note", "sent", "send_back", "approve", "likeness")


class PortraitReview(Base):
    """A portrait draft in the reviewer's queue (artist or clinician): waiting, sent back or approved.

    ``details`` is an envelope blob (aad_for("portrait_reviews", job_id, "details")) of the patient's id and
    name shown in the queue; who asked and who decided are practitioner references, never patient data.
    """

    __tablename__ = "portrait_reviews"
    __table_args__ = (CheckConstraint(_in("status", PORTRAIT_REVIEW_STATUSES), name="status"),)

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    ehr_name: Mapped[str] = mapped_column(String(128))
    status: Mapped[str] = mapped_column(String(16), index=True)
    details: Mapped[bytes] = mapped_column(LargeBinary)
    requested_by: Mapped[str | None] = mapped_column(String(255))
    decided_by: Mapped[str | None] = mapped_column(String(255))
    decided_role: Mapped[str | None] = mapped_column(String(32))
    decided_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utc_now)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utc_now, onupdate=utc_now)


class PortraitNote(Base):
    """One note on a portrait draft (a note, a send-back, an approval, a likeness change), oldest first.

    ``body`` is an envelope blob (aad_for("portrait_notes", id, "body")): notes may carry the patient's words.
    """

    __tablename__ = "portrait_notes"
    __table_args__ = (CheckConstraint(_in("kind", PORTRAIT_NOTE_KINDS), name="kind"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(16))
    author: Mapped[str | None] = mapped_column(String(255))
    author_role: Mapped[str | None] = mapped_column(String(32))
    body: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utc_now)


# Every ciphertext column, for key rotation: (model, primary-key attribute, column attribute).
ENCRYPTED_COLUMNS: tuple[tuple[type[Base], str, str], ...] = (
    (WebSession, "id_hash", "data"),
    (Job, "id", "spec"),
    (Artifact, "id", "ciphertext"),
    (Document, "id", "content"),
    (AuditRecord, "seq", "sealed"),
    (PortraitReview, "job_id", "details"),
    (PortraitNote, "id", "body"),
)


__all__ = [
    "ARTIFACT_KINDS",
    "DOCUMENT_STATUSES",
    "ENCRYPTED_COLUMNS",
    "JOB_STATUSES",
    "Artifact",
    "AuditRecord",
    "Base",
    "Document",
    "Job",
    "PortraitNote",
    "PortraitReview",
    "UTCDateTime",
    "WebSession",
    "utc_now",
]
