"""Audit append and verify rates on SQLite and PostgreSQL, printed as a table (not part of the test run).

Usage (from the repo root): python -m bench.bench_audit [--records 500] [--postgres postgresql://postgres@127.0.0.1:5432/test]
Each backend gets a fresh database (a temp SQLite file; a throwaway PostgreSQL schema dropped afterwards).
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import tempfile
import time
from pathlib import Path

from sqlalchemy import text

from service.audit import AuditLog
from service.crypto import Keyring
from service.crypto.keyring import new_key_material
from service.db.engine import make_engine, make_sessionmaker, migrate


async def measure(url: str, records: int) -> tuple[float, float]:
    await migrate(url)
    engine = make_engine(url)
    sessionmaker = make_sessionmaker(engine)
    audit = AuditLog(Keyring(new_key_material()))
    try:
        started = time.perf_counter()
        for n in range(records):
            async with sessionmaker() as session, session.begin():
                await audit.append(
                    session,
                    action="fhir.read",
                    outcome="success",
                    actor="Practitioner/p",
                    patient=f"pat-{n % 7}",
                    ehr="bench",
                    resource="Condition/c",
                    request_id=str(n),
                    detail={"n": n},
                )
        append_rate = records / (time.perf_counter() - started)
        started = time.perf_counter()
        async with sessionmaker() as session, session.begin():
            result = await audit.verify(session)
        verify_rate = result.count / (time.perf_counter() - started)
        assert result.ok
        assert result.count == records
        return append_rate, verify_rate
    finally:
        await engine.dispose()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--records", type=int, default=500)
    parser.add_argument("--postgres", default="postgresql+psycopg://postgres@127.0.0.1:5432/test")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as directory:
        rows.append(("sqlite", *await measure(f"sqlite:///{Path(directory) / 'bench.db'}", args.records)))
    schema = f"cc_bench_{secrets.token_hex(4)}"
    admin = make_engine(args.postgres)
    try:
        async with admin.begin() as connection:
            await connection.execute(text(f'CREATE SCHEMA "{schema}"'))
        rows.append(
            ("postgresql", *await measure(f"{args.postgres}?options=-csearch_path%3D{schema}", args.records))
        )
    finally:
        async with admin.begin() as connection:
            await connection.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        await admin.dispose()
    print(f"{'backend':<12} {'records':>8} {'append/s':>10} {'verify/s':>10}")
    for backend, append_rate, verify_rate in rows:
        print(f"{backend:<12} {args.records:>8} {append_rate:>10.0f} {verify_rate:>10.0f}")


if __name__ == "__main__":
    asyncio.run(main())
