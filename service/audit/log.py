"""The hash-chained audit log: append in the caller's transaction, verify, signed checkpoints, search.

Linearisation: a record's sequence number and previous hash are read and written under one lock per chain.
On PostgreSQL that is ``pg_advisory_xact_lock`` (held until the caller's transaction ends). On SQLite it is
the database writer lock, which sessions from ``service.db.make_sessionmaker`` take at ``BEGIN IMMEDIATE``
(see ``service.db.engine``), so no other writer can append between our read of the head and our insert.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import AsyncSession

from service.audit.chain import GENESIS_HASH, canonical_time, checkpoint_message, record_hash
from service.crypto.envelope import DecryptionError, aad_for, blob_body
from service.crypto.keyring import Keyring
from service.db.models import AuditRecord

# Key of the PostgreSQL advisory lock that serialises appends to the chain ("CCAUDIT1" as an int64).
AUDIT_CHAIN_LOCK_KEY = int.from_bytes(b"CCAUDIT1", "big") & 0x7FFF_FFFF_FFFF_FFFF
_ACTION_PATTERN = re.compile(r"^[a-z][a-z0-9_.-]{0,63}$")
_RESOURCE_TYPE = re.compile(r"(?:^|/)([A-Z][A-Za-z]{1,63})(?:/[^/]+(?:/_history/[^/]+)?)?/?$")
_VERIFY_BATCH = 500


class AuditAction(StrEnum):
    """What happened. Any lower-case dotted name is accepted; these are the ones the service uses."""

    LAUNCH = "launch"
    LOGIN = "login"
    LOGOUT = "logout"
    TOKEN_USE = "token.use"  # noqa: S105 - an action name, not a secret
    FHIR_READ = "fhir.read"
    FHIR_SEARCH = "fhir.search"
    GENERATE = "generate"
    VIEW = "view"
    APPROVE = "approve"
    REJECT = "reject"
    WRITE_BACK = "write_back"
    RETRACT = "retract"
    PORTAL_VIEW = "portal.view"
    AUDIT_SEARCH = "audit.search"
    AUDIT_EXPORT = "audit.export"
    AUDIT_VERIFY = "audit.verify"
    KEY_ROTATE = "keys.rotate"


class AuditOutcome(StrEnum):
    SUCCESS = "success"
    DENIED = "denied"
    FAILURE = "failure"
    ERROR = "error"


class AuditError(Exception):
    """An audit record could not be written or read; the action it belongs to must fail."""


@dataclass(frozen=True)
class AuditRecordRef:
    seq: int
    hash: str
    recorded_at: datetime


@dataclass(frozen=True)
class AuditEntry:
    """A decrypted audit record, for compliance officers."""

    seq: int
    recorded_at: datetime
    action: str
    outcome: str
    actor: str | None
    patient: str | None
    ehr: str | None
    resource: str | None
    resource_type: str | None
    request_id: str | None
    detail: Mapping[str, Any]
    hash: str


@dataclass(frozen=True)
class VerifyResult:
    ok: bool
    count: int
    first_bad_seq: int | None = None
    reason: str | None = None
    checkpoints_checked: int = 0


@dataclass(frozen=True)
class SignedCheckpoint:
    seq: int
    head_hash: str
    time: str
    signature: str  # base64 Ed25519 over chain.checkpoint_message(...)

    def to_json(self) -> str:
        return json.dumps(
            {"seq": self.seq, "head_hash": self.head_hash, "time": self.time, "signature": self.signature},
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, line: str) -> SignedCheckpoint:
        data = json.loads(line)
        return cls(
            seq=int(data["seq"]),
            head_hash=str(data["head_hash"]),
            time=str(data["time"]),
            signature=str(data["signature"]),
        )

    def is_signed_by(self, key: Ed25519PublicKey) -> bool:
        try:
            key.verify(
                base64.b64decode(self.signature, validate=True),
                checkpoint_message(seq=self.seq, head_hash=self.head_hash, time=self.time),
            )
        except (InvalidSignature, ValueError):
            return False
        return True


class CheckpointSink(Protocol):
    """Storage outside the database for signed checkpoints (a file, object storage, a log service)."""

    async def write(self, checkpoint: SignedCheckpoint) -> None: ...

    async def read_all(self) -> list[SignedCheckpoint]: ...


class JsonlCheckpointSink:
    """Signed checkpoints appended as JSON lines to a local file (fsynced)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    async def write(self, checkpoint: SignedCheckpoint) -> None:
        await asyncio.to_thread(self._append, checkpoint.to_json() + "\n")

    def _append(self, line: str) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())

    async def read_all(self) -> list[SignedCheckpoint]:
        return await asyncio.to_thread(self._read)

    def _read(self) -> list[SignedCheckpoint]:
        if not self.path.exists():
            return []
        lines = self.path.read_text(encoding="utf-8").splitlines()
        return [SignedCheckpoint.from_json(line) for line in lines if line.strip()]


FileCheckpointSink = JsonlCheckpointSink  # the name the composition root uses


def resource_type_of(resource: str | None) -> str | None:
    """``Condition/cond-1`` or ``https://x/fhir/Condition/c/_history/2`` → ``Condition``; ids stay out."""
    if not resource:
        return None
    match = _RESOURCE_TYPE.search(resource.split("?", 1)[0])
    return match.group(1) if match else None


def _patient_key(patient: str) -> str:
    # "Patient/pat-1" and "pat-1" are the same patient for search.
    return patient.removeprefix("Patient/")


class AuditLog:
    """Appends, verifies and searches the audit chain; ``sink`` keeps signed checkpoints outside the DB."""

    def __init__(
        self,
        keyring: Keyring,
        *,
        sink: CheckpointSink | None = None,
        verify_key: Ed25519PublicKey | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._keyring = keyring
        self._sink = sink
        self._verify_key = verify_key or keyring.audit_verify_key
        self._clock = clock
        self._last_checkpoint_seq: int | None = None

    def patient_digest(self, patient: str) -> str:
        return self._keyring.keyed_digest("patient:" + _patient_key(patient))

    def actor_digest(self, actor: str) -> str:
        return self._keyring.keyed_digest("actor:" + actor)

    async def append(
        self,
        session: AsyncSession,
        *,
        action: str,
        outcome: str,
        actor: str | None,
        patient: str | None,
        ehr: str | None,
        resource: str | None,
        request_id: str | None,
        detail: Mapping[str, Any] | None = None,
    ) -> AuditRecordRef:
        """Append in the caller's transaction (its rollback removes it; our failure fails the caller)."""
        for name, value in (("ehr", ehr), ("request_id", request_id)):
            if value is not None and not 0 < len(value) <= 128:
                raise AuditError(f"audit {name} must be 1..128 characters")
        if not _ACTION_PATTERN.match(action):
            raise AuditError("audit action must be a lower-case name like 'fhir.read' (see AuditAction)")
        if outcome not in AuditOutcome.__members__.values():
            raise AuditError(f"audit outcome must be one of {[o.value for o in AuditOutcome]}")
        try:
            sealed_plain = json.dumps(
                {"actor": actor, "patient": patient, "resource": resource, "detail": dict(detail or {})},
                sort_keys=True,
                default=str,
            ).encode()
        except (TypeError, ValueError):
            raise AuditError("audit detail must be JSON-serialisable") from None
        await self._lock_chain(session)
        head = (
            await session.execute(
                select(AuditRecord.seq, AuditRecord.hash).order_by(AuditRecord.seq.desc()).limit(1)
            )
        ).first()
        seq, prev_hash = (1, GENESIS_HASH) if head is None else (head.seq + 1, head.hash)
        recorded_at = self._clock().astimezone(UTC)
        sealed = self._keyring.encrypt(sealed_plain, aad=aad_for("audit_records", seq, "sealed"))
        row = AuditRecord(
            seq=seq,
            recorded_at=recorded_at,
            action=action,
            outcome=outcome,
            actor_digest=None if actor is None else self.actor_digest(actor),
            patient_digest=None if patient is None else self.patient_digest(patient),
            ehr=ehr,
            resource_type=resource_type_of(resource),
            request_id=request_id,
            sealed=sealed,
            prev_hash=prev_hash,
        )
        row.hash = record_hash(prev_hash, _hashed_fields(row))
        session.add(row)
        await session.flush()
        return AuditRecordRef(seq=seq, hash=row.hash, recorded_at=recorded_at)

    async def _lock_chain(self, session: AsyncSession) -> None:
        if session.get_bind().dialect.name == "postgresql":
            await session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": AUDIT_CHAIN_LOCK_KEY})
        # SQLite: the writer lock was taken by BEGIN IMMEDIATE when this transaction began.

    async def head(self, session: AsyncSession) -> tuple[int, str]:
        row = (
            await session.execute(
                select(AuditRecord.seq, AuditRecord.hash).order_by(AuditRecord.seq.desc()).limit(1)
            )
        ).first()
        return (0, GENESIS_HASH) if row is None else (row.seq, row.hash)

    async def checkpoint(self, session: AsyncSession) -> SignedCheckpoint:
        """Sign the current (committed) head and write it to the sink. Call periodically, outside appends."""
        signing_key = self._keyring.audit_signing_key
        if self._sink is None or signing_key is None:
            raise AuditError("checkpoints need a sink and an audit signing key in the keyring")
        seq, head_hash = await self.head(session)
        checkpoint = sign_checkpoint(
            signing_key, seq=seq, head_hash=head_hash, time=canonical_time(self._clock())
        )
        await self._sink.write(checkpoint)
        self._last_checkpoint_seq = seq
        return checkpoint

    async def maybe_checkpoint(self, session: AsyncSession, *, every: int = 100) -> SignedCheckpoint | None:
        """Write a checkpoint when ``every`` records were appended since the last one (call after commits)."""
        if every < 1:
            raise ValueError("every must be ≥ 1")
        if self._sink is None or self._keyring.audit_signing_key is None:
            return None
        if self._last_checkpoint_seq is None:
            existing = await self._sink.read_all()
            self._last_checkpoint_seq = max((cp.seq for cp in existing), default=0)
        seq, _ = await self.head(session)
        if seq - self._last_checkpoint_seq < every:
            return None
        checkpoint = await self.checkpoint(session)
        return checkpoint

    async def verify(self, session: AsyncSession) -> VerifyResult:
        """Walk the chain (links, hashes, gaps), then check every signed checkpoint against it."""
        count = 0
        expected_seq = 1
        prev_hash = GENESIS_HASH
        hashes_at: dict[int, str] = {}
        checkpoints = [] if self._sink is None else await self._sink.read_all()
        wanted = {cp.seq for cp in checkpoints}
        last_seq = 0
        while True:
            # Plain rows, not ORM objects: verifying a long chain must not fill the caller's session.
            rows = (
                await session.execute(
                    select(*AuditRecord.__table__.columns)
                    .where(AuditRecord.seq >= expected_seq)
                    .order_by(AuditRecord.seq)
                    .limit(_VERIFY_BATCH)
                )
            ).all()
            if not rows:
                break
            for row in rows:
                if row.seq != expected_seq:
                    return VerifyResult(
                        False, count, expected_seq, f"record {expected_seq} is missing (gap in seq)"
                    )
                if row.prev_hash != prev_hash:
                    return VerifyResult(
                        False, count, row.seq, f"record {row.seq} does not link to record {row.seq - 1}"
                    )
                try:
                    fields = _hashed_fields(row)
                except (DecryptionError, ValueError):
                    return VerifyResult(
                        False, count, row.seq, f"record {row.seq} has a malformed sealed payload"
                    )
                if record_hash(prev_hash, fields) != row.hash:
                    return VerifyResult(
                        False, count, row.seq, f"record {row.seq} was modified (hash mismatch)"
                    )
                if row.seq in wanted:
                    hashes_at[row.seq] = row.hash
                prev_hash = row.hash
                last_seq = row.seq
                expected_seq += 1
                count += 1
        return self._check_checkpoints(checkpoints, hashes_at, count=count, last_seq=last_seq)

    def _check_checkpoints(
        self,
        checkpoints: Sequence[SignedCheckpoint],
        hashes_at: Mapping[int, str],
        *,
        count: int,
        last_seq: int,
    ) -> VerifyResult:
        if checkpoints and self._verify_key is None:
            return VerifyResult(False, count, None, "checkpoints exist but no verification key is configured")
        previous_good = 0
        for checked, checkpoint in enumerate(sorted(checkpoints, key=lambda cp: cp.seq), start=1):
            assert self._verify_key is not None  # noqa: S101 - narrowed by the check above
            if not checkpoint.is_signed_by(self._verify_key):
                return VerifyResult(
                    False,
                    count,
                    None,
                    f"checkpoint at seq {checkpoint.seq} has an invalid signature",
                    checked - 1,
                )
            if checkpoint.seq == 0:
                continue
            if checkpoint.seq > last_seq:
                return VerifyResult(
                    False,
                    count,
                    last_seq + 1,
                    f"chain ends at seq {last_seq} but a signed checkpoint covers seq {checkpoint.seq}: "
                    "records were deleted from the tail",
                    checked - 1,
                )
            if hashes_at.get(checkpoint.seq) != checkpoint.head_hash:
                return VerifyResult(
                    False,
                    count,
                    previous_good + 1,
                    f"records {previous_good + 1}..{checkpoint.seq} do not match the signed checkpoint "
                    f"at seq "
                    f"{checkpoint.seq}: the chain was rewritten",
                    checked - 1,
                )
            previous_good = checkpoint.seq
        return VerifyResult(True, count, None, None, len(checkpoints))

    async def search(
        self,
        session: AsyncSession,
        *,
        patient: str | None = None,
        actor: str | None = None,
        action: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: int = 100,
    ) -> list[AuditEntry]:
        """Decrypted records matching every given filter, newest first (``until`` is exclusive)."""
        if not 0 < limit <= 10_000:
            raise ValueError("limit must be between 1 and 10000")
        query = select(AuditRecord).order_by(AuditRecord.seq.desc()).limit(limit)
        if patient is not None:
            query = query.where(AuditRecord.patient_digest == self.patient_digest(patient))
        if actor is not None:
            query = query.where(AuditRecord.actor_digest == self.actor_digest(actor))
        if action is not None:
            query = query.where(AuditRecord.action == action)
        if since is not None:
            query = query.where(AuditRecord.recorded_at >= since)
        if until is not None:
            query = query.where(AuditRecord.recorded_at < until)
        rows = (await session.execute(query)).scalars().all()
        return [self._entry(row) for row in rows]

    async def entries(
        self, session: AsyncSession, *, after_seq: int = 0, limit: int = 1000
    ) -> list[AuditEntry]:
        """Decrypted records in chain order (for export)."""
        query = select(AuditRecord).where(AuditRecord.seq > after_seq).order_by(AuditRecord.seq).limit(limit)
        return [self._entry(row) for row in (await session.execute(query)).scalars().all()]

    def _entry(self, row: AuditRecord) -> AuditEntry:
        sealed = json.loads(
            self._keyring.decrypt(row.sealed, aad=aad_for("audit_records", row.seq, "sealed"))
        )
        return AuditEntry(
            seq=row.seq,
            recorded_at=row.recorded_at,
            action=row.action,
            outcome=row.outcome,
            actor=sealed.get("actor"),
            patient=sealed.get("patient"),
            ehr=row.ehr,
            resource=sealed.get("resource"),
            resource_type=row.resource_type,
            request_id=row.request_id,
            detail=sealed.get("detail") or {},
            hash=row.hash,
        )


def sign_checkpoint(key: Ed25519PrivateKey, *, seq: int, head_hash: str, time: str) -> SignedCheckpoint:
    signature = key.sign(checkpoint_message(seq=seq, head_hash=head_hash, time=time))
    return SignedCheckpoint(
        seq=seq, head_hash=head_hash, time=time, signature=base64.b64encode(signature).decode()
    )


def _hashed_fields(row: Any) -> dict[str, str | int | None]:
    # ``row`` is an AuditRecord or a Core row of its columns.
    return {
        "seq": row.seq,
        "recorded_at": canonical_time(row.recorded_at),
        "action": row.action,
        "outcome": row.outcome,
        "actor_digest": row.actor_digest,
        "patient_digest": row.patient_digest,
        "ehr": row.ehr,
        "resource_type": row.resource_type,
        "request_id": row.request_id,
        "sealed_body": base64.b64encode(blob_body(row.sealed)).decode(),
    }
