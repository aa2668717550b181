"""Claim latency with 10 vs 10,000 queued jobs, SQLite and PostgreSQL: is the claim flat with queue depth?

Run from the repo root: ``python -m bench.bench_claim [--rounds 5] [--claims 30] [--deep 10000]
[--postgres postgresql+psycopg://postgres@127.0.0.1:5432/test]``. Prints a markdown table.

Each backend gets two fresh databases, one with 10 queued jobs and one with ``--deep`` (four buckets,
interactive and bulk priorities mixed, as a busy clinic's queue looks). A claim is the worker's own
``JobQueue.claim_batch(max_jobs=8)`` (oldest bucket first); after each timed claim the claimed jobs are put
back to queued (untimed), so the depth stays what it says. Rounds interleave the depths; the ratio is paired
per round.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import statistics
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import insert, text, update
from sqlalchemy.ext.asyncio import AsyncEngine

from service.crypto import Keyring
from service.crypto.envelope import aad_for
from service.crypto.keyring import new_key_material
from service.db.engine import make_engine, make_sessionmaker, migrate
from service.db.models import Job
from service.jobs import JobPriority, JobQueue, JobStatus

POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
BUCKETS = tuple(f"carecanvas-tiny-test|{size}x{size}|steps=2|guidance=7.5" for size in (64, 128, 256, 512))


class Database:
    def __init__(self, label: str, url: str, depth: int) -> None:
        self.label, self.url, self.depth = label, url, depth
        self.keyring = Keyring(new_key_material())
        self.engine: AsyncEngine
        self.queue: JobQueue

    async def open(self) -> None:
        await migrate(self.url)
        self.engine = make_engine(self.url)
        self.queue = JobQueue(make_sessionmaker(self.engine), self.keyring)
        await self._fill()

    async def _fill(self) -> None:
        """``depth`` queued jobs in bulk (one INSERT per 1,000), specs encrypted as enqueue does it."""
        start = datetime.now(UTC) - timedelta(hours=1)
        rows: list[dict[str, Any]] = []
        for index in range(self.depth):
            job_id = str(uuid.uuid4())
            created = start + timedelta(milliseconds=index)
            rows.append(
                {
                    "id": job_id,
                    "kind": "illustration",
                    "bucket": BUCKETS[index % len(BUCKETS)],
                    "status": JobStatus.QUEUED,
                    "priority": JobPriority.BULK if index % 3 else JobPriority.INTERACTIVE,
                    "attempts": 0,
                    "max_attempts": 3,
                    "progress_step": 0,
                    "progress_total": 0,
                    "cancel_requested": False,
                    "spec": self.keyring.encrypt(
                        b'{"prompt": "x", "seed": 1}', aad=aad_for("jobs", job_id, "spec")
                    ),
                    "session_id_hash": "s" * 64,
                    "created_at": created,
                    "updated_at": created,
                }
            )
        sessionmaker = make_sessionmaker(self.engine)
        for first in range(0, len(rows), 1000):
            async with sessionmaker() as session, session.begin():
                await session.execute(insert(Job), rows[first : first + 1000])
        async with self.engine.begin() as connection:
            await connection.execute(text("ANALYZE"))

    async def timed_claim(self) -> float:
        started = time.perf_counter()
        claimed = await self.queue.claim_batch(worker_id="bench", max_jobs=8)
        elapsed = time.perf_counter() - started
        if not claimed:
            raise RuntimeError(f"{self.label}: nothing claimed")
        async with make_sessionmaker(self.engine)() as session, session.begin():
            await session.execute(
                update(Job)
                .where(Job.id.in_([job.id for job in claimed]))
                .values(status=JobStatus.QUEUED, lease_owner=None, lease_expires_at=None, attempts=0)
            )
        return elapsed

    async def close(self) -> None:
        await self.engine.dispose()


async def postgres_schema_url(server_url: str) -> tuple[str, str]:
    schema = f"cc_bench_claim_{secrets.token_hex(5)}"
    admin = make_engine(server_url)
    try:
        async with admin.begin() as connection:
            await connection.execute(text(f'CREATE SCHEMA "{schema}"'))
    finally:
        await admin.dispose()
    return schema, f"{server_url}?options=-csearch_path%3D{schema}"


async def drop_schema(server_url: str, schema: str) -> None:
    admin = make_engine(server_url)
    try:
        async with admin.begin() as connection:
            await connection.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
    finally:
        await admin.dispose()


async def run(arguments: argparse.Namespace, folder: Path) -> list[str]:
    databases: list[Database] = []
    schemas: list[str] = []
    backends = [("SQLite", None)] + ([] if arguments.no_postgres else [("PostgreSQL", arguments.postgres)])
    for backend, server in backends:
        for depth in (10, arguments.deep):
            if server is None:
                url = f"sqlite+aiosqlite:///{folder / f'claim-{depth}.db'}"
            else:
                schema, url = await postgres_schema_url(server)
                schemas.append(schema)
            databases.append(Database(f"{backend}|{depth}", url, depth))
    try:
        for database in databases:
            await database.open()
            for _ in range(5):
                await database.timed_claim()  # warm: connections, statement caches
        medians: dict[str, list[float]] = {database.label: [] for database in databases}
        for round_index in range(arguments.rounds):
            order = databases if round_index % 2 == 0 else databases[::-1]
            for database in order:
                times = [await database.timed_claim() for _ in range(arguments.claims)]
                medians[database.label].append(statistics.median(times))
        lines = [
            f"| backend | claim p50, 10 queued | claim p50, {arguments.deep:,} queued "
            "| ratio (paired, median) |",
            "|---|---:|---:|---:|",
        ]
        for backend, _server in backends:
            shallow, deep = medians[f"{backend}|10"], medians[f"{backend}|{arguments.deep}"]
            paired = [d / s for d, s in zip(deep, shallow, strict=True)]
            lines.append(
                f"| {backend} | {statistics.median(shallow) * 1000:.2f} ms "
                f"| {statistics.median(deep) * 1000:.2f} ms "
                f"| {statistics.median(paired):.2f}× ({min(paired):.2f}–{max(paired):.2f}×) |"
            )
        return lines
    finally:
        for database in databases:
            if hasattr(database, "engine"):
                await database.close()
        for schema in schemas:
            await drop_schema(arguments.postgres, schema)


def main(argv: list[str] | None = None) -> list[str]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--claims", type=int, default=30)
    parser.add_argument("--deep", type=int, default=10_000)
    parser.add_argument("--postgres", default=POSTGRES_URL)
    parser.add_argument("--no-postgres", action="store_true")
    arguments = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="cc-bench-claim-") as folder:
        lines = asyncio.run(run(arguments, Path(folder)))
    print("\n".join(lines))
    return lines


if __name__ == "__main__":
    main()
