"""Compliance search latency: digest filters in SQL vs decrypting every record and filtering in Python.

Usage (from the repo root): python -m bench.bench_audit_search [--records 20000] [--postgres URL]
Each backend gets a fresh database (a temp SQLite file; a throwaway PostgreSQL schema dropped afterwards).
Records: 200 patients, 40 users, 30 days. Printed as a table (not part of the test run).
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import select, text

from service.audit import AuditLog
from service.audit.reports import ReportKind, ReportSettings, run_report
from service.audit.search import AuditQuery, search_audit, users_who_touched
from service.crypto import Keyring
from service.crypto.keyring import new_key_material
from service.db.engine import make_engine, make_sessionmaker, migrate
from service.db.models import AuditRecord

START = datetime(2026, 11, 1, tzinfo=UTC)
DAYS = 30


async def fill(sessionmaker, records: int) -> AuditLog:
    step = timedelta(days=DAYS) / records
    clock = {"now": START}
    audit = AuditLog(Keyring(new_key_material()), clock=lambda: clock["now"])
    for first in range(0, records, 1000):
        async with sessionmaker() as session, session.begin():
            for n in range(first, min(first + 1000, records)):
                clock["now"] = START + step * n
                await audit.append(
                    session,
                    action=("fhir.read", "view", "launch", "approve")[n % 4],
                    outcome="denied" if n % 97 == 0 else "success",
                    actor=f"Practitioner/prac-{n % 40}",
                    patient=f"pat-{n % 200}",
                    ehr="bench",
                    resource="Condition/c",
                    request_id=f"req-{n // 5}",
                    detail={"n": n},
                )
            session.expunge_all()
    return audit


async def timed(run: Callable[[], Awaitable[object]], repeats: int = 5) -> float:
    """Median milliseconds of ``repeats`` runs."""
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        await run()
        samples.append((time.perf_counter() - started) * 1000)
    return statistics.median(samples)


async def measure(url: str, records: int) -> dict[str, float]:
    await migrate(url)
    engine = make_engine(url)
    sessionmaker = make_sessionmaker(engine)
    try:
        audit = await fill(sessionmaker, records)
        query = AuditQuery(patient="pat-17", limit=50)

        async def by_digest() -> object:
            async with sessionmaker() as db:
                page = await search_audit(db, audit, query)
                assert page.total == records // 200
                return page

        async def by_decrypting_everything() -> object:
            # What search would cost without the keyed digests: decrypt every record, filter in Python.
            async with sessionmaker() as db:
                rows = (await db.execute(select(AuditRecord).order_by(AuditRecord.seq.desc()))).scalars()
                matches = [e for e in (audit.entry_of(row) for row in rows) if e.patient == "pat-17"]
                assert len(matches) == records // 200
                return matches[:50]

        async def drill_down() -> object:
            async with sessionmaker() as db:
                return await users_who_touched(db, audit, "pat-17")

        async def after_hours() -> object:
            async with sessionmaker() as db:
                return await run_report(
                    db,
                    audit,
                    ReportKind.AFTER_HOURS,
                    since=START,
                    until=START + timedelta(days=DAYS),
                    rules=ReportSettings(timezone="Europe/Berlin"),
                )

        async def many_patients() -> object:
            async with sessionmaker() as db:
                return await run_report(
                    db,
                    audit,
                    ReportKind.MANY_PATIENTS,
                    since=START,
                    until=START + timedelta(days=DAYS),
                    rules=ReportSettings(many_patients_per_day=20),
                )

        return {
            "search page (digest, SQL)": await timed(by_digest),
            "decrypt all + filter": await timed(by_decrypting_everything, repeats=1),
            "users who touched a patient": await timed(drill_down),
            "after-hours report (30 days)": await timed(after_hours),
            "many-patients report (30 days)": await timed(many_patients),
        }
    finally:
        await engine.dispose()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--records", type=int, default=20_000)
    parser.add_argument("--postgres", default="postgresql+psycopg://postgres@127.0.0.1:5432/test")
    args = parser.parse_args()
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as folder:
        results["sqlite"] = await measure(f"sqlite+aiosqlite:///{Path(folder) / 'bench.db'}", args.records)
    schema = f"bench_{secrets.token_hex(4)}"
    admin = make_engine(args.postgres)
    try:
        async with admin.begin() as connection:
            await connection.execute(text(f'CREATE SCHEMA "{schema}"'))
        results["postgresql"] = await measure(
            f"{args.postgres}?options=-csearch_path%3D{schema}", args.records
        )
    finally:
        async with admin.begin() as connection:
            await connection.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        await admin.dispose()
    print(f"\n{args.records} audit records; median ms")
    print(f"{'':34}" + "".join(f"{name:>14}" for name in results))
    for label in results["sqlite"]:
        print(f"{label:34}" + "".join(f"{results[name][label]:>14.1f}" for name in results))
    for name, values in results.items():
        ratio = values["decrypt all + filter"] / values["search page (digest, SQL)"]
        print(f"{name}: digest search is {ratio:.0f}x faster than decrypting every record")


if __name__ == "__main__":
    asyncio.run(main())
