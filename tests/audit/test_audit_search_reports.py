"""Suspicious-access reports on SQLite and PostgreSQL: each finds what it should, skips what it should not."""

from __future__ import annotations

from datetime import UTC, datetime, time, timedelta

import pytest
from pydantic import ValidationError

from service.audit import AuditLog
from service.audit.reports import (
    MAX_REPORT_DAYS,
    ReportKind,
    ReportSettings,
    after_hours_intervals,
    report_rule,
    run_report,
)
from service.audit.search import AuditQueryError
from service.crypto import Keyring
from service.crypto.keyring import new_key_material
from service.settings import Settings

DAY = datetime(2026, 11, 30, tzinfo=UTC)  # a Monday; Europe/Berlin is UTC+1 then
SINCE, UNTIL = DAY - timedelta(days=1), DAY + timedelta(days=3)
RULES = ReportSettings(many_patients_per_day=2)


class Clock:
    def __init__(self) -> None:
        self.now = DAY

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def audit(clock: Clock) -> AuditLog:
    return AuditLog(Keyring(new_key_material()), clock=clock)


@pytest.fixture
def add(audit, sessionmaker, clock):
    async def add(
        at,
        *,
        action="fhir.read",
        outcome="success",
        actor="Practitioner/prac-1",
        patient="pat-1",
        resource=None,
        **detail,
    ):
        clock.now = at
        async with sessionmaker() as db, db.begin():
            ref = await audit.append(
                db,
                action=action,
                outcome=outcome,
                actor=actor,
                patient=patient,
                ehr="sandbox",
                resource=resource,
                request_id=None,
                detail=detail,
            )
        return ref.seq

    return add


async def report(sessionmaker, audit, kind, rules=RULES, since=SINCE, until=UNTIL):
    async with sessionmaker() as db:
        return await run_report(db, audit, kind, since=since, until=until, rules=rules)


def hours(h: float) -> datetime:
    return DAY + timedelta(hours=h)


async def test_after_hours_finds_night_access_and_not_day_access(audit, sessionmaker, add):
    day = await add(hours(12))
    evening = await add(hours(19.5))  # 19:30 UTC = 20:30 in Berlin
    night = await add(hours(22.5), actor="Practitioner/prac-2", patient="pat-2")
    early = await add(hours(30))  # 06:00 UTC the next morning
    no_patient = await add(hours(23), action="audit.export", patient=None)

    utc = await report(sessionmaker, audit, ReportKind.AFTER_HOURS)
    berlin = await report(
        sessionmaker, audit, ReportKind.AFTER_HOURS, ReportSettings(timezone="Europe/Berlin")
    )

    assert [row.seqs for row in utc.rows] == [(night,), (early,)]
    assert utc.total == 2
    assert not utc.truncated
    assert utc.rows[0].actor == "Practitioner/prac-2"
    assert utc.rows[0].patient == "pat-2"
    assert "22:30" in utc.rows[0].summary
    # 06:00 UTC is 07:00 in Berlin: the window has ended there; 19:30 UTC is after 20:00 there.
    assert [row.seqs for row in berlin.rows] == [(evening,), (night,)]
    assert day not in {s for row in berlin.rows for s in row.seqs}
    assert no_patient not in {s for row in utc.rows for s in row.seqs}
    assert utc.rule.rule_text == (
        "Every record of a user touching a patient's data between 20:00–07:00 (UTC time), "
        "whatever its outcome."
    )


def test_after_hours_windows_follow_daylight_saving_time():
    # 2026-03-29: Berlin moves from UTC+1 to UTC+2, so the evening window starts an hour earlier in UTC.
    rules = ReportSettings(timezone="Europe/Berlin")
    since = datetime(2026, 3, 28, 12, tzinfo=UTC)
    intervals = after_hours_intervals(since, since + timedelta(days=2), rules)
    assert intervals == [
        (datetime(2026, 3, 28, 19, tzinfo=UTC), datetime(2026, 3, 29, 5, tzinfo=UTC)),
        (datetime(2026, 3, 29, 18, tzinfo=UTC), datetime(2026, 3, 30, 5, tzinfo=UTC)),
    ]
    # A window inside one day (e.g. 00:00–06:00) works too.
    inside = after_hours_intervals(
        since, since + timedelta(days=1), ReportSettings(after_hours_start=time(0), after_hours_end=time(6))
    )
    assert inside == [(datetime(2026, 3, 29, 0, tzinfo=UTC), datetime(2026, 3, 29, 6, tzinfo=UTC))]


async def test_many_patients_counts_distinct_patients_per_local_day(audit, sessionmaker, add):
    # prac-1: three patients on Monday (threshold 2) -> reported; prac-2: two patients, one twice -> not.
    busy = [await add(hours(9 + i), patient=f"pat-{i}") for i in range(3)]
    await add(hours(10), actor="Practitioner/prac-2", patient="pat-1")
    await add(hours(11), actor="Practitioner/prac-2", patient="pat-2")
    await add(hours(12), actor="Practitioner/prac-2", patient="pat-2")
    # prac-3: three patients, but across two days.
    await add(hours(10), actor="Practitioner/prac-3", patient="pat-1")
    await add(hours(11), actor="Practitioner/prac-3", patient="pat-2")
    await add(hours(34), actor="Practitioner/prac-3", patient="pat-3")

    result = await report(sessionmaker, audit, ReportKind.MANY_PATIENTS)

    assert result.total == 1
    [row] = result.rows
    assert row.actor == "Practitioner/prac-1"
    assert row.count == 3
    assert row.seqs == tuple(busy)
    assert row.summary == "Practitioner/prac-1 touched 3 patients on 2026-11-30 (3 records; threshold 2)"
    assert result.rule.thresholds == {"patients_per_day": "2", "timezone": "UTC"}
    assert "more than 2 different patients in one calendar day" in result.rule.rule_text


async def test_many_patients_days_are_local_days(audit, sessionmaker, add):
    # 23:30 UTC Monday and 00:30 UTC Tuesday: two UTC days, but both Tuesday in Berlin.
    await add(hours(23.5), patient="pat-1")
    await add(hours(24.5), patient="pat-2")
    await add(hours(25), patient="pat-3")
    utc = await report(sessionmaker, audit, ReportKind.MANY_PATIENTS)
    berlin = await report(
        sessionmaker,
        audit,
        ReportKind.MANY_PATIENTS,
        ReportSettings(timezone="Europe/Berlin", many_patients_per_day=2),
    )
    assert utc.rows == []
    [row] = berlin.rows
    assert row.count == 3
    assert "2026-12-01" in row.summary


async def test_no_encounter_finds_launches_without_one(audit, sessionmaker, add):
    bare = await add(hours(9), action="launch", kind="ehr", role="clinician")
    await add(hours(10), action="launch", kind="ehr", role="clinician", encounter="enc-1")
    await add(hours(11), action="launch", kind="portal", actor="Patient/pat-1")
    await add(hours(12), action="launch", outcome="denied", kind="ehr")
    await add(hours(13), action="fhir.read")

    result = await report(sessionmaker, audit, ReportKind.NO_ENCOUNTER)

    assert [row.seqs for row in result.rows] == [(bare,)]
    assert result.rows[0].summary == "Practitioner/prac-1 opened pat-1 with no encounter in the launch"


async def test_failed_or_denied_lists_every_bad_outcome(audit, sessionmaker, add):
    await add(hours(9))
    denied = await add(hours(10), action="launch", outcome="denied")
    failed = await add(hours(11), action="write_back", outcome="failure")
    errored = await add(hours(12), action="generate", outcome="error")

    result = await report(sessionmaker, audit, ReportKind.FAILED_OR_DENIED)

    assert [row.seqs for row in result.rows] == [(denied,), (failed,), (errored,)]
    assert [row.outcome for row in result.rows] == ["denied", "failure", "error"]
    assert result.rule.rule_text == "Every record whose outcome is denied, failure or error."


async def test_exports_and_key_operations(audit, sessionmaker, add):
    export = await add(hours(9), action="audit.export", patient=None, actor="cli")
    rotate = await add(hours(10), action="keys.rotate", patient=None, actor="cli")
    await add(hours(11), action="audit.search", patient=None)
    await add(hours(12), action="keysmith.read")  # only the "keys." family counts

    result = await report(sessionmaker, audit, ReportKind.EXPORTS_AND_KEY_OPS)

    assert [row.seqs for row in result.rows] == [(export,), (rotate,)]


async def test_a_report_only_covers_its_time_range(audit, sessionmaker, add):
    await add(hours(10), action="launch", outcome="denied")
    inside = await add(hours(40), action="launch", outcome="denied")
    result = await report(sessionmaker, audit, ReportKind.FAILED_OR_DENIED, since=hours(24), until=hours(48))
    assert [row.seqs for row in result.rows] == [(inside,)]


async def test_rows_are_capped_and_the_total_says_so(audit, sessionmaker, add):
    for index in range(4):
        await add(hours(index), outcome="denied")
    result = await report(sessionmaker, audit, ReportKind.FAILED_OR_DENIED, ReportSettings(max_rows=3))
    assert len(result.rows) == 3
    assert result.total == 4
    assert result.truncated


def test_every_report_explains_its_rule():
    for kind in ReportKind:
        rule = report_rule(kind, RULES)
        assert rule.kind is kind
        assert rule.title
        assert rule.rule_text.endswith(".")


def test_thresholds_come_from_settings(monkeypatch):
    monkeypatch.setenv("CARECANVAS_AUDIT_REPORT_TIMEZONE", "America/New_York")
    monkeypatch.setenv("CARECANVAS_AUDIT_AFTER_HOURS_START", "19:00")
    monkeypatch.setenv("CARECANVAS_AUDIT_AFTER_HOURS_END", "06:30")
    monkeypatch.setenv("CARECANVAS_AUDIT_MANY_PATIENTS_PER_DAY", "40")
    rules = ReportSettings.from_settings(Settings())
    assert rules == ReportSettings(
        timezone="America/New_York",
        after_hours_start=time(19),
        after_hours_end=time(6, 30),
        many_patients_per_day=40,
    )
    assert "19:00–06:30 (America/New_York time)" in report_rule(ReportKind.AFTER_HOURS, rules).rule_text
    monkeypatch.setenv("CARECANVAS_AUDIT_REPORT_TIMEZONE", "Mars/Olympus")
    with pytest.raises(ValidationError, match="unknown time zone 'Mars/Olympus'"):
        Settings()


async def test_bad_report_input_is_a_clear_error(audit, sessionmaker):
    async with sessionmaker() as db:
        with pytest.raises(AuditQueryError, match="since must be earlier than until"):
            await run_report(db, audit, ReportKind.AFTER_HOURS, since=UNTIL, until=SINCE, rules=RULES)
        with pytest.raises(AuditQueryError, match=f"at most {MAX_REPORT_DAYS} days"):
            await run_report(
                db, audit, ReportKind.AFTER_HOURS, since=SINCE, until=SINCE + timedelta(days=400), rules=RULES
            )
        with pytest.raises(AuditQueryError, match="report must be one of"):
            await run_report(db, audit, "gossip", since=SINCE, until=UNTIL, rules=RULES)  # type: ignore[arg-type]
        with pytest.raises(AuditQueryError, match="time zone"):
            await run_report(
                db, audit, ReportKind.AFTER_HOURS, since=SINCE.replace(tzinfo=None), until=UNTIL, rules=RULES
            )
    with pytest.raises(AuditQueryError, match="must not start and end at the same time"):
        ReportSettings(after_hours_start=time(7), after_hours_end=time(7))
    with pytest.raises(AuditQueryError, match="unknown time zone 'Mars/Olympus'"):
        ReportSettings(timezone="Mars/Olympus")
    with pytest.raises(AuditQueryError, match="threshold must be 1 or more"):
        ReportSettings(many_patients_per_day=0)


async def test_no_encounter_counts_an_encounter_read_in_that_launchs_session(audit, sessionmaker, add):
    # Launch records from before the audit vocabulary name no encounter; the workspace's audited read of
    # the launch's Encounter shows one came with it.
    read_one = await add(hours(9), action="launch", kind="ehr")
    await add(hours(9.1), resource="Encounter")
    # Someone else's Encounter read, or a read of another patient's, does not count for this launch.
    others = await add(hours(10), action="launch", kind="ehr", patient="pat-2")
    await add(hours(10.1), actor="Practitioner/prac-9", patient="pat-2", resource="Encounter")
    await add(hours(10.2), resource="Encounter")  # pat-1's, in prac-1's pat-2 session
    # A read after the user's next launch belongs to that next session.
    late = await add(hours(11), action="launch", kind="ehr", patient="pat-3")
    later = await add(hours(12), action="launch", kind="ehr", patient="pat-3")
    await add(hours(12.1), patient="pat-3", resource="Encounter")

    result = await report(sessionmaker, audit, ReportKind.NO_ENCOUNTER)

    flagged = [row.seqs[0] for row in result.rows]
    assert read_one not in flagged
    assert later not in flagged
    assert flagged == [others, late]
