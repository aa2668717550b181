"""Verify in seq ranges side by side (worker processes): every verdict is the one-process walk's.

The log here is 12 records cut into three ranges, 1..4 (this process), 5..8 and 9..12 (workers), read in
batches of 2, so a break can sit on a range boundary, on a batch boundary inside a worker, or in the last
range.
"""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime

import pytest
from sqlalchemy import ColumnElement, delete, select, text, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from service.audit import AuditLog, VerifyResult, chain_scan
from service.audit import chain as chain_module
from service.audit import verify as verify_module
from service.audit.log import AuditAction, AuditOutcome
from service.crypto import Keyring, envelope
from service.crypto.keyring import new_key_material
from service.db.engine import make_engine
from service.db.models import AuditRecord

RECORDS = 12


@pytest.fixture
def audit() -> AuditLog:
    return AuditLog(Keyring(new_key_material()))


@pytest.fixture
def three_ranges(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Ranges 1..4, 5..8, 9..12 from 12 records on; the ranges each worker process verified."""
    monkeypatch.setattr(verify_module, "PARALLEL_MIN_RECORDS", RECORDS)
    monkeypatch.setattr(verify_module, "FIRST_RANGE_SHARE", 1.0)
    monkeypatch.setattr(verify_module, "VERIFY_BATCH", 2)
    monkeypatch.setattr(verify_module, "_cpu_count", lambda: 3)
    monkeypatch.setattr(verify_module, "_idle_cpus", lambda: 2)
    taken: list[int] = []
    original = verify_module._Worker.continue_walk

    async def counting(self: verify_module._Worker, walk: chain_scan.ChainWalk) -> bool:
        whole = await original(self, walk)
        if whole:
            taken.append(self.lo)
        return whole

    monkeypatch.setattr(verify_module._Worker, "continue_walk", counting)
    return taken


async def fill(audit: AuditLog, sessionmaker: async_sessionmaker[AsyncSession], n: int = RECORDS) -> None:
    for number in range(n):
        async with sessionmaker() as session, session.begin():
            await audit.append(
                session,
                action=AuditAction.FHIR_READ,
                outcome=AuditOutcome.SUCCESS,
                actor="Practitioner/prac-1",
                patient=f"pat-{number % 3}",
                ehr="sandbox",
                resource="Condition/cond-1",
                request_id=f"req-{number}",
            )


async def verify(audit: AuditLog, sessionmaker: async_sessionmaker[AsyncSession]) -> VerifyResult:
    async with sessionmaker() as session, session.begin():
        return await audit.verify(session)


async def one_process(
    audit: AuditLog, sessionmaker: async_sessionmaker[AsyncSession], monkeypatch: pytest.MonkeyPatch
) -> VerifyResult:
    with monkeypatch.context() as patch:
        patch.setattr(verify_module, "MAX_WORKERS", 1)
        return await verify(audit, sessionmaker)


async def tamper(db_url: str, *statements: object) -> None:
    """Bypass the append-only guards the way a database owner could."""
    engine = make_engine(db_url)
    try:
        async with engine.begin() as connection:
            if engine.dialect.name == "postgresql":
                await connection.execute(text("SET LOCAL session_replication_role = replica"))
            else:
                await connection.execute(text("DROP TRIGGER IF EXISTS audit_records_no_update"))
                await connection.execute(text("DROP TRIGGER IF EXISTS audit_records_no_delete"))
            for statement in statements:
                await connection.execute(statement)  # type: ignore[call-overload]
    finally:
        await engine.dispose()


def where(seq: int) -> ColumnElement[bool]:
    return AuditRecord.seq == seq


async def test_an_intact_log_is_verified_by_three_processes(audit, sessionmaker, three_ranges):
    await fill(audit, sessionmaker)
    async with sessionmaker() as session:
        rows = await session.execute(select(AuditRecord.seq, AuditRecord.hash))
        stored = {seq: value for seq, value in rows}
        walk = await verify_module._walk_chain(session, {3, 4, 5, 8, 11, 12})
    assert (walk.first_bad_seq, walk.count, walk.prev_hash) == (None, RECORDS, stored[RECORDS])
    assert walk.hashes_at == {seq: stored[seq] for seq in (3, 4, 5, 8, 11, 12)}  # for the checkpoints
    assert three_ranges == [5, 9]  # both workers' ranges were taken whole
    result = await verify(audit, sessionmaker)
    assert (result.ok, result.count, result.chain_intact) == (True, RECORDS, True)


@pytest.mark.parametrize(
    ("seq", "change", "reason"),
    [
        (4, {"outcome": "denied"}, "record 4 was modified (hash mismatch)"),  # last of this process's range
        (5, {"outcome": "denied"}, "record 5 was modified (hash mismatch)"),  # first of a worker's range
        (6, {"ehr": "other"}, "record 6 was modified (hash mismatch)"),  # a batch boundary inside a worker
        (8, {"request_id": None}, "record 8 was modified (hash mismatch)"),  # last before the last range
        (9, {"prev_hash": "f" * 64}, "record 9 does not link to record 8"),  # first of the last range
        (11, {"sealed": b"CC1\x00garbage"}, "record 11 has a malformed sealed payload"),
        (12, {"action": "fhir.search"}, "record 12 was modified (hash mismatch)"),  # the very last record
    ],
)
async def test_a_break_at_a_range_boundary_or_in_the_last_range_is_reported_as_by_one_process(
    seq, change, reason, audit, sessionmaker, db_url, three_ranges, monkeypatch
):
    await fill(audit, sessionmaker)
    await tamper(db_url, update(AuditRecord).where(where(seq)).values(change))
    result = await verify(audit, sessionmaker)
    assert (result.ok, result.first_bad_seq, result.count, result.reason) == (False, seq, seq - 1, reason)
    assert result == await one_process(audit, sessionmaker, monkeypatch)


@pytest.mark.parametrize("seq", [4, 5, 8, 9, 11])
async def test_a_record_deleted_at_a_range_boundary_is_a_gap(
    seq, audit, sessionmaker, db_url, three_ranges, monkeypatch
):
    # 4: the record the second range links to (its worker cannot anchor); 5 and 9: a range's first record.
    await fill(audit, sessionmaker)
    await tamper(db_url, delete(AuditRecord).where(where(seq)))
    result = await verify(audit, sessionmaker)
    expected = (False, seq, seq - 1, f"record {seq} is missing (gap in seq)")
    assert (result.ok, result.first_bad_seq, result.count, result.reason) == expected
    assert result == await one_process(audit, sessionmaker, monkeypatch)


async def test_a_record_only_the_reference_can_vouch_for_in_a_worker_range_is_accepted(
    sessionmaker, db_url, three_ranges
):
    """A worker stops at a record its scan does not know; this process asks the reference and walks on."""
    at = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    audit = AuditLog(Keyring(new_key_material()), clock=lambda: at)
    await fill(audit, sessionmaker)
    if db_url.startswith("sqlite"):
        # The same instant without its ".000000": a spelling the scan does not know, the reference accepts.
        await tamper(
            db_url, update(AuditRecord).where(where(6)).values(recorded_at=text("'2026-01-02 03:04:05'"))
        )
    result = await verify(audit, sessionmaker)
    assert (result.ok, result.count) == (True, RECORDS)
    assert three_ranges == ([9] if db_url.startswith("sqlite") else [5, 9])


async def test_a_worker_that_cannot_run_leaves_its_range_to_this_process(
    audit, sessionmaker, db_url, three_ranges, monkeypatch, tmp_path
):
    monkeypatch.setattr(verify_module, "WORKER_SCRIPT", str(tmp_path / "missing.py"))
    await fill(audit, sessionmaker)
    assert (await verify(audit, sessionmaker)).ok
    assert three_ranges == []
    await tamper(db_url, update(AuditRecord).where(where(10)).values(outcome="denied"))
    result = await verify(audit, sessionmaker)
    assert (result.first_bad_seq, result.reason) == (10, "record 10 was modified (hash mismatch)")


async def test_a_small_log_is_verified_in_one_process(audit, sessionmaker, monkeypatch):
    started: list[int] = []
    monkeypatch.setattr(verify_module._Worker, "start", lambda *args: started.append(1))
    monkeypatch.setattr(verify_module, "_cpu_count", lambda: 4)
    monkeypatch.setattr(verify_module, "_idle_cpus", lambda: 3)
    await fill(audit, sessionmaker, 3)
    assert (await verify(audit, sessionmaker)).ok
    assert started == []  # under PARALLEL_MIN_RECORDS


@pytest.mark.parametrize(
    ("cpus", "load", "parts"), [(2, 0.1, 2), (2, 1.0, 1), (2, 5.0, 1), (8, 2.0, 4), (16, 0.0, 4), (1, 0.0, 1)]
)
def test_workers_only_on_cpus_the_machine_leaves_idle(cpus, load, parts, monkeypatch):
    monkeypatch.setattr(verify_module, "_cpu_count", lambda: cpus)
    monkeypatch.setattr(verify_module.os, "getloadavg", lambda: (load, load, load))
    assert verify_module._parts(verify_module.PARALLEL_MIN_RECORDS) == parts
    assert verify_module._parts(verify_module.PARALLEL_MIN_RECORDS - 1) == 1


def test_ranges_cover_every_record_once() -> None:
    for top, parts in ((12, 3), (100_000, 2), (100_001, 4), (3, 4), (20_000, 2)):
        ranges = verify_module._ranges(top, parts)
        covered = [seq for lo, hi in ranges for seq in range(lo, hi + 1)]
        assert covered == list(range(1, top + 1))
        assert len(ranges) <= parts


def test_the_worker_module_matches_the_envelope_and_imports_only_the_standard_library() -> None:
    assert (chain_scan.MAGIC, chain_scan.NONCE_BYTES, chain_scan.TAG_BYTES) == (
        envelope.MAGIC,
        envelope.NONCE_BYTES,
        envelope.TAG_BYTES,
    )
    assert chain_scan.WRAPPED_KEY_BYTES == envelope.WRAPPED_KEY_BYTES
    assert chain_scan.GENESIS_HASH == chain_module.GENESIS_HASH
    probe = (
        "import runpy, sys; runpy.run_path(sys.argv[1], run_name='probe'); "
        "print(sorted({m.split('.')[0] for m in sys.modules} & "
        "{'service', 'sqlalchemy', 'cryptography', 'psycopg', 'pydantic', 'fastapi'}))"
    )
    out = subprocess.run(
        [sys.executable, "-I", "-c", probe, verify_module.WORKER_SCRIPT],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert out.stdout.strip() == "[]"


async def test_the_range_query_stays_on_the_primary_key_without_table_statistics(audit, sessionmaker, engine):
    """PostgreSQL planned the old ``seq >= x ORDER BY seq LIMIT n`` on a table never analysed as a scan and
    sort of the whole table, for every batch; a seq range is an index scan with or without statistics."""
    await fill(audit, sessionmaker, 3)  # a fresh table: no ANALYZE has run
    async with engine.connect() as connection:
        driver = (await connection.get_raw_connection()).driver_connection
        assert driver is not None
        if engine.dialect.name == "postgresql":
            async with driver.cursor() as cursor:
                await cursor.execute("EXPLAIN (FORMAT JSON) " + chain_scan.POSTGRES_RANGE, (1, 10_001))
                plan = str((await cursor.fetchone())[0])
            assert "pk_audit_records" in plan
            assert "Seq Scan" not in plan
            assert "'Sort'" not in plan
        else:
            cursor = await driver.execute("EXPLAIN QUERY PLAN " + chain_scan.SQLITE_RANGE, (1, 10_001))
            plan = str(await cursor.fetchall())
            await cursor.close()
            assert "PRIMARY KEY" in plan
            assert "TEMP B-TREE" not in plan
