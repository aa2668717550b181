"""The hash-chained audit log: append in the caller's transaction, verify, signed checkpoints, search.

Linearisation: a record's sequence number and previous hash are read and written under one lock per chain.
On PostgreSQL that is ``pg_advisory_xact_lock`` (held until the caller's transaction ends). On SQLite it is
the database writer lock, which sessions from ``service.db.make_sessionmaker`` take at ``BEGIN IMMEDIATE``
(see ``service.db.engine``), so no other writer can append between our read of the head and our insert.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from sqlalchemy import insert, select, text
from sqlalchemy.ext.asyncio import AsyncSession

from service.audit.chain import GENESIS_HASH, hashed_fields, record_hash
from service.audit.checkpoints import (
    Checkpointer,
    CheckpointError,
    CheckpointReadout,
    CheckpointSink,
    SignedCheckpoint,
)
from service.audit.linking import insert_if_head
from service.audit.verify import VerifyResult, verify_chain
from service.crypto.envelope import aad_for
from service.crypto.keyring import Keyring
from service.db.models import AuditRecord

# Key of the PostgreSQL advisory lock that serialises appends to the chain ("CCAUDIT1" as an int64).
AUDIT_CHAIN_LOCK_KEY = int.from_bytes(b"CCAUDIT1", "big") & 0x7FFF_FFFF_FFFF_FFFF
_ACTION_PATTERN = re.compile(r"^[a-z][a-z0-9_.-]{0,63}$")
_RESOURCE_TYPE = re.compile(r"(?:^|/)([A-Z][A-Za-z]{1,63})(?:/[^/]+(?:/_history/[^/]+)?)?/?$")
# A user as the EHR names them: `Practitioner/prac-2`, whether it came as that or as an absolute URL.
_PERSON = re.compile(
    r"(?:^|/)((?:Practitioner|Patient|RelatedPerson|Person)/[A-Za-z0-9\-.]{1,64})(?:/_history/[^/]+)?/?$"
)
CARECANVAS_URN = "urn:carecanvas:"


class AuditAction(StrEnum):
    """What happened. Any lower-case dotted name is accepted; these are the ones the service uses."""

    LAUNCH = "launch"
    LOGIN = "login"
    LOGOUT = "logout"
    TOKEN_USE = "token.use"  # noqa: S105 - an action name, not a secret
    ACCESS_DENIED = "access.denied"
    FHIR_READ = "fhir.read"
    FHIR_SEARCH = "fhir.search"
    READ_CONDITIONS = "conditions.read"
    GENERATE = "generate"  # a clinician asked for a picture (a job and its draft, CareCanvas's objects)
    VIEW = "view"  # a draft, its image or its progress preview
    EDIT_CAPTION = "draft.edit"
    APPROVE = "approve"  # of the draft, in CareCanvas; the chart changes with write_back
    REJECT = "reject"
    WRITE_BACK = "write_back"  # a new DocumentReference in the chart
    SUPERSEDE = "supersede"  # the DocumentReference a new version replaced, marked superseded
    RETRACT = "retract"  # withdrawn: the DocumentReference marked entered-in-error
    RESTORE = "restore"  # a replaced DocumentReference made current again (after its successor was withdrawn)
    GIVE_HANDOUT = (
        "handout.give"  # the patient was given the handout (a Communication where the EHR takes it)
    )
    PORTAL_VIEW = "portal.view"
    # Portraits and their reviewer (an artist or a clinician), in CareCanvas before any write-back.
    PORTRAIT_SEND = "portrait.send"  # a portrait draft put in the reviewer's queue
    PORTRAIT_NOTE = "portrait.note"
    PORTRAIT_SEND_BACK = "portrait.send_back"
    PORTRAIT_APPROVE = "portrait.approve"
    LIKENESS_CHANGE = "portrait.likeness"  # people shown other than the story says, with a note
    STORY_WRITE = "story.write"  # an intake form written to the EHR as a QuestionnaireResponse
    AUDIT_SEARCH = "audit.search"
    AUDIT_EXPORT = "audit.export"
    AUDIT_VERIFY = "audit.verify"
    KEY_GENERATE = "keys.generate"
    KEY_ADD = "keys.add"
    KEY_PROMOTE = "keys.promote"
    KEY_REENCRYPT = "keys.reencrypt"
    KEY_RETIRE = "keys.retire"
    KEY_ROTATE = "keys.rotate"


class AuditOutcome(StrEnum):
    SUCCESS = "success"
    DENIED = "denied"
    FAILURE = "failure"
    ERROR = "error"


class EntityRole(StrEnum):
    """How a record's entity took part: acted on, what it was made from, or the document it replaced."""

    TARGET = "target"
    SOURCE = "source"
    REPLACED = "replaced"


class CareCanvasObject(StrEnum):
    """CareCanvas's own objects, named `urn:carecanvas:<kind>:<id>` (never dressed up as EHR URLs)."""

    JOB = "job"
    DRAFT = "draft"
    IMAGE = "image"
    PREVIEW = "preview"
    HANDOUT = "handout"
    AUDIT_LOG = "audit-log"
    KEY = "key"


def carecanvas_ref(kind: CareCanvasObject, object_id: str) -> str:
    return f"{CARECANVAS_URN}{kind.value}:{object_id}"


@dataclass(frozen=True)
class AuditEntity:
    """One thing a record is about: an EHR reference (`Condition/cond-1`) or a CareCanvas identifier."""

    reference: str
    role: EntityRole = EntityRole.TARGET

    @property
    def is_carecanvas(self) -> bool:
        return self.reference.startswith(CARECANVAS_URN)


def canonical_actor(actor: str | None) -> str | None:
    """`http://ehr/fhir/Practitioner/p-2` and `/Practitioner/p-2` are `Practitioner/p-2`; else as is."""
    if actor is None:
        return None
    match = _PERSON.search(actor.strip())
    return match.group(1) if match else actor


_ACTION_WORDS: dict[str, str] = {
    AuditAction.LAUNCH: "launched CareCanvas",
    AuditAction.LOGIN: "signed in",
    AuditAction.LOGOUT: "signed out",
    AuditAction.ACCESS_DENIED: "was refused access",
    AuditAction.FHIR_READ: "read",
    AuditAction.FHIR_SEARCH: "searched",
    AuditAction.READ_CONDITIONS: "read the patient's conditions",
    AuditAction.GENERATE: "asked for a picture",
    AuditAction.VIEW: "viewed",
    AuditAction.EDIT_CAPTION: "edited the caption or alt text of",
    AuditAction.APPROVE: "approved",
    AuditAction.REJECT: "rejected",
    AuditAction.WRITE_BACK: "wrote to the chart",
    AuditAction.SUPERSEDE: "marked as replaced",
    AuditAction.RETRACT: "withdrew from the chart",
    AuditAction.RESTORE: "made current again",
    AuditAction.GIVE_HANDOUT: "gave the patient the handout",
    AuditAction.PORTAL_VIEW: "viewed in the portal",
    AuditAction.PORTRAIT_SEND: "sent for review",
    AuditAction.PORTRAIT_NOTE: "added a note to",
    AuditAction.PORTRAIT_SEND_BACK: "sent back",
    AuditAction.PORTRAIT_APPROVE: "approved as reviewer",
    AuditAction.LIKENESS_CHANGE: "changed how people are shown in",
    AuditAction.STORY_WRITE: "wrote the patient's story",
    AuditAction.AUDIT_SEARCH: "searched the audit log",
    AuditAction.AUDIT_EXPORT: "exported the audit log",
    AuditAction.AUDIT_VERIFY: "verified the audit log",
}


def describe(
    action: str, *, actor: str | None, outcome: str, entities: Sequence[AuditEntity], resource: str | None
) -> str:
    """A sentence from references only (never names or free text), for records that bring none."""
    who = actor or "CareCanvas"
    words = _ACTION_WORDS.get(action, action)
    targets = [e.reference for e in entities if e.role is EntityRole.TARGET]
    if not targets and resource:
        targets = [resource]
    sources = [e.reference for e in entities if e.role is EntityRole.SOURCE]
    sentence = f"{who} {words}" + (f" {', '.join(targets)}" if targets else "")
    if sources:
        sentence += f" from {', '.join(sources)}"
    if outcome != AuditOutcome.SUCCESS:
        sentence += f" ({outcome})"
    return sentence


class AuditError(Exception):
    """An audit record could not be written or read; the action it belongs to must fail."""


@dataclass(frozen=True)
class AuditRecordRef:
    seq: int
    hash: str
    recorded_at: datetime


@dataclass(frozen=True)
class AuditAppend:
    """One record to append: what `AuditLog.append` takes, as a value (for `append_many`)."""

    action: AuditAction
    outcome: AuditOutcome
    actor: str | None
    patient: str | None
    ehr: str | None
    resource: str | None
    request_id: str | None
    detail: Mapping[str, Any] | None = None
    entities: tuple[AuditEntity, ...] = ()
    description: str | None = None
    actor_display: str | None = None
    role: str | None = None


@dataclass(frozen=True)
class _PreparedAppend:
    entry: AuditAppend
    actor: str | None
    resource: str | None
    sealed_plain: bytes


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
    entities: tuple[AuditEntity, ...] = ()
    description: str | None = None
    actor_display: str | None = None
    role: str | None = None


def _column_values(row: AuditRecord) -> dict[str, Any]:
    return {column.key: getattr(row, column.key) for column in AuditRecord.__table__.columns}


def resource_type_of(resource: str | None) -> str | None:
    """``Condition/cond-1`` or ``https://x/fhir/Condition/c/_history/2`` → ``Condition``; ids stay out."""
    if not resource:
        return None
    if resource.startswith(CARECANVAS_URN):
        # `urn:carecanvas:job:<id>` → `carecanvas:job`: searchable by kind, the id stays sealed.
        return resource.removeprefix("urn:").rsplit(":", 1)[0][:64]
    match = _RESOURCE_TYPE.search(resource.split("?", 1)[0])
    return match.group(1) if match else None


def _patient_key(patient: str) -> str:
    # "Patient/pat-1" and "pat-1" are the same patient for search.
    return patient.removeprefix("Patient/")


def _sealed_body(body: Mapping[str, Any]) -> bytes:
    """What is encrypted into a record: who, about whom, the entities, detail and description."""
    try:
        return json.dumps(body, sort_keys=True, default=str).encode()
    except (TypeError, ValueError):
        raise AuditError("audit detail must be JSON-serialisable") from None


class AuditLog:
    """Appends, verifies and searches the audit chain; ``sink`` keeps signed checkpoints outside the DB.

    ``signing_key`` (from ``CARECANVAS_AUDIT_SIGNING_KEY_FILE``) signs checkpoints; ``verify_key`` (its public
    half, the default) checks them.
    """

    def __init__(
        self,
        keyring: Keyring,
        *,
        sink: CheckpointSink | None = None,
        signing_key: Ed25519PrivateKey | None = None,
        verify_key: Ed25519PublicKey | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._keyring = keyring
        # The checkpoint key is not the keyring's: whoever holds the database and the keyring cannot sign.
        self._verify_key = verify_key or (None if signing_key is None else signing_key.public_key())
        self._clock = clock
        self._checkpointer = Checkpointer(sink, signing_key, clock=clock)
        self._head: tuple[int, str] | None = None  # the head this instance last wrote (a hint, rechecked)

    def patient_digest(self, patient: str) -> str:
        return self._keyring.keyed_digest("patient:" + _patient_key(patient))

    def actor_digest(self, actor: str) -> str:
        return self._keyring.keyed_digest("actor:" + (canonical_actor(actor) or actor))

    async def append(
        self,
        session: AsyncSession,
        *,
        action: AuditAction,
        outcome: AuditOutcome,
        actor: str | None,
        patient: str | None,
        ehr: str | None,
        resource: str | None,
        request_id: str | None,
        detail: Mapping[str, Any] | None = None,
        entities: Sequence[AuditEntity] = (),
        description: str | None = None,
        actor_display: str | None = None,
        role: str | None = None,
    ) -> AuditRecordRef:
        """Append in the caller's transaction (its rollback removes it; our failure fails the caller).

        The actor is stored in its canonical form; entities, description, display and role are sealed.
        """
        entry = AuditAppend(
            action=action,
            outcome=outcome,
            actor=actor,
            patient=patient,
            ehr=ehr,
            resource=resource,
            request_id=request_id,
            detail=detail,
            entities=tuple(entities),
            description=description,
            actor_display=actor_display,
            role=role,
        )
        return await self.append_entry(session, entry)

    async def append_entry(self, session: AsyncSession, entry: AuditAppend) -> AuditRecordRef:
        """`append` for an entry built as a value."""
        prepared = self._prepare(entry)
        await self._lock_chain(session)
        recorded_at = self._clock().astimezone(UTC)
        for fresh in (False, True):
            if fresh or self._head is None:
                self._head = await self.head(session)
            prev_seq, prev_hash = self._head
            row = self._row(prepared, seq=prev_seq + 1, prev_hash=prev_hash, recorded_at=recorded_at)
            # One statement, linked only onto the head we expect (service.audit.linking).
            if await insert_if_head(session, _column_values(row), prev_seq=prev_seq, prev_hash=prev_hash):
                self._head = (row.seq, row.hash)
                return AuditRecordRef(seq=row.seq, hash=row.hash, recorded_at=recorded_at)
            self._head = None
        raise AuditError("the audit chain head changed during the append although the chain was locked")

    async def append_many(
        self, session: AsyncSession, entries: Sequence[AuditAppend]
    ) -> list[AuditRecordRef]:
        """Append several records in the caller's transaction with one read of the head and one INSERT.

        Under the chain lock (SQLite: the writer lock of BEGIN IMMEDIATE; PostgreSQL: the advisory lock taken
        here) the head read here cannot move before the insert, so the records link onto it and each other.
        """
        if not entries:
            return []
        prepared = [self._prepare(entry) for entry in entries]  # every check before anything is written
        await self._lock_chain(session)
        recorded_at = self._clock().astimezone(UTC)
        prev_seq, prev_hash = await self.head(session)
        rows: list[AuditRecord] = []
        for item in prepared:
            row = self._row(item, seq=prev_seq + 1, prev_hash=prev_hash, recorded_at=recorded_at)
            rows.append(row)
            prev_seq, prev_hash = row.seq, row.hash
        await session.execute(insert(AuditRecord), [_column_values(row) for row in rows])
        self._head = (prev_seq, prev_hash)  # a hint: the next append checks it (this may still roll back)
        return [AuditRecordRef(seq=row.seq, hash=row.hash, recorded_at=recorded_at) for row in rows]

    def _prepare(self, entry: AuditAppend) -> _PreparedAppend:
        """Validate, canonicalise and seal one entry (nothing that depends on the chain's head)."""
        actor = canonical_actor(entry.actor)
        resource = entry.resource
        if resource is None and entry.entities:
            resource = entry.entities[0].reference
        for name, value in (("ehr", entry.ehr), ("request_id", entry.request_id)):
            if value is not None and not 0 < len(value) <= 128:
                raise AuditError(f"audit {name} must be 1..128 characters")
        if not _ACTION_PATTERN.match(entry.action):
            raise AuditError("audit action must be a lower-case name like 'fhir.read' (see AuditAction)")
        if entry.outcome not in AuditOutcome.__members__.values():
            raise AuditError(f"audit outcome must be one of {[o.value for o in AuditOutcome]}")
        entities = entry.entities
        sealed_plain = _sealed_body(
            {
                "actor": actor,
                "patient": entry.patient,
                "resource": resource,
                "detail": dict(entry.detail or {}),
                "entities": [{"reference": e.reference, "role": e.role.value} for e in entities],
                "description": entry.description
                or describe(
                    entry.action, actor=actor, outcome=entry.outcome, entities=entities, resource=resource
                ),
                "actor_display": entry.actor_display,
                "role": entry.role,
            }
        )
        return _PreparedAppend(entry=entry, actor=actor, resource=resource, sealed_plain=sealed_plain)

    def _row(
        self, prepared: _PreparedAppend, *, seq: int, prev_hash: str, recorded_at: datetime
    ) -> AuditRecord:
        entry, actor = prepared.entry, prepared.actor
        row = AuditRecord(
            seq=seq,
            recorded_at=recorded_at,
            action=entry.action,
            outcome=entry.outcome,
            actor_digest=None if actor is None else self.actor_digest(actor),
            patient_digest=None if entry.patient is None else self.patient_digest(entry.patient),
            ehr=entry.ehr,
            resource_type=resource_type_of(prepared.resource),
            request_id=entry.request_id,
            sealed=self._keyring.encrypt(prepared.sealed_plain, aad=aad_for("audit_records", seq, "sealed")),
            prev_hash=prev_hash,
        )
        row.hash = record_hash(prev_hash, hashed_fields(row))
        return row

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
        seq, head_hash = await self.head(session)
        try:
            return await self._checkpointer.write(seq=seq, head_hash=head_hash)
        except CheckpointError as error:
            raise AuditError(str(error)) from None

    @property
    def checkpoints_enabled(self) -> bool:
        """Whether a sink and a signing key are configured (else no checkpoint is ever written)."""
        return self._checkpointer.enabled

    async def maybe_checkpoint(self, session: AsyncSession, *, every: int = 100) -> SignedCheckpoint | None:
        """Write a checkpoint when ``every`` records were appended since the last one (call after commits)."""
        if every < 1:
            raise ValueError("every must be ≥ 1")
        if not self._checkpointer.enabled:
            return None
        seq, _ = await self.head(session)
        if not await self._checkpointer.due(seq=seq, every=every):
            return None
        return await self.checkpoint(session)

    async def verify(self, session: AsyncSession) -> VerifyResult:
        """Walk the chain (links, hashes, gaps), then check every signed checkpoint against it."""
        return await verify_chain(session, await self._checkpointer.read(), self._verify_key)

    async def checkpoint_readout(self) -> CheckpointReadout:
        """What the checkpoint sink holds (unverified), and where it is, for status displays."""
        return await self._checkpointer.read()

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

    def entry_of(self, row: AuditRecord) -> AuditEntry:
        """One stored record, decrypted (service.audit.search builds its own SQL and decodes with this)."""
        return self._entry(row)

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
            entities=tuple(
                AuditEntity(reference=str(item["reference"]), role=EntityRole(item["role"]))
                for item in sealed.get("entities") or ()
            ),
            description=sealed.get("description"),
            actor_display=sealed.get("actor_display"),
            role=sealed.get("role"),
        )
