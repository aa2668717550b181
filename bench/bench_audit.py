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
checked by the verify itself), then, alternating, three runs each (the median of each is reported):
``verify_chain`` as shipped (service.audit.verify: seq ranges, a worker process per CPU the machine leaves
idle); the same with ``MAX_WORKERS = 1`` (one process); the same with a worker per further CPU however busy
the machine is; the walk as shipped before (bench/audit_verify_before.py: keyset batches, one process); and
the reference walk (SQLAlchemy rows in batches of 500, ``hashed_fields`` + ``record_hash`` per record). The
load average is printed before and after, and the CPU time this process and its workers spent per record
(not the database server's).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import secrets
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import insert, select, text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from bench import audit_verify_before as verify_before
from service.audit import AuditLog
from service.audit import verify as verify_module
from service.audit.chain import GENESIS_HASH, hashed_fields, record_hash
from service.audit.log import resource_type_of
from service.audit.verify import VerifyResult, verify_chain
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
    one_process_rate: float  # the same walk with MAX_WORKERS = 1
    workers_rate: float  # the same walk with a worker per further CPU, however busy the machine is
    before_rate: float  # the walk as shipped before (bench/audit_verify_before.py)
    reference_rate: float


def _load() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


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


async def _one_process(session: AsyncSession) -> VerifyResult:
    with _workers(1):
        return await verify_chain(session, [], None)


@contextlib.contextmanager
def _workers(count: int) -> Iterator[None]:
    saved = verify_module.MAX_WORKERS
    verify_module.MAX_WORKERS = count
    try:
        yield
    finally:
        verify_module.MAX_WORKERS = saved


@contextlib.contextmanager
def _forced_workers() -> Iterator[None]:
    """One worker per further CPU, however busy the machine is."""
    saved = verify_module._idle_cpus
    verify_module._idle_cpus = lambda: verify_module._cpu_count() - 1
    try:
        yield
    finally:
        verify_module._idle_cpus = saved


async def measure_verify(engine: AsyncEngine, records: int) -> dict[str, float]:
    """Records/s (median of three, interleaved) of each verify walk over the same ``records`` records."""

    async def shipped(session: AsyncSession) -> int:
        result = await verify_chain(session, [], None)
        if not (result.ok and result.count == records):
            raise AssertionError(f"verify: {result}")
        return result.count

    async def one_process(session: AsyncSession) -> int:
        result = await _one_process(session)
        if not (result.ok and result.count == records):
            raise AssertionError(f"verify (one process): {result}")
        return result.count

    async def workers(session: AsyncSession) -> int:
        with _forced_workers():
            result = await verify_chain(session, [], None)
        if not (result.ok and result.count == records):
            raise AssertionError(f"verify (workers): {result}")
        return result.count

    async def before(session: AsyncSession) -> int:
        walk = await verify_before.walk_chain(session, set())
        if walk.first_bad_seq is not None:
            raise AssertionError(f"verify (before): {walk.reason}")
        return walk.count

    walks: dict[str, Callable[[AsyncSession], Awaitable[int]]] = {
        "verify": shipped,
        "one process": one_process,
        "workers": workers,
        "before": before,
        "reference": reference_verify,
    }
    reader = make_read_sessionmaker(engine)
    rates: dict[str, list[float]] = {name: [] for name in walks}
    cpu: dict[str, list[float]] = {name: [] for name in walks}  # µs of this process + its children per record
    server: dict[str, list[float]] = {name: [] for name in walks}  # µs of this session's server process
    for _ in range(3):
        for name, walk in walks.items():
            async with reader() as session:
                backend = await _backend_pid(session)
                server_began = _process_cpu_seconds(backend)
                began, cpu_began = time.perf_counter(), _cpu_seconds()
                count = await walk(session)
                rates[name].append(records / (time.perf_counter() - began))
                cpu[name].append((_cpu_seconds() - cpu_began) / records * 1e6)
                server[name].append((_process_cpu_seconds(backend) - server_began) / records * 1e6)
            if count != records:
                raise AssertionError(f"{name} counted {count}")
    for name, values in rates.items():
        line = f"  {name}: {_join(values, ',.0f')} records/s; CPU here {_join(cpu[name], '.1f')} µs/record"
        if any(server[name]):
            line += f"; this session's server process {_join(server[name], '.1f')} µs/record"
        print(line, flush=True)
    return {name: statistics.median(values) for name, values in rates.items()}


def _join(values: list[float], spec: str) -> str:
    return ", ".join(format(value, spec) for value in values)


async def _backend_pid(session: AsyncSession) -> int | None:
    """The PostgreSQL server process of this session (on this machine), None on SQLite."""
    if session.get_bind().dialect.name != "postgresql":
        return None
    return int((await session.execute(text("SELECT pg_backend_pid()"))).scalar_one())


def _process_cpu_seconds(pid: int | None) -> float:
    if pid is None:
        return 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def _cpu_seconds() -> float:
    """CPU time of this process (all threads) and of its children that ended (verify workers)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


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
        print(f"{backend}: verify, load average {_load()} before", flush=True)
        rates = await measure_verify(engine, verify_records)
        print(f"{backend}: load average {_load()} after", flush=True)
        return Result(
            backend,
            appends,
            chained_ms,
            plain_ms,
            verify_records,
            rates["verify"],
            rates["one process"],
            rates["workers"],
            rates["before"],
            rates["reference"],
        )
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
        "| backend | appends | chained append ms (p50) | plain INSERT ms (p50) | ratio | verify records | "
        "verify/s | one process/s | workers/s | before/s | verify ÷ before | reference walk/s |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(
            f"| {r.backend} | {r.appends} | {r.chained_ms:.2f} | {r.plain_ms:.2f} | "
            f"{r.chained_ms / r.plain_ms:.2f}× | {r.verify_records:,} | {r.verify_rate:,.0f} | "
            f"{r.one_process_rate:,.0f} | {r.workers_rate:,.0f} | {r.before_rate:,.0f} | "
            f"{r.verify_rate / r.before_rate:.2f}× | "
            f"{r.reference_rate:,.0f} |"
        )
    print(
        f"CPUs available: {verify_module._cpu_count()}; verify workers: {verify_module.MAX_WORKERS} at most"
    )


if __name__ == "__main__":
    asyncio.run(main())
