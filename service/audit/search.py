"""Audit search for compliance officers: filters, paging and drill-downs, all in SQL on digests and columns.

Patients and actors are matched by their keyed digests only (docs/decisions/0003); records are decrypted
only for the page being shown. Reports live in ``service.audit.reports``, CSV and BALP export in
``service.audit.export`` (re-exported here).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, time
from enum import StrEnum
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import ColumnElement, func, or_, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import aliased

from service.audit.export import entries_to_balp_bundle, entries_to_balp_ndjson, entries_to_csv
from service.audit.log import AuditAction, AuditEntry, AuditLog, AuditOutcome, AuditRecordRef
from service.db.models import AuditRecord

MAX_PAGE = 500
MAX_EXPORT = 1_000_000
_BATCH = 500
_ACTION = re.compile(r"^[a-z][a-z0-9_.-]{0,63}$")
_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
_MAX_TEXT = 256

__all__ = [
    "MAX_EXPORT",
    "MAX_PAGE",
    "AuditPage",
    "AuditQuery",
    "AuditQueryError",
    "PatientTouch",
    "SortOrder",
    "UserTouch",
    "audit_access",
    "canonical_patient",
    "entries_to_balp_bundle",
    "entries_to_balp_ndjson",
    "entries_to_csv",
    "export_entries",
    "launch_timeline",
    "parse_time",
    "patients_touched_by",
    "search_audit",
    "session_timeline",
    "users_who_touched",
]


class AuditQueryError(ValueError):
    """A search or report was asked with input it cannot answer; the message says what to change."""


class SortOrder(StrEnum):
    NEWEST = "newest"
    OLDEST = "oldest"


def canonical_patient(patient: str) -> str:
    """``pat-1`` or ``Patient/pat-1`` → ``Patient/pat-1`` (both have the same search digest)."""
    value = patient.strip()
    bare = value.removeprefix("Patient/")
    if not _ID.match(bare):
        raise AuditQueryError("patient must be a Patient reference like 'Patient/pat-1' (or its id)")
    return f"Patient/{bare}"


def _check_actor(actor: str) -> str:
    value = actor.strip()
    if not value or len(value) > _MAX_TEXT or any(char.isspace() for char in value):
        raise AuditQueryError("user must be a reference like 'Practitioner/prac-2' (no spaces)")
    return value


def _check_short(name: str, value: str) -> str:
    value = value.strip()
    if not 0 < len(value) <= 128:
        raise AuditQueryError(f"{name} must be 1..128 characters")
    return value


def check_time(name: str, value: datetime | None) -> datetime | None:
    """Aware times only (a naive one is ambiguous across time zones), normalised to UTC."""
    if value is None:
        return None
    if value.tzinfo is None or value.utcoffset() is None:
        raise AuditQueryError(f"{name} must include a time zone (e.g. 2026-12-01T08:00:00+00:00)")
    return value.astimezone(UTC)


def check_range(since: datetime | None, until: datetime | None) -> tuple[datetime | None, datetime | None]:
    since, until = check_time("since", since), check_time("until", until)
    if since is not None and until is not None and since >= until:
        raise AuditQueryError("since must be earlier than until")
    return since, until


def parse_time(name: str, text: str, zone: ZoneInfo) -> datetime:
    """Typed input (a form field, a CLI option) as an aware time.

    ``2026-12-01`` is local midnight, ``2026-12-01T08:00`` local time, and an offset or ``Z`` is kept.
    """
    try:
        value = datetime.fromisoformat(text.strip())
    except ValueError:
        raise AuditQueryError(
            f"{name} {text!r} is not a date or time (use 2026-12-01, 2026-12-01T08:00 or 2026-12-01T08:00Z)"
        ) from None
    if len(text.strip()) == 10:  # a date alone means that day's local midnight
        value = datetime.combine(value.date(), time(0))
    return value if value.tzinfo is not None else value.replace(tzinfo=zone)


@dataclass(frozen=True)
class AuditQuery:
    """What an officer asks for; every filter is optional and all given filters must match.

    ``until`` is exclusive. Validated on construction (AuditQueryError); patient becomes canonical.
    """

    patient: str | None = None
    actor: str | None = None
    action: str | None = None
    outcome: AuditOutcome | None = None
    ehr: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    request_id: str | None = None
    order: SortOrder = SortOrder.NEWEST
    limit: int = 50
    offset: int = 0

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: normalise once, here
        if self.patient is not None:
            set_(self, "patient", canonical_patient(self.patient))
        if self.actor is not None:
            set_(self, "actor", _check_actor(self.actor))
        if self.action is not None:
            action = self.action.strip()
            if not _ACTION.match(action):
                raise AuditQueryError(
                    "action must be a lower-case name like 'fhir.read' "
                    f"(known: {', '.join(a.value for a in AuditAction)})"
                )
            set_(self, "action", action)
        if self.outcome is not None:
            try:
                set_(self, "outcome", AuditOutcome(self.outcome))
            except ValueError:
                raise AuditQueryError(
                    f"outcome must be one of {', '.join(o.value for o in AuditOutcome)}"
                ) from None
        for name in ("ehr", "request_id"):
            value = getattr(self, name)
            if value is not None:
                set_(self, name, _check_short(name.replace("_", " "), value))
        since, until = check_range(self.since, self.until)
        set_(self, "since", since)
        set_(self, "until", until)
        try:
            set_(self, "order", SortOrder(self.order))
        except ValueError:
            raise AuditQueryError("order must be 'newest' or 'oldest'") from None
        if isinstance(self.limit, bool) or not isinstance(self.limit, int) or not 0 < self.limit <= MAX_PAGE:
            raise AuditQueryError(f"limit must be between 1 and {MAX_PAGE}")
        if isinstance(self.offset, bool) or not isinstance(self.offset, int) or self.offset < 0:
            raise AuditQueryError("offset must be 0 or more")

    def filters(self) -> dict[str, str]:
        """The filters that are set, as text (for the audit record of a search and for page headings)."""
        values: dict[str, Any] = {
            "patient": self.patient,
            "actor": self.actor,
            "action": self.action,
            "outcome": self.outcome,
            "ehr": self.ehr,
            "since": self.since.isoformat() if self.since else None,
            "until": self.until.isoformat() if self.until else None,
            "request_id": self.request_id,
        }
        return {name: str(value) for name, value in values.items() if value is not None}

    def at_offset(self, offset: int) -> AuditQuery:
        return replace(self, offset=offset)


@dataclass(frozen=True)
class AuditPage:
    entries: list[AuditEntry]
    total: int  # records matching the filters, over all pages
    query: AuditQuery

    @property
    def next_offset(self) -> int | None:
        following = self.query.offset + self.query.limit
        return following if following < self.total else None

    @property
    def prev_offset(self) -> int | None:
        return max(0, self.query.offset - self.query.limit) if self.query.offset > 0 else None


@dataclass(frozen=True)
class PatientTouch:
    patient: str  # canonical "Patient/<id>"
    count: int
    first_at: datetime
    last_at: datetime


@dataclass(frozen=True)
class UserTouch:
    actor: str
    count: int
    first_at: datetime
    last_at: datetime


def conditions(audit: AuditLog, query: AuditQuery) -> list[ColumnElement[bool]]:
    """SQL WHERE clauses for the query's filters (digests for patient and actor)."""
    clauses: list[ColumnElement[bool]] = []
    if query.patient is not None:
        clauses.append(AuditRecord.patient_digest == audit.patient_digest(query.patient))
    if query.actor is not None:
        clauses.append(AuditRecord.actor_digest == audit.actor_digest(query.actor))
    if query.action is not None:
        clauses.append(AuditRecord.action == query.action)
    if query.outcome is not None:
        clauses.append(AuditRecord.outcome == query.outcome.value)
    if query.ehr is not None:
        clauses.append(AuditRecord.ehr == query.ehr)
    if query.request_id is not None:
        clauses.append(AuditRecord.request_id == query.request_id)
    clauses.extend(time_conditions(query.since, query.until))
    return clauses


def time_conditions(since: datetime | None, until: datetime | None) -> list[ColumnElement[bool]]:
    clauses: list[ColumnElement[bool]] = []
    if since is not None:
        clauses.append(AuditRecord.recorded_at >= since)
    if until is not None:
        clauses.append(AuditRecord.recorded_at < until)
    return clauses


async def count_where(db: AsyncSession, clauses: Sequence[ColumnElement[bool]]) -> int:
    total = await db.scalar(select(func.count()).select_from(AuditRecord).where(*clauses))
    return int(total or 0)


async def search_audit(db: AsyncSession, audit: AuditLog, query: AuditQuery) -> AuditPage:
    """One page of decrypted records matching the query, and how many match in all."""
    clauses = conditions(audit, query)
    order = AuditRecord.seq.desc() if query.order is SortOrder.NEWEST else AuditRecord.seq.asc()
    rows = (
        (
            await db.execute(
                select(AuditRecord).where(*clauses).order_by(order).limit(query.limit).offset(query.offset)
            )
        )
        .scalars()
        .all()
    )
    entries = [audit.entry_of(row) for row in rows]
    return AuditPage(entries=entries, total=await count_where(db, clauses), query=query)


async def export_entries(
    db: AsyncSession, audit: AuditLog, query: AuditQuery, *, max_records: int = MAX_EXPORT
) -> list[AuditEntry]:
    """Every record matching the filters (paging ignored), oldest first, at most ``max_records``.

    Fixed to the chain head at the start, so records appended meanwhile (e.g. the export's own audit
    record) are not part of it.
    """
    if not 0 < max_records <= MAX_EXPORT:
        raise AuditQueryError(f"export limit must be between 1 and {MAX_EXPORT}")
    head, _ = await audit.head(db)
    clauses = [*conditions(audit, query), AuditRecord.seq <= head]
    entries: list[AuditEntry] = []
    after = 0
    while len(entries) < max_records:
        batch = min(_BATCH, max_records - len(entries))
        rows = (
            (
                await db.execute(
                    select(AuditRecord)
                    .where(*clauses, AuditRecord.seq > after)
                    .order_by(AuditRecord.seq)
                    .limit(batch)
                )
            )
            .scalars()
            .all()
        )
        entries.extend(audit.entry_of(row) for row in rows)
        if len(rows) < batch:
            break
        after = rows[-1].seq
        db.expunge_all()  # a long export must not keep every ORM row in the session
    return entries


async def _touches(
    db: AsyncSession,
    audit: AuditLog,
    *,
    match: ColumnElement[bool],
    group: Any,
    since: datetime | None,
    until: datetime | None,
    limit: int,
) -> list[tuple[AuditEntry, int, datetime, datetime]]:
    """Grouped counts per digest; one record of each group is decrypted to name the group."""
    since, until = check_range(since, until)
    if not 0 < limit <= MAX_PAGE:
        raise AuditQueryError(f"limit must be between 1 and {MAX_PAGE}")
    grouped = (
        await db.execute(
            select(
                func.count(),
                func.min(AuditRecord.recorded_at),
                func.max(AuditRecord.recorded_at),
                func.max(AuditRecord.seq),
            )
            .where(match, group.is_not(None), *time_conditions(since, until))
            .group_by(group)
            .order_by(func.max(AuditRecord.seq).desc())
            .limit(limit)
        )
    ).all()
    if not grouped:
        return []
    rows = (
        (await db.execute(select(AuditRecord).where(AuditRecord.seq.in_([g[3] for g in grouped]))))
        .scalars()
        .all()
    )
    by_seq = {row.seq: audit.entry_of(row) for row in rows}
    # min/max over a TypeDecorator column come back untyped on SQLite: read them as the column would.
    return [(by_seq[seq], int(count), _as_utc(first), _as_utc(last)) for count, first, last, seq in grouped]


def _as_utc(value: datetime | str) -> datetime:
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


async def patients_touched_by(
    db: AsyncSession,
    audit: AuditLog,
    actor: str,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    limit: int = MAX_PAGE,
) -> list[PatientTouch]:
    """The patients one user's records name, with how often and when (most recent first)."""
    digest = audit.actor_digest(_check_actor(actor))
    groups = await _touches(
        db,
        audit,
        match=AuditRecord.actor_digest == digest,
        group=AuditRecord.patient_digest,
        since=since,
        until=until,
        limit=limit,
    )
    return [
        PatientTouch(
            patient=canonical_patient(entry.patient or ""), count=count, first_at=first, last_at=last
        )
        for entry, count, first, last in groups
    ]


async def users_who_touched(
    db: AsyncSession,
    audit: AuditLog,
    patient: str,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    limit: int = MAX_PAGE,
) -> list[UserTouch]:
    """Everyone whose records name this patient, with how often and when (most recent first)."""
    digest = audit.patient_digest(canonical_patient(patient))
    groups = await _touches(
        db,
        audit,
        match=AuditRecord.patient_digest == digest,
        group=AuditRecord.actor_digest,
        since=since,
        until=until,
        limit=limit,
    )
    return [
        UserTouch(actor=entry.actor or "", count=count, first_at=first, last_at=last)
        for entry, count, first, last in groups
    ]


async def session_timeline(
    db: AsyncSession, audit: AuditLog, request_or_session_id: str, *, limit: int = MAX_PAGE
) -> list[AuditEntry]:
    """Every record carrying this request id, in chain order."""
    request_id = _check_short("request id", request_or_session_id)
    if not 0 < limit <= MAX_PAGE:
        raise AuditQueryError(f"limit must be between 1 and {MAX_PAGE}")
    rows = (
        (
            await db.execute(
                select(AuditRecord)
                .where(AuditRecord.request_id == request_id)
                .order_by(AuditRecord.seq)
                .limit(limit)
            )
        )
        .scalars()
        .all()
    )
    return [audit.entry_of(row) for row in rows]


def _same_user_and_ehr(model: Any, launch: AuditRecord) -> list[ColumnElement[bool]]:
    # ``model`` is AuditRecord or an alias of it (for the subquery).
    return [
        model.actor_digest == launch.actor_digest
        if launch.actor_digest is not None
        else model.actor_digest.is_(None),
        model.ehr == launch.ehr if launch.ehr is not None else model.ehr.is_(None),
    ]


def launch_session_conditions(launch: AuditRecord) -> list[ColumnElement[bool]]:
    """SQL clauses for the records of a launch's session: the launch itself and its user's later records
    on that EHR, up to that user's next launch there (one query: the bound is a scalar subquery)."""
    later = aliased(AuditRecord)
    next_launch = (
        select(func.min(later.seq))
        .where(
            *_same_user_and_ehr(later, launch),
            later.action == AuditAction.LAUNCH.value,
            later.seq > launch.seq,
        )
        .scalar_subquery()
    )
    return [
        *_same_user_and_ehr(AuditRecord, launch),
        AuditRecord.seq >= launch.seq,
        or_(next_launch.is_(None), AuditRecord.seq < next_launch),
    ]


async def launch_timeline(
    db: AsyncSession, audit: AuditLog, launch_seq: int, *, limit: int = MAX_PAGE
) -> list[AuditEntry]:
    """One clinician session as the log shows it: a launch record and what its user did on that EHR after it.

    The records have no session id, so a session is the launch and every later record of the same user
    (actor digest) and EHR up to that user's next launch there. Two sessions of one user at the same time
    on the same EHR (two browser tabs) therefore show as one.
    """
    if not 0 < limit <= MAX_PAGE:
        raise AuditQueryError(f"limit must be between 1 and {MAX_PAGE}")
    launch = await db.scalar(select(AuditRecord).where(AuditRecord.seq == launch_seq))
    if launch is None or launch.action != AuditAction.LAUNCH.value:
        raise AuditQueryError(f"record {launch_seq} is not a launch")
    clauses = launch_session_conditions(launch)
    rows = (
        (await db.execute(select(AuditRecord).where(*clauses).order_by(AuditRecord.seq).limit(limit)))
        .scalars()
        .all()
    )
    return [audit.entry_of(row) for row in rows]


async def audit_access(
    db: AsyncSession,
    audit: AuditLog,
    *,
    action: AuditAction,
    actor: str,
    query: AuditQuery | None,
    count: int,
    request_id: str | None = None,
    detail: Mapping[str, Any] | None = None,
) -> AuditRecordRef:
    """The audit record of an officer's search, view or export (in the caller's transaction).

    The searched patient is the record's patient, so the patient's own history shows who looked them up.
    """
    return await audit.append(
        db,
        action=action,
        outcome=AuditOutcome.SUCCESS,
        actor=actor,
        patient=None if query is None else query.patient,
        ehr=None,
        resource="AuditEvent",
        request_id=request_id,
        detail={"filters": {} if query is None else query.filters(), "count": count, **(detail or {})},
    )
