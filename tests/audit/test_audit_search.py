"""Compliance search on SQLite and PostgreSQL: filters in SQL by digest, paging, drill-downs, access audit."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from itertools import pairwise
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import event

from service.audit import AuditAction, AuditLog, AuditOutcome
from service.audit.search import (
    MAX_PAGE,
    AuditQuery,
    AuditQueryError,
    PatientTouch,
    SortOrder,
    UserTouch,
    audit_access,
    export_entries,
    launch_timeline,
    parse_time,
    patients_touched_by,
    search_audit,
    session_timeline,
    users_who_touched,
)
from service.crypto import Keyring
from service.crypto.keyring import new_key_material

T0 = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)

# (hours after T0, action, outcome, actor, patient, ehr, request id)
RECORDS = [
    (0, "fhir.read", "success", "Practitioner/prac-1", "pat-1", "sandbox", "req-a"),
    (1, "fhir.read", "success", "Practitioner/prac-2", "Patient/pat-2", "sandbox", "req-a"),
    (2, "approve", "denied", "Practitioner/prac-2", "pat-1", "other", "req-b"),
    (3, "view", "success", "Practitioner/prac-1", "pat-3", "sandbox", "req-c"),
    (5, "audit.export", "success", "cli", None, None, None),
]


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def audit(clock: Clock) -> AuditLog:
    return AuditLog(Keyring(new_key_material()), clock=clock)


@pytest.fixture
async def filled(audit, sessionmaker, clock):
    for hours, action, outcome, actor, patient, ehr, request_id in RECORDS:
        clock.now = T0 + timedelta(hours=hours)
        async with sessionmaker() as db, db.begin():
            await audit.append(
                db,
                action=action,
                outcome=outcome,
                actor=actor,
                patient=patient,
                ehr=ehr,
                resource="Condition/cond-1" if patient else "AuditEvent",
                request_id=request_id,
                detail={"n": hours},
            )
    return audit


async def seqs(sessionmaker, audit, **filters):
    async with sessionmaker() as db:
        page = await search_audit(db, audit, AuditQuery(**filters))
    return [entry.seq for entry in page.entries]


async def test_each_filter_selects_only_its_records(filled, sessionmaker):
    audit = filled
    assert await seqs(sessionmaker, audit) == [5, 4, 3, 2, 1]
    # "pat-1" and "Patient/pat-1" are one patient (one digest).
    assert await seqs(sessionmaker, audit, patient="Patient/pat-1") == [3, 1]
    assert await seqs(sessionmaker, audit, patient="pat-2") == [2]
    assert await seqs(sessionmaker, audit, actor="Practitioner/prac-2") == [3, 2]
    assert await seqs(sessionmaker, audit, action="fhir.read") == [2, 1]
    assert await seqs(sessionmaker, audit, outcome=AuditOutcome.DENIED) == [3]
    assert await seqs(sessionmaker, audit, outcome="success") == [5, 4, 2, 1]
    assert await seqs(sessionmaker, audit, ehr="other") == [3]
    assert await seqs(sessionmaker, audit, request_id="req-a") == [2, 1]
    assert await seqs(sessionmaker, audit, since=T0 + timedelta(hours=1)) == [5, 4, 3, 2]
    # until is exclusive
    assert await seqs(sessionmaker, audit, until=T0 + timedelta(hours=2)) == [2, 1]
    assert await seqs(sessionmaker, audit, patient="pat-1", actor="Practitioner/prac-1") == [1]
    assert await seqs(sessionmaker, audit, patient="pat-9") == []
    assert await seqs(sessionmaker, audit, actor="Practitioner/prac-9") == []


async def test_entries_are_decrypted_with_their_hash(filled, sessionmaker):
    async with sessionmaker() as db:
        page = await search_audit(db, filled, AuditQuery(patient="pat-2"))
    [entry] = page.entries
    assert (entry.actor, entry.patient, entry.ehr, entry.resource) == (
        "Practitioner/prac-2",
        "Patient/pat-2",
        "sandbox",
        "Condition/cond-1",
    )
    assert entry.detail == {"n": 1}
    assert len(entry.hash) == 64


async def test_patient_and_user_never_reach_the_database_in_plaintext(filled, sessionmaker, engine):
    statements: list[str] = []

    def capture(conn, cursor, statement, parameters, context, executemany):
        statements.append(f"{statement} {parameters!r}")

    event.listen(engine.sync_engine, "before_cursor_execute", capture)
    try:
        assert await seqs(sessionmaker, filled, patient="pat-1", actor="Practitioner/prac-2") == [3]
    finally:
        event.remove(engine.sync_engine, "before_cursor_execute", capture)
    sent = "\n".join(statements)
    assert filled.patient_digest("pat-1") in sent
    assert "pat-1" not in sent
    assert "prac-2" not in sent


async def test_pages_in_sql_with_total_and_offsets(filled, sessionmaker):
    async with sessionmaker() as db:
        first = await search_audit(db, filled, AuditQuery(limit=2))
        second = await search_audit(db, filled, first.query.at_offset(first.next_offset or 0))
        last = await search_audit(db, filled, AuditQuery(limit=2, offset=4))
        oldest = await search_audit(db, filled, AuditQuery(limit=2, order=SortOrder.OLDEST))
        beyond = await search_audit(db, filled, AuditQuery(limit=2, offset=10))
    assert [e.seq for e in first.entries] == [5, 4]
    assert (first.total, first.prev_offset, first.next_offset) == (5, None, 2)
    assert [e.seq for e in second.entries] == [3, 2]
    assert (second.prev_offset, second.next_offset) == (0, 4)
    assert [e.seq for e in last.entries] == [1]
    assert (last.prev_offset, last.next_offset) == (2, None)
    assert [e.seq for e in oldest.entries] == [1, 2]
    assert (beyond.entries, beyond.total) == ([], 5)


async def test_filtered_total_counts_only_matches(filled, sessionmaker):
    async with sessionmaker() as db:
        page = await search_audit(db, filled, AuditQuery(outcome="success", limit=1))
    assert page.total == 4
    assert page.next_offset == 1


async def test_drill_down_from_a_user_to_the_patients_they_touched(filled, sessionmaker):
    async with sessionmaker() as db:
        touches = await patients_touched_by(db, filled, "Practitioner/prac-1")
        windowed = await patients_touched_by(
            db, filled, "Practitioner/prac-1", since=T0 + timedelta(hours=1), until=T0 + timedelta(hours=4)
        )
        nobody = await patients_touched_by(db, filled, "Practitioner/prac-9")
    assert touches == [
        PatientTouch("Patient/pat-3", 1, T0 + timedelta(hours=3), T0 + timedelta(hours=3)),
        PatientTouch("Patient/pat-1", 1, T0, T0),
    ]
    assert [t.patient for t in windowed] == ["Patient/pat-3"]
    assert nobody == []


async def test_drill_down_from_a_patient_to_everyone_who_touched_them(filled, sessionmaker, audit, clock):
    clock.now = T0 + timedelta(hours=6)
    async with sessionmaker() as db, db.begin():
        await audit.append(
            db,
            action="view",
            outcome="success",
            actor="Practitioner/prac-1",
            patient="Patient/pat-1",
            ehr="sandbox",
            resource=None,
            request_id=None,
        )
    async with sessionmaker() as db:
        users = await users_who_touched(db, audit, "pat-1")
    assert users == [
        UserTouch("Practitioner/prac-1", 2, T0, T0 + timedelta(hours=6)),
        UserTouch("Practitioner/prac-2", 1, T0 + timedelta(hours=2), T0 + timedelta(hours=2)),
    ]


async def test_timeline_of_one_request_in_chain_order(filled, sessionmaker):
    async with sessionmaker() as db:
        timeline = await session_timeline(db, filled, "req-a")
        empty = await session_timeline(db, filled, "req-zzz")
    assert [e.seq for e in timeline] == [1, 2]
    assert [e.recorded_at for e in timeline] == sorted(e.recorded_at for e in timeline)
    assert empty == []


async def test_export_is_exactly_the_filtered_set_ignoring_paging(filled, sessionmaker):
    async with sessionmaker() as db:
        everything = await export_entries(db, filled, AuditQuery(limit=1, offset=3))
        patient = await export_entries(db, filled, AuditQuery(patient="pat-1"))
        capped = await export_entries(db, filled, AuditQuery(), max_records=2)
    assert [e.seq for e in everything] == [1, 2, 3, 4, 5]
    assert [e.seq for e in patient] == [1, 3]
    assert [e.seq for e in capped] == [1, 2]


async def test_export_pages_through_more_than_one_batch(audit, sessionmaker, clock):
    for index in range(520):
        clock.now = T0 + timedelta(seconds=index)
        async with sessionmaker() as db, db.begin():
            await audit.append(
                db,
                action="view",
                outcome="success",
                actor="Practitioner/prac-1",
                patient=f"pat-{index % 2}",
                ehr="sandbox",
                resource=None,
                request_id=None,
            )
    async with sessionmaker() as db:
        odd = await export_entries(db, audit, AuditQuery(patient="pat-1"))
        every = await export_entries(db, audit, AuditQuery())
    assert [e.seq for e in odd] == list(range(2, 521, 2))
    assert len(every) == 520
    assert all(b.seq == a.seq + 1 for a, b in pairwise(every))


async def test_searches_and_exports_are_audited_with_their_filters(filled, sessionmaker):
    query = AuditQuery(patient="pat-1", action="approve")
    async with sessionmaker() as db, db.begin():
        page = await search_audit(db, filled, query)
        ref = await audit_access(
            db,
            filled,
            action=AuditAction.AUDIT_SEARCH,
            actor="Practitioner/officer-1",
            query=query,
            count=len(page.entries),
            request_id="req-officer",
        )
    async with sessionmaker() as db:
        [record] = (await search_audit(db, filled, AuditQuery(action="audit.search"))).entries
        patient_history = await users_who_touched(db, filled, "Patient/pat-1")
    assert record.seq == ref.seq
    assert record.patient == "Patient/pat-1"
    assert record.actor == "Practitioner/officer-1"
    assert record.detail == {"filters": {"patient": "Patient/pat-1", "action": "approve"}, "count": 1}
    # The patient's own history shows that the officer looked them up.
    assert "Practitioner/officer-1" in {touch.actor for touch in patient_history}


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"since": T0, "until": T0 - timedelta(hours=1)}, "since must be earlier than until"),
        ({"since": T0, "until": T0}, "since must be earlier than until"),
        ({"since": datetime(2026, 11, 30, 12, 0)}, "since must include a time zone"),
        ({"limit": 0}, f"limit must be between 1 and {MAX_PAGE}"),
        ({"limit": MAX_PAGE + 1}, f"limit must be between 1 and {MAX_PAGE}"),
        ({"offset": -1}, "offset must be 0 or more"),
        ({"action": "Fhir Read"}, "action must be a lower-case name"),
        ({"action": "read; DROP TABLE"}, "action must be a lower-case name"),
        ({"outcome": "fine"}, "outcome must be one of success, denied, failure, error"),
        ({"patient": "Practitioner/prac-1"}, "patient must be a Patient reference"),
        ({"patient": ""}, "patient must be a Patient reference"),
        ({"actor": "Dr Who"}, "user must be a reference"),
        ({"ehr": "x" * 129}, "ehr must be 1..128 characters"),
        ({"order": "sideways"}, "order must be 'newest' or 'oldest'"),
    ],
)
def test_bad_input_is_a_clear_error(fields, message):
    with pytest.raises(AuditQueryError, match=message):
        AuditQuery(**fields)
    assert issubclass(AuditQueryError, ValueError)


async def test_bad_drill_down_input_is_a_clear_error(filled, sessionmaker):
    async with sessionmaker() as db:
        with pytest.raises(AuditQueryError, match="since must be earlier"):
            await patients_touched_by(db, filled, "Practitioner/prac-1", since=T0, until=T0)
        with pytest.raises(AuditQueryError, match="patient must be a Patient reference"):
            await users_who_touched(db, filled, "Practitioner/prac-1")
        with pytest.raises(AuditQueryError, match=r"request id must be 1\.\.128"):
            await session_timeline(db, filled, "")
        with pytest.raises(AuditQueryError, match="export limit"):
            await export_entries(db, filled, AuditQuery(), max_records=0)


def test_typed_times_are_read_in_the_report_zone_unless_they_say_otherwise():
    berlin = ZoneInfo("Europe/Berlin")
    assert parse_time("since", "2026-12-01", berlin) == datetime(2026, 11, 30, 23, 0, tzinfo=UTC)
    assert parse_time("since", "2026-12-01T08:30", berlin) == datetime(2026, 12, 1, 7, 30, tzinfo=UTC)
    assert parse_time("since", "2026-12-01T08:30Z", berlin) == datetime(2026, 12, 1, 8, 30, tzinfo=UTC)
    assert parse_time("since", " 2026-12-01T08:30+05:00 ", berlin) == datetime(2026, 12, 1, 3, 30, tzinfo=UTC)
    with pytest.raises(AuditQueryError, match="since 'last tuesday' is not a date or time"):
        parse_time("since", "last tuesday", berlin)


async def test_launch_timeline_is_that_users_records_on_that_ehr_until_their_next_launch(audit, sessionmaker):
    steps = [
        ("launch", "Practitioner/prac-1", "sandbox"),
        ("fhir.read", "Practitioner/prac-1", "sandbox"),
        ("fhir.read", "Practitioner/prac-2", "sandbox"),  # another user
        ("view", "Practitioner/prac-1", "other"),  # the same user on another EHR
        ("approve", "Practitioner/prac-1", "sandbox"),
        ("launch", "Practitioner/prac-1", "sandbox"),  # the next session
        ("view", "Practitioner/prac-1", "sandbox"),
    ]
    for action, actor, ehr in steps:
        async with sessionmaker() as db, db.begin():
            await audit.append(
                db,
                action=action,
                outcome="success",
                actor=actor,
                patient="pat-1",
                ehr=ehr,
                resource=None,
                request_id=None,
            )
    async with sessionmaker() as db:
        first = await launch_timeline(db, audit, 1)
        second = await launch_timeline(db, audit, 6)
        with pytest.raises(AuditQueryError, match="record 2 is not a launch"):
            await launch_timeline(db, audit, 2)
        with pytest.raises(AuditQueryError, match="record 99 is not a launch"):
            await launch_timeline(db, audit, 99)
    assert [e.seq for e in first] == [1, 2, 5]
    assert [e.seq for e in second] == [6, 7]
