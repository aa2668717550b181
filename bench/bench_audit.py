"""Audit log costs, side by side in one run: chained append vs a plain INSERT, and verify at 100k records.

Usage (from the repo root):
    python -m bench.bench_audit [--appends 400] [--verify-records 100000] [--no-postgres]
        [--postgres postgresql+psycopg://postgres@127.0.0.1:5432/test]

Each backend gets a fresh database (a temp SQLite file; a throwaway PostgreSQL schema dropped afterwards).

Append: ``AuditLog.append`` + commit, one record per transaction as the app writes them (chain lock, head
read, hash), against a plain INSERT + commit of the same row into a table of the same shape and indexes, with
the same per-row work that is not the chain's (digests, AES-GCM of the sealed part). The two alternate in
rounds of 20 after a warm-up, so drift in machine load hits both alike.

Verify: a chain of ``--verify-records`` records (built in bulk from the same hashing and encryption code and
checked by the verify itself), then ``verify_chain`` (service.audit.verify) against the reference walk it
replaced (SQLAlchemy rows in batches of 500, ``hashed_fields`` + ``record_hash`` per record), alternating,
three runs each; the median of each is reported.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import insert, select, text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from service.audit import AuditLog
from service.audit.chain import GENESIS_HASH, hashed_fields, record_hash
from service.audit.log import resource_type_of
from service.audit.verify import verify_chain
from service.crypto import Keyring
from service.crypto.envelope import aad_for
from service.crypto.keyring import new_key_material
from service.db.engine import make_engine, make_read_sessionmaker, make_sessionmaker, migrate
from service.db.models import AuditRecord

ROUND = 20
PLAIN_TABLE_DDL = (
    "CREATE TABLE bench_plain_audit (seq BIGINT PRIMARY KEY, recorded_at {time} NOT NULL, "
    "action VARCHAR(64) NOT NULL, outcome VARCHAR(16) NOT NULL, actor_digest VARCHAR(64), "
    "patient_digest VARCHAR(64), ehr VARCHAR(128), resource_type VARCHAR(64), request_id VARCHAR(128), "
    "sealed {blob} NOT NULL, prev_hash VARCHAR(64) NOT NULL, hash VARCHAR(64) NOT NULL UNIQUE)",
    "CREATE INDEX bench_plain_recorded_at ON bench_plain_audit (recorded_at)",
    "CREATE INDEX bench_plain_action ON bench_plain_audit (action)",
    "CREATE INDEX bench_plain_actor ON bench_plain_audit (actor_digest)",
    "CREATE INDEX bench_plain_patient ON bench_plain_audit (patient_digest)",
)


@dataclass(frozen=True)
class Result:
    backend: str
    appends: int
    chained_ms: float  # median per append, ms
    plain_ms: float
    verify_records: int
    verify_rate: float  # records/s, median of three
    reference_rate: float


def record_fields(n: int) -> dict[str, str | None]:
    return {
        "action": "fhir.read",
        "outcome": "success",
        "actor": "Practitioner/prac-1",
        "patient": f"pat-{n % 7}",
        "ehr": "bench",
        "resource": "Condition/cond-1",
        "request_id": f"req-{n}",
    }


class PlainLog:
    """What an unchained log would do per record: the same digests and encryption, then INSERT."""

    def __init__(self, audit: AuditLog, keyring: Keyring) -> None:
        self._audit = audit
        self._keyring = keyring
        self._seq = 0

    async def append(self, session: AsyncSession, n: int) -> None:
        self._seq += 1
        fields = record_fields(n)
        plain = {"actor": fields["actor"], "patient": fields["patient"], "resource": fields["resource"]}
        sealed = self._keyring.encrypt(
            json.dumps({**plain, "detail": {}}, sort_keys=True).encode(),
            aad=aad_for("bench_plain_audit", self._seq, "sealed"),
        )
        await session.execute(
            text(
                "INSERT INTO bench_plain_audit (seq, recorded_at, action, outcome, actor_digest, "
                "patient_digest, ehr, resource_type, request_id, sealed, prev_hash, hash) VALUES (:seq, :at, "
                ":action, :outcome, :actor, :patient, :ehr, :rtype, :request, :sealed, :prev, :hash)"
            ),
            {
                "seq": self._seq,
                "at": datetime.now(UTC).replace(tzinfo=None),
                "action": fields["action"],
                "outcome": fields["outcome"],
                "actor": self._audit.actor_digest(fields["actor"] or ""),
                "patient": self._audit.patient_digest(fields["patient"] or ""),
                "ehr": fields["ehr"],
                "rtype": resource_type_of(fields["resource"]),
                "request": fields["request_id"],
                "sealed": sealed,
                "prev": "",
                "hash": f"{self._seq:064x}",
            },
        )


async def timed(count: int, one: Callable[[int], Awaitable[None]], start: int) -> list[float]:
    durations = []
    for n in range(start, start + count):
        began = time.perf_counter()
        await one(n)
        durations.append(time.perf_counter() - began)
    return durations


async def measure_appends(
    sessionmaker: async_sessionmaker[AsyncSession], audit: AuditLog, keyring: Keyring, appends: int
) -> tuple[float, float]:
    plain = PlainLog(audit, keyring)

    async def chained_one(n: int) -> None:
        async with sessionmaker() as session, session.begin():
            await audit.append(session, **record_fields(n))  # type: ignore[arg-type]

    async def plain_one(n: int) -> None:
        async with sessionmaker() as session, session.begin():
            await plain.append(session, n)

    await timed(ROUND, chained_one, 0)  # warm-up: connections, statement caches
    await timed(ROUND, plain_one, 0)
    chained: list[float] = []
    unchained: list[float] = []
    for start in range(ROUND, ROUND + appends, ROUND):
        chained += await timed(ROUND, chained_one, start)
        unchained += await timed(ROUND, plain_one, start)
    return statistics.median(chained) * 1000, statistics.median(unchained) * 1000


async def fill_chain(
    sessionmaker: async_sessionmaker[AsyncSession], audit: AuditLog, keyring: Keyring, count: int
) -> None:
    """``count`` records after whatever is there, built like ``AuditLog.append`` builds them, in bulk."""
    async with sessionmaker() as session:
        seq, prev_hash = await audit.head(session)
    moment = datetime(2026, 1, 1, tzinfo=UTC)
    while count > 0:
        batch = []
        for _ in range(min(count, 2000)):
            seq += 1
            fields = record_fields(seq)
            moment += timedelta(microseconds=1_234_567)
            row = AuditRecord(
                seq=seq,
                recorded_at=moment,
                action=fields["action"],
                outcome=fields["outcome"],
                actor_digest=audit.actor_digest(fields["actor"] or ""),
                patient_digest=audit.patient_digest(fields["patient"] or ""),
                ehr=fields["ehr"],
                resource_type=resource_type_of(fields["resource"]),
                request_id=fields["request_id"],
                sealed=keyring.encrypt(b'{"detail":{}}', aad=aad_for("audit_records", seq, "sealed")),
                prev_hash=prev_hash,
            )
            row.hash = prev_hash = record_hash(prev_hash, hashed_fields(row))
            batch.append({column.key: getattr(row, column.key) for column in AuditRecord.__table__.columns})
        async with sessionmaker() as session, session.begin():
            await session.execute(insert(AuditRecord), batch)
        count -= len(batch)


async def reference_verify(session: AsyncSession) -> int:
    """The verify walk before this benchmark's work: SQLAlchemy rows, the reference hashing per record."""
    expected, prev_hash = 1, GENESIS_HASH
    while True:
        rows = (
            await session.execute(
                select(*AuditRecord.__table__.columns)
                .where(AuditRecord.seq >= expected)
                .order_by(AuditRecord.seq)
                .limit(500)
            )
        ).all()
        if not rows:
            return expected - 1
        for row in rows:
            if row.seq != expected or row.prev_hash != prev_hash:
                raise AssertionError(f"chain broken at {row.seq}")
            if record_hash(prev_hash, hashed_fields(row)) != row.hash:
                raise AssertionError(f"record {row.seq} does not verify")
            prev_hash = row.hash
            expected += 1


async def measure_verify(engine: AsyncEngine, records: int) -> tuple[float, float]:
    reader = make_read_sessionmaker(engine)
    fast: list[float] = []
    reference: list[float] = []
    for _ in range(3):
        async with reader() as session:
            began = time.perf_counter()
            result = await verify_chain(session, [], None)
            fast.append(records / (time.perf_counter() - began))
        if not (result.ok and result.count == records):
            raise AssertionError(f"verify: {result}")
        async with reader() as session:
            began = time.perf_counter()
            count = await reference_verify(session)
            reference.append(records / (time.perf_counter() - began))
        if count != records:
            raise AssertionError(f"reference verify counted {count}")
    return statistics.median(fast), statistics.median(reference)


async def measure(backend: str, url: str, *, appends: int, verify_records: int) -> Result:
    await migrate(url)
    engine = make_engine(url)
    sqlite = engine.dialect.name == "sqlite"
    try:
        async with engine.begin() as connection:
            for statement in PLAIN_TABLE_DDL:
                ddl = statement.format(
                    time="DATETIME" if sqlite else "TIMESTAMPTZ", blob="BLOB" if sqlite else "BYTEA"
                )
                await connection.execute(text(ddl))
        sessionmaker = make_sessionmaker(engine)
        keyring = Keyring(new_key_material())
        audit = AuditLog(keyring)
        chained_ms, plain_ms = await measure_appends(sessionmaker, audit, keyring, appends)
        async with sessionmaker() as session:
            already = (await audit.head(session))[0]
        await fill_chain(sessionmaker, audit, keyring, verify_records - already)
        verify_rate, reference_rate = await measure_verify(engine, verify_records)
        return Result(backend, appends, chained_ms, plain_ms, verify_records, verify_rate, reference_rate)
    finally:
        await engine.dispose()


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--appends", type=int, default=400, help="timed appends per mode (multiple of 20)")
    parser.add_argument("--verify-records", type=int, default=100_000)
    parser.add_argument("--postgres", default="postgresql+psycopg://postgres@127.0.0.1:5432/test")
    parser.add_argument("--no-postgres", action="store_true")
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as directory:
        url = f"sqlite+aiosqlite:///{Path(directory) / 'bench.db'}"
        results.append(await measure("sqlite", url, appends=args.appends, verify_records=args.verify_records))
    if not args.no_postgres:
        schema = f"cc_bench_{secrets.token_hex(4)}"
        admin = make_engine(args.postgres)
        try:
            async with admin.begin() as connection:
                await connection.execute(text(f'CREATE SCHEMA "{schema}"'))
            url = f"{args.postgres}?options=-csearch_path%3D{schema}"
            results.append(
                await measure("postgresql", url, appends=args.appends, verify_records=args.verify_records)
            )
        finally:
            async with admin.begin() as connection:
                await connection.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
            await admin.dispose()
    print(
        "| backend | appends | chained append ms (p50) | plain INSERT ms (p50) | ratio | "
        "verify records | verify/s | reference walk/s | speed-up |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(
            f"| {r.backend} | {r.appends} | {r.chained_ms:.2f} | {r.plain_ms:.2f} | "
            f"{r.chained_ms / r.plain_ms:.2f}× | {r.verify_records:,} | {r.verify_rate:,.0f} | "
            f"{r.reference_rate:,.0f} | {r.verify_rate / r.reference_rate:.1f}× |"
        )


if __name__ == "__main__":
    asyncio.run(main())
