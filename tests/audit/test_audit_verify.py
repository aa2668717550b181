"""The fast verify path agrees with the reference hashing: every stored field is covered, across batches."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from sqlalchemy import select, text, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from service.audit import AuditLog, VerifyResult
from service.audit import verify as verify_module
from service.audit.chain import hashed_fields, record_hash
from service.crypto import Keyring
from service.crypto.keyring import new_key_material
from service.db.engine import make_engine
from service.db.models import AuditRecord

TRICKY: list[dict[str, str | None]] = [
    {"ehr": 'quote " and backslash \\ ', "request_id": "tab\tnewline\ncontrol\x01"},
    {"ehr": "Ünïcödé ✓ 漢字 🩺", "request_id": "\u2028line separator"},
    {"ehr": None, "request_id": None, "patient": None, "actor": None, "resource": None},
    {"ehr": "control only", "request_id": "tab\there\x1f"},  # needs escaping without a quote in sight
    {"ehr": "null", "request_id": "[]"},  # the word null is a string here, not JSON null
]


@pytest.fixture
def audit() -> AuditLog:
    return AuditLog(Keyring(new_key_material()))


async def append(
    audit: AuditLog, sessionmaker: async_sessionmaker[AsyncSession], n: int, **overrides: object
) -> None:
    fields: dict[str, object] = {
        "action": "fhir.read",
        "outcome": "success",
        "actor": "Practitioner/prac-1",
        "patient": "pat-1",
        "ehr": "sandbox",
        "resource": "Condition/cond-1",
        "request_id": "req-1",
    }
    fields.update(overrides)
    for _ in range(n):
        async with sessionmaker() as session, session.begin():
            await audit.append(session, **fields)  # type: ignore[arg-type]


async def verify(audit: AuditLog, sessionmaker: async_sessionmaker[AsyncSession]) -> VerifyResult:
    async with sessionmaker() as session, session.begin():
        return await audit.verify(session)


async def tamper(db_url: str, *statements: object) -> None:
    """Bypass the append-only guards the way a database owner could."""
    engine = make_engine(db_url)
    try:
        async with engine.begin() as connection:
            if engine.dialect.name == "postgresql":
                await connection.execute(text("SET LOCAL session_replication_role = replica"))
            else:
                await connection.execute(text("DROP TRIGGER IF EXISTS audit_records_no_update"))
            for statement in statements:
                await connection.execute(statement)  # type: ignore[call-overload]
    finally:
        await engine.dispose()


async def test_tricky_strings_and_nulls_verify_on_the_fast_path(audit, sessionmaker, monkeypatch):
    for overrides in TRICKY:
        await append(audit, sessionmaker, 2, **overrides)
    # Any record the fast path could not vouch for would go to the reference path: here none may.
    doubted: list[int] = []
    reference = verify_module._reference_verdict

    async def counting(session: AsyncSession, seq: int, prev_hash: str) -> str | None:
        doubted.append(seq)
        return await reference(session, seq, prev_hash)

    monkeypatch.setattr(verify_module, "_reference_verdict", counting)
    result = await verify(audit, sessionmaker)
    assert (result.ok, result.count, doubted) == (True, 2 * len(TRICKY), [])


async def test_the_fast_hash_is_the_reference_hash(audit, sessionmaker):
    for overrides in TRICKY:
        await append(audit, sessionmaker, 1, **overrides)
    async with sessionmaker() as session:
        rows = (await session.execute(select(*AuditRecord.__table__.columns).order_by(AuditRecord.seq))).all()
    for row in rows:
        assert record_hash(row.prev_hash, hashed_fields(row)) == row.hash


@pytest.mark.parametrize(
    ("column", "value"),
    [
        ("action", "login"),
        ("outcome", "denied"),
        ("actor_digest", "b" * 64),
        ("patient_digest", None),
        ("ehr", "other-ehr"),
        ("resource_type", "Patient"),
        ("request_id", "req-2"),
    ],
)
async def test_every_hashed_column_is_covered(column, value, audit, sessionmaker, db_url, monkeypatch):
    monkeypatch.setattr(verify_module, "VERIFY_BATCH", 3)  # the change lands in the third batch
    await append(audit, sessionmaker, 9)
    await tamper(db_url, update(AuditRecord).where(AuditRecord.seq == 8).values({column: value}))
    result = await verify(audit, sessionmaker)
    assert (result.ok, result.first_bad_seq, result.count) == (False, 8, 7)
    assert "modified" in (result.reason or "")


async def test_a_changed_time_or_body_is_caught(audit, sessionmaker, db_url):
    await append(audit, sessionmaker, 4)
    async with sessionmaker() as session:
        record = (await session.execute(select(AuditRecord).where(AuditRecord.seq == 2))).scalar_one()
        sealed, recorded_at = record.sealed, record.recorded_at
    later = recorded_at.replace(microsecond=(recorded_at.microsecond + 1) % 1_000_000)
    await tamper(db_url, update(AuditRecord).where(AuditRecord.seq == 2).values(recorded_at=later))
    assert (await verify(audit, sessionmaker)).first_bad_seq == 2
    await tamper(
        db_url,
        update(AuditRecord).where(AuditRecord.seq == 2).values(recorded_at=recorded_at),
        update(AuditRecord).where(AuditRecord.seq == 3).values(sealed=b"CC1\x00garbage"),
    )
    result = await verify(audit, sessionmaker)
    assert (result.first_bad_seq, result.reason) == (3, "record 3 has a malformed sealed payload")
    assert sealed  # the untouched record 2 verified again


async def test_an_equal_instant_spelled_otherwise_is_decided_by_the_reference(
    sessionmaker, db_url, monkeypatch
):
    at = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    audit = AuditLog(Keyring(new_key_material()), clock=lambda: at)
    await append(audit, sessionmaker, 3)
    # SQLite keeps text: the same instant without its ".000000" is a spelling the fast path does not know.
    # (PostgreSQL keeps a timestamptz, so the same statement changes nothing there.)
    spelled = text("'2026-01-02 03:04:05'") if db_url.startswith("sqlite") else at
    await tamper(db_url, update(AuditRecord).where(AuditRecord.seq == 2).values(recorded_at=spelled))
    doubted: list[int] = []
    reference = verify_module._reference_verdict

    async def counting(session: AsyncSession, seq: int, prev_hash: str) -> str | None:
        doubted.append(seq)
        return await reference(session, seq, prev_hash)

    monkeypatch.setattr(verify_module, "_reference_verdict", counting)
    result = await verify(audit, sessionmaker)
    assert (result.ok, result.count) == (True, 3)
    assert doubted == ([2] if db_url.startswith("sqlite") else [])


async def test_appends_relink_after_another_writer_or_a_rollback(sessionmaker):
    """Each AuditLog remembers the head it wrote; a stale memory costs a retry, never a broken link."""
    keyring = Keyring(new_key_material())
    first, second = AuditLog(keyring), AuditLog(keyring)
    await append(first, sessionmaker, 2)
    await append(second, sessionmaker, 1)  # first's remembered head is now stale
    await append(first, sessionmaker, 1)
    async with sessionmaker() as session:
        await session.begin()
        await second.append(
            session,
            action="view",
            outcome="success",
            actor=None,
            patient=None,
            ehr=None,
            resource=None,
            request_id=None,
        )
        await session.rollback()  # the caller's transaction fails: its record goes with it
    await append(second, sessionmaker, 1)
    await append(first, sessionmaker, 1)
    result = await verify(first, sessionmaker)
    assert (result.ok, result.count) == (True, 6)
    async with sessionmaker() as session:
        seqs = (await session.execute(select(AuditRecord.seq).order_by(AuditRecord.seq))).scalars().all()
    assert seqs == [1, 2, 3, 4, 5, 6]


async def test_a_session_in_another_time_zone_verifies_on_the_fast_path(
    audit, sessionmaker, db_url, monkeypatch
):
    await append(audit, sessionmaker, 3)
    doubted: list[int] = []
    reference = verify_module._reference_verdict

    async def counting(session: AsyncSession, seq: int, prev_hash: str) -> str | None:
        doubted.append(seq)
        return await reference(session, seq, prev_hash)

    monkeypatch.setattr(verify_module, "_reference_verdict", counting)
    async with sessionmaker() as session, session.begin():
        if db_url.startswith("postgresql"):
            # The driver then hands out timestamps at +01:00/+02:00; the hash covers their UTC spelling.
            await session.execute(text("SET LOCAL TIME ZONE 'Europe/Berlin'"))
        result = await audit.verify(session)
    assert (result.ok, result.count, doubted) == (True, 3, [])


@pytest.mark.parametrize(
    ("original", "forged"),
    [
        ('a"b', 'a\\"b'),  # quoted as is, the forgery would spell the original's escaped form
        ("a\\b", "a\\\\b"),
        ("x", None),
        ("null", None),
    ],
)
async def test_a_forgery_that_spells_the_original_unescaped_is_caught(
    original, forged, sessionmaker, db_url, audit
):
    """The database quotes strings as is only when nothing needs escaping; otherwise a forged value could
    spell the original's canonical JSON and match its hash."""
    await append(audit, sessionmaker, 2, ehr=original)
    await append(audit, sessionmaker, 1)
    await tamper(db_url, update(AuditRecord).where(AuditRecord.seq == 2).values(ehr=forged))
    result = await verify(audit, sessionmaker)
    assert (result.ok, result.first_bad_seq, result.count) == (False, 2, 1)


async def test_a_date_moved_to_another_era_or_a_blob_is_caught(audit, sessionmaker, db_url):
    await append(audit, sessionmaker, 3)
    if db_url.startswith("postgresql"):
        # Same digits, two thousand years apart: to_char's YYYY alone would spell both alike.
        forged: object = text("recorded_at - make_interval(years => 4051)")  # 2026 AD -> 2026 BC
        expected_reason = "record 2 has malformed stored fields"
    else:
        forged = text("X'00ff'")  # a blob where text belongs
        expected_reason = "record 2 has malformed stored fields"
    column = "recorded_at" if db_url.startswith("postgresql") else "action"
    await tamper(db_url, update(AuditRecord).where(AuditRecord.seq == 2).values({column: forged}))
    result = await verify(audit, sessionmaker)
    assert (result.ok, result.first_bad_seq, result.reason) == (False, 2, expected_reason)
