"""Suspicious-access reports over the audit log; each states its rule and threshold in plain words.

Selection happens in SQL on plaintext columns and digests. Local-time rules (after hours, per day) are
turned into UTC intervals here, so the same SQL runs on SQLite and PostgreSQL and daylight-saving days
are right. Only the records a report shows are decrypted (and launch records, whose detail says whether
an encounter came with the launch).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, time, timedelta
from enum import StrEnum
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from sqlalchemy import ColumnElement, and_, case, false, func, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from service.audit.log import AuditAction, AuditEntry, AuditLog, AuditOutcome
from service.audit.search import (
    AuditQueryError,
    check_range,
    count_where,
    launch_session_conditions,
    time_conditions,
)
from service.db.models import AuditRecord
from service.settings import Settings

MAX_REPORT_DAYS = 366
MAX_ROWS = 500
_BATCH = 500


class ReportKind(StrEnum):
    AFTER_HOURS = "after-hours"
    MANY_PATIENTS = "many-patients"
    NO_ENCOUNTER = "no-encounter"
    FAILED_OR_DENIED = "failed-or-denied"
    EXPORTS_AND_KEY_OPS = "exports-and-key-operations"


@dataclass(frozen=True)
class ReportSettings:
    """Thresholds of the reports (from Settings: CARECANVAS_AUDIT_*)."""

    timezone: str = "UTC"
    after_hours_start: time = time(20, 0)
    after_hours_end: time = time(7, 0)
    many_patients_per_day: int = 20
    max_rows: int = MAX_ROWS

    def __post_init__(self) -> None:
        try:
            ZoneInfo(self.timezone)
        except (ZoneInfoNotFoundError, ValueError):
            raise AuditQueryError(f"unknown time zone {self.timezone!r}") from None
        if self.after_hours_start == self.after_hours_end:
            raise AuditQueryError("the after-hours window must not start and end at the same time")
        if self.many_patients_per_day < 1:
            raise AuditQueryError("the many-patients threshold must be 1 or more")
        if not 0 < self.max_rows <= MAX_ROWS:
            raise AuditQueryError(f"a report shows between 1 and {MAX_ROWS} rows")

    @classmethod
    def from_settings(cls, settings: Settings) -> ReportSettings:
        return cls(
            timezone=settings.audit_report_timezone,
            after_hours_start=settings.audit_after_hours_start,
            after_hours_end=settings.audit_after_hours_end,
            many_patients_per_day=settings.audit_many_patients_per_day,
        )

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)


@dataclass(frozen=True)
class ReportRule:
    kind: ReportKind
    title: str
    rule_text: str  # the rule and its threshold in plain words
    thresholds: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ReportRow:
    """One finding: a single record, or (many patients) one user's day."""

    summary: str
    actor: str | None
    patient: str | None
    action: str | None
    outcome: str | None
    count: int
    first_at: datetime
    last_at: datetime
    seqs: tuple[int, ...]


@dataclass(frozen=True)
class Report:
    rule: ReportRule
    since: datetime
    until: datetime
    rows: list[ReportRow]
    total: int  # findings in all; more than len(rows) when the report was cut at max_rows

    @property
    def truncated(self) -> bool:
        return self.total > len(self.rows)


def _hhmm(value: time) -> str:
    return value.strftime("%H:%M")


def report_rule(kind: ReportKind, rules: ReportSettings) -> ReportRule:
    """The rule of one report, in words an officer can check against the rows."""
    zone = rules.timezone
    if kind is ReportKind.AFTER_HOURS:
        window = f"{_hhmm(rules.after_hours_start)}–{_hhmm(rules.after_hours_end)}"
        return ReportRule(
            kind,
            "After-hours access",
            f"Every record of a user touching a patient's data between {window} ({zone} time), "
            "whatever its outcome.",
            {"window": window, "timezone": zone},
        )
    if kind is ReportKind.MANY_PATIENTS:
        threshold = rules.many_patients_per_day
        return ReportRule(
            kind,
            "Users touching unusually many patients",
            f"Users whose records name more than {threshold} different patients in one calendar day "
            f"({zone} time).",
            {"patients_per_day": str(threshold), "timezone": zone},
        )
    if kind is ReportKind.NO_ENCOUNTER:
        return ReportRule(
            kind,
            "Access with no encounter in the launch",
            "Successful EHR launches into a patient's chart with no encounter: the launch record names "
            "none and the user read no Encounter of that patient before their next launch "
            "(patient portal sign-ins are not counted).",
        )
    if kind is ReportKind.FAILED_OR_DENIED:
        return ReportRule(
            kind,
            "Failed and denied actions",
            "Every record whose outcome is denied, failure or error.",
            {"outcomes": "denied, failure, error"},
        )
    return ReportRule(
        kind,
        "Exports and key operations",
        "Every audit export (including pushes to an EHR) and every key operation (actions starting 'keys.').",
        {"actions": f"{AuditAction.AUDIT_EXPORT.value}, keys.*"},
    )


def _local_days(since: datetime, until: datetime, zone: ZoneInfo) -> list[tuple[date, datetime, datetime]]:
    """Each local calendar day overlapping [since, until) with its UTC bounds (clipped to the range)."""
    day = since.astimezone(zone).date()
    last = until.astimezone(zone).date()
    days = []
    while day <= last:
        start = datetime.combine(day, time(0), tzinfo=zone).astimezone(UTC)
        end = datetime.combine(day + timedelta(days=1), time(0), tzinfo=zone).astimezone(UTC)
        lower, upper = max(start, since), min(end, until)
        if lower < upper:
            days.append((day, lower, upper))
        day += timedelta(days=1)
    return days


def after_hours_intervals(
    since: datetime, until: datetime, rules: ReportSettings
) -> list[tuple[datetime, datetime]]:
    """The after-hours windows overlapping [since, until), in UTC (a window may span midnight)."""
    zone = rules.zone
    start_t, end_t = rules.after_hours_start, rules.after_hours_end
    intervals = []
    day = since.astimezone(zone).date() - timedelta(days=1)
    last = until.astimezone(zone).date()
    while day <= last:
        end_day = day + timedelta(days=1) if start_t > end_t else day
        start = datetime.combine(day, start_t, tzinfo=zone).astimezone(UTC)
        end = datetime.combine(end_day, end_t, tzinfo=zone).astimezone(UTC)
        lower, upper = max(start, since), min(end, until)
        if lower < upper:
            intervals.append((lower, upper))
        day += timedelta(days=1)
    return intervals


def _in_any(intervals: Sequence[tuple[datetime, datetime]]) -> ColumnElement[bool]:
    if not intervals:
        return false()
    return or_(
        *(
            and_(AuditRecord.recorded_at >= lower, AuditRecord.recorded_at < upper)
            for lower, upper in intervals
        )
    )


def _summary_of(entry: AuditEntry) -> str:
    who = entry.actor or "an unnamed user"
    what = f"{entry.action} ({entry.outcome})"
    return f"{who}: {what}" + (f" on {entry.patient}" if entry.patient else "")


def _single(entry: AuditEntry, summary: str | None = None) -> ReportRow:
    return ReportRow(
        summary=summary or _summary_of(entry),
        actor=entry.actor,
        patient=entry.patient,
        action=entry.action,
        outcome=entry.outcome,
        count=1,
        first_at=entry.recorded_at,
        last_at=entry.recorded_at,
        seqs=(entry.seq,),
    )


async def _record_rows(
    db: AsyncSession, audit: AuditLog, clauses: Sequence[ColumnElement[bool]], rules: ReportSettings
) -> tuple[list[ReportRow], int]:
    rows = (
        (
            await db.execute(
                select(AuditRecord).where(*clauses).order_by(AuditRecord.seq).limit(rules.max_rows)
            )
        )
        .scalars()
        .all()
    )
    return [_single(audit.entry_of(row)) for row in rows], await count_where(db, clauses)


async def _after_hours(
    db: AsyncSession, audit: AuditLog, since: datetime, until: datetime, rules: ReportSettings
) -> tuple[list[ReportRow], int]:
    clauses = [
        AuditRecord.actor_digest.is_not(None),
        AuditRecord.patient_digest.is_not(None),
        _in_any(after_hours_intervals(since, until, rules)),
    ]
    rows, total = await _record_rows(db, audit, clauses, rules)
    zone = rules.zone
    return [
        replace(row, summary=f"{row.summary} at {row.first_at.astimezone(zone):%H:%M} {rules.timezone} time")
        for row in rows
    ], total


async def _many_patients(
    db: AsyncSession, audit: AuditLog, since: datetime, until: datetime, rules: ReportSettings
) -> tuple[list[ReportRow], int]:
    days = _local_days(since, until, rules.zone)
    # The local day of each record as an index into `days`, computed in SQL from UTC bounds. A subquery,
    # so GROUP BY names a column (PostgreSQL would not match two copies of the parameterised CASE).
    day_index = case(
        *((AuditRecord.recorded_at < upper, index) for index, (_, _, upper) in enumerate(days)),
        else_=len(days),
    )
    touches = (
        select(
            AuditRecord.actor_digest.label("actor_digest"),
            AuditRecord.patient_digest.label("patient_digest"),
            AuditRecord.seq.label("seq"),
            day_index.label("day"),
        )
        .where(
            AuditRecord.actor_digest.is_not(None),
            AuditRecord.patient_digest.is_not(None),
            *time_conditions(since, until),
        )
        .subquery()
    )
    patients = func.count(func.distinct(touches.c.patient_digest))
    grouped = (
        await db.execute(
            select(touches.c.actor_digest, touches.c.day, patients, func.count(), func.max(touches.c.seq))
            .group_by(touches.c.actor_digest, touches.c.day)
            .having(patients > rules.many_patients_per_day)
            .order_by(patients.desc(), func.max(touches.c.seq).desc())
        )
    ).all()
    total = len(grouped)
    rows = []
    for actor_digest, index, patient_count, record_count, _ in grouped[: rules.max_rows]:
        day, lower, upper = days[index]
        records = (
            await db.execute(
                select(AuditRecord.seq, AuditRecord.recorded_at)
                .where(
                    AuditRecord.actor_digest == actor_digest,
                    AuditRecord.patient_digest.is_not(None),
                    AuditRecord.recorded_at >= lower,
                    AuditRecord.recorded_at < upper,
                )
                .order_by(AuditRecord.seq)
            )
        ).all()
        first = await db.scalar(select(AuditRecord).where(AuditRecord.seq == records[0].seq))
        actor = audit.entry_of(first).actor if first is not None else None
        rows.append(
            ReportRow(
                summary=f"{actor or 'an unnamed user'} touched {patient_count} patients on {day.isoformat()} "
                f"({record_count} records; threshold {rules.many_patients_per_day})",
                actor=actor,
                patient=None,
                action=None,
                outcome=None,
                count=int(patient_count),
                first_at=records[0].recorded_at,
                last_at=records[-1].recorded_at,
                seqs=tuple(record.seq for record in records),
            )
        )
    return rows, total


def _names_an_encounter(entry: AuditEntry) -> bool:
    detail = entry.detail
    if detail.get("encounter"):
        return True
    # Records written with entities (the audit vocabulary) name the encounter as one of them.
    entities = getattr(entry, "entities", None) or ()
    return any("Encounter/" in str(getattr(item, "reference", item)) for item in entities)


async def _encounter_read_in_session(db: AsyncSession, launch: AuditRecord) -> bool:
    # The workspace reads the launch's Encounter (and audits it) only when the launch named one.
    found = await db.scalar(
        select(AuditRecord.seq)
        .where(
            *launch_session_conditions(launch),
            AuditRecord.patient_digest == launch.patient_digest,
            AuditRecord.resource_type == "Encounter",
        )
        .limit(1)
    )
    return found is not None


async def _no_encounter(
    db: AsyncSession, audit: AuditLog, since: datetime, until: datetime, rules: ReportSettings
) -> tuple[list[ReportRow], int]:
    clauses = [
        AuditRecord.action == AuditAction.LAUNCH.value,
        AuditRecord.outcome == AuditOutcome.SUCCESS.value,
        AuditRecord.patient_digest.is_not(None),
        *time_conditions(since, until),
    ]
    # Whether an encounter came with the launch is in the sealed detail: launches are decrypted in batches.
    rows: list[ReportRow] = []
    total = 0
    after = 0
    while True:
        batch = (
            (
                await db.execute(
                    select(AuditRecord)
                    .where(*clauses, AuditRecord.seq > after)
                    .order_by(AuditRecord.seq)
                    .limit(_BATCH)
                )
            )
            .scalars()
            .all()
        )
        for record in batch:
            entry = audit.entry_of(record)
            if entry.detail.get("kind") == "portal" or _names_an_encounter(entry):
                continue
            if await _encounter_read_in_session(db, record):
                continue
            total += 1
            if len(rows) < rules.max_rows:
                rows.append(
                    _single(
                        entry,
                        f"{entry.actor or 'an unnamed user'} opened {entry.patient} "
                        "with no encounter in the launch",
                    )
                )
        if len(batch) < _BATCH:
            return rows, total
        after = batch[-1].seq
        db.expunge_all()


async def _failed_or_denied(
    db: AsyncSession, audit: AuditLog, since: datetime, until: datetime, rules: ReportSettings
) -> tuple[list[ReportRow], int]:
    bad = [AuditOutcome.DENIED.value, AuditOutcome.FAILURE.value, AuditOutcome.ERROR.value]
    return await _record_rows(
        db, audit, [AuditRecord.outcome.in_(bad), *time_conditions(since, until)], rules
    )


async def _exports_and_key_ops(
    db: AsyncSession, audit: AuditLog, since: datetime, until: datetime, rules: ReportSettings
) -> tuple[list[ReportRow], int]:
    wanted = or_(AuditRecord.action == AuditAction.AUDIT_EXPORT.value, AuditRecord.action.like("keys.%"))
    return await _record_rows(db, audit, [wanted, *time_conditions(since, until)], rules)


_Runner = Callable[
    [AsyncSession, AuditLog, datetime, datetime, ReportSettings], Awaitable[tuple[list[ReportRow], int]]
]
_RUNNERS: dict[ReportKind, _Runner] = {
    ReportKind.AFTER_HOURS: _after_hours,
    ReportKind.MANY_PATIENTS: _many_patients,
    ReportKind.NO_ENCOUNTER: _no_encounter,
    ReportKind.FAILED_OR_DENIED: _failed_or_denied,
    ReportKind.EXPORTS_AND_KEY_OPS: _exports_and_key_ops,
}


async def run_report(
    db: AsyncSession,
    audit: AuditLog,
    kind: ReportKind,
    *,
    since: datetime,
    until: datetime,
    rules: ReportSettings,
) -> Report:
    """One report over [since, until) (at most MAX_REPORT_DAYS days), with its rule in words."""
    try:
        kind = ReportKind(kind)
    except ValueError:
        raise AuditQueryError(f"report must be one of {', '.join(k.value for k in ReportKind)}") from None
    checked_since, checked_until = check_range(since, until)
    if checked_since is None or checked_until is None:
        raise AuditQueryError("a report needs both since and until")
    if checked_until - checked_since > timedelta(days=MAX_REPORT_DAYS):
        raise AuditQueryError(f"a report covers at most {MAX_REPORT_DAYS} days")
    runner = _RUNNERS[kind]
    rows, total = await runner(db, audit, checked_since, checked_until, rules)
    return Report(
        rule=report_rule(kind, rules), since=checked_since, until=checked_until, rows=rows, total=total
    )
