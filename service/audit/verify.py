"""Verifying the audit chain: links, hashes and gaps in the database, then the signed checkpoints.

Speed: rows come straight from the database driver in seq ranges (no ORM or SQLAlchemy row processing), and
``chain_scan.scan`` builds each record's canonical JSON from one template with the same string encoder
``json.dumps`` uses, so the bytes hashed are exactly ``chain.canonical_json``'s. A log of
``PARALLEL_MIN_RECORDS`` or more is cut into seq ranges verified side by side: this process walks the first,
``chain_scan`` worker processes (standard library only, each with its own read-only connection) the others,
each worker reading the record before its range for the hash the range must link to; this process checks
that hash against the one it verified there. Where a worker stopped (a gap, a broken link, a record its scan
could not vouch for), could not run, or said something odd, this process walks on from there itself, so every
verdict and reason is the one-process walk's. Anything the scan does not recognise (an odd timestamp, a
malformed blob, a hash mismatch) is decided by the reference path (``chain.hashed_fields`` +
``chain.record_hash`` on a SQLAlchemy row), so the verdicts are the reference's.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import sys
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from psycopg.conninfo import make_conninfo
from sqlalchemy import select
from sqlalchemy.exc import DataError
from sqlalchemy.ext.asyncio import AsyncSession

from service.audit import chain_scan
from service.audit.chain import hashed_fields, record_hash
from service.audit.chain_scan import ChainWalk, scan
from service.audit.checkpoints import (
    CheckpointProblem,
    CheckpointReadout,
    LocatedCheckpoint,
    SignedCheckpoint,
)
from service.crypto.envelope import DecryptionError
from service.db.models import AuditRecord

VERIFY_BATCH = chain_scan.BATCH
# From this many records on, seq ranges are verified side by side: this process takes the first range, worker
# processes (one per further idle CPU, at most MAX_WORKERS in all) the others, each with its own connection.
PARALLEL_MIN_RECORDS = 20_000
MAX_WORKERS = 4
# A worker starts in about 0.1 s (SQLite) to 0.3 s (psycopg's import): this process takes a larger range.
FIRST_RANGE_SHARE = 1.25
WORKER_SCRIPT = chain_scan.__file__  # run by path: the child imports neither ``service`` nor SQLAlchemy


@dataclass(frozen=True)
class VerifyResult:
    """The chain's verdict, every checkpoint problem, and how far valid checkpoints anchor the chain."""

    ok: bool
    count: int
    first_bad_seq: int | None = None
    reason: str | None = None  # the first problem, for one-line callers
    checkpoints_checked: int = 0  # well-formed, correctly signed and matching the chain
    anchored_seq: int = 0  # the highest record a valid checkpoint covers
    problems: tuple[CheckpointProblem, ...] = ()
    checkpoint_source: str = ""
    chain_intact: bool = True
    last_checkpoint: SignedCheckpoint | None = None

    @property
    def unanchored(self) -> int:
        return max(self.count - self.anchored_seq, 0)

    def anchor_statement(self) -> str:
        """How far the checkpoints anchor the chain, in one sentence."""
        if not self.chain_intact:
            return (
                f"{self.count:,} records verified before the break; "
                f"{min(self.anchored_seq, self.count):,} of them anchored by a valid signed checkpoint"
            )
        if self.count == 0:
            return "0 records; nothing to anchor"
        if self.anchored_seq == 0:
            return (
                f"{self.count:,} records, none anchored: no valid signed checkpoint covers them, so records "
                "deleted from the end of the log would go unnoticed"
            )
        if self.unanchored:
            return (
                f"{self.count:,} records, last {self.unanchored:,} not yet anchored "
                f"(last signed checkpoint at record {self.anchored_seq:,})"
            )
        return (
            f"{self.count:,} records, all anchored (last signed checkpoint at record {self.anchored_seq:,})"
        )


async def verify_chain(
    session: AsyncSession,
    checkpoints: CheckpointReadout | Sequence[SignedCheckpoint],
    verify_key: Ed25519PublicKey | None,
) -> VerifyResult:
    """Walk the chain (links, hashes, gaps), then check every checkpoint against the key and the chain."""
    readout = _as_readout(checkpoints)
    walk = await _walk_chain(session, {located.checkpoint.seq for located in readout.checkpoints})
    return check_checkpoints(readout, walk, verify_key)


def _as_readout(checkpoints: CheckpointReadout | Sequence[SignedCheckpoint]) -> CheckpointReadout:
    if isinstance(checkpoints, CheckpointReadout):
        return checkpoints
    located = tuple(LocatedCheckpoint(line, cp) for line, cp in enumerate(checkpoints, start=1))
    return CheckpointReadout(source="given checkpoints", checkpoints=located)


async def _walk_chain(session: AsyncSession, wanted: set[int]) -> ChainWalk:
    walk = ChainWalk(wanted)
    source = await _Source.open(session)
    top = await source.max_seq()
    parts = _parts(top)
    if parts > 1 and (target := await source.worker_target()) is not None:
        ranges = _ranges(top, parts)
        workers = [_Worker.start(source.backend, target, lo, hi, wanted) for lo, hi in ranges[1:]]
        try:
            await _serial_walk(session, source, walk, until=ranges[0][1])
            for worker in workers:
                if walk.first_bad_seq is not None:
                    break
                if walk.count == worker.lo - 1 and await worker.continue_walk(walk):
                    continue
                # Where the worker stopped (or could not run), or short of its range: walk it here.
                await _serial_walk(session, source, walk, until=worker.hi)
        finally:
            for worker in workers:
                await worker.close()
    if walk.first_bad_seq is None:
        await _serial_walk(session, source, walk, until=None)  # what is left, and records appended meanwhile
    return walk


def _parts(top: int) -> int:
    if top < PARALLEL_MIN_RECORDS:
        return 1
    return max(1, min(MAX_WORKERS, _cpu_count(), 1 + _idle_cpus()))


def _idle_cpus() -> int:
    """Whole CPUs the rest of the machine leaves idle (by the 1-minute load average).

    A worker only pays on a CPU of its own: on a machine already busy it would slow the walk down (its start
    and its share of the CPU are spent on top of the same work).
    """
    try:
        load = os.getloadavg()[0]
    except OSError:  # not available here
        return 0
    return max(0, math.floor(_cpu_count() - load - 0.25))


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _ranges(top: int, parts: int) -> list[tuple[int, int]]:
    """``1..top`` in ``parts`` consecutive ranges, the first ``FIRST_RANGE_SHARE`` times the others."""
    first = min(top, round(top * FIRST_RANGE_SHARE / (FIRST_RANGE_SHARE + parts - 1)))
    rest = top - first
    bounds = [(1, first)]
    lo = first + 1
    for index in range(parts - 1):
        hi = first + rest * (index + 1) // (parts - 1)
        if hi >= lo:
            bounds.append((lo, hi))
        lo = hi + 1
    return bounds


async def _serial_walk(session: AsyncSession, source: _Source, walk: ChainWalk, *, until: int | None) -> None:
    """Verify from ``walk.count + 1`` up to ``until`` (None: to the end of the log, as it grows)."""
    async with contextlib.aclosing(source.batches(walk.count + 1, until)) as batches:
        async for rows in batches:
            start = 0
            while start < len(rows):
                start = scan(rows, start, walk, sqlite=source.sqlite)
                if walk.first_bad_seq is not None:
                    return
                if start < len(rows):
                    # The fast path could not vouch for this record: the reference decides.
                    seq, stored = rows[start][0], rows[start][-1]
                    verdict = await _reference_verdict(session, seq, walk.prev_hash)
                    if verdict is not None:
                        walk.first_bad_seq, walk.reason = seq, verdict
                        return
                    walk.accept(seq, stored)
                    start += 1


@dataclass
class _Source:
    """The session's own driver connection: plain driver tuples read inside the session's transaction."""

    driver: Any
    sqlite: bool

    @classmethod
    async def open(cls, session: AsyncSession) -> _Source:
        connection = await session.connection()  # begins the session's transaction (BEGIN on SQLite too)
        driver = (await connection.get_raw_connection()).driver_connection
        if driver is None:
            raise RuntimeError("the database connection has no driver connection")
        return cls(driver, connection.dialect.name == "sqlite")

    @property
    def backend(self) -> str:
        return "sqlite" if self.sqlite else "postgresql"

    async def fetch(self, lo: int, hi: int) -> Sequence[tuple[Any, ...]]:
        if self.sqlite:
            cursor = await self.driver.execute(chain_scan.SQLITE_RANGE, (lo, hi))
            try:
                return list(await cursor.fetchall())
            finally:
                await cursor.close()
        async with chain_scan.postgres_cursor(self.driver) as cursor:
            await cursor.execute(chain_scan.POSTGRES_RANGE, (lo, hi))
            return list(await cursor.fetchall())

    async def max_seq(self) -> int:
        if self.sqlite:
            cursor = await self.driver.execute("SELECT max(seq) FROM audit_records")
            try:
                row = await cursor.fetchone()
            finally:
                await cursor.close()
        else:
            async with self.driver.cursor() as cursor:
                await cursor.execute("SELECT max(seq) FROM audit_records")
                row = await cursor.fetchone()
        top = row[0] if row else None
        return top if isinstance(top, int) else 0

    async def worker_target(self) -> str | None:
        """What a worker connects to: the SQLite file, or the same libpq parameters; None for memory."""
        if self.sqlite:
            cursor = await self.driver.execute("PRAGMA database_list")
            try:
                files = {name: path for _, name, path in await cursor.fetchall()}
            finally:
                await cursor.close()
            return files.get("main") or None  # "" for an in-memory database
        info = self.driver.info
        return str(make_conninfo(info.dsn, password=info.password) if info.password else info.dsn)

    async def batches(self, start: int, until: int | None) -> AsyncGenerator[Sequence[tuple[Any, ...]]]:
        """Seq ranges of ``VERIFY_BATCH`` from ``start``; the next is fetched while the caller hashes one.

        The driver works in its own thread on SQLite, in the server on PostgreSQL. Without ``until`` the
        walk goes on to the highest seq, read again when reached (records appended meanwhile).
        """
        top = until if until is not None else await self.max_seq()
        lo = start
        if lo > top:
            return
        hi = min(lo + VERIFY_BATCH, top + 1)
        pending = asyncio.ensure_future(self.fetch(lo, hi))
        try:
            while True:
                rows = await pending
                lo = hi
                if lo > top and until is None:
                    top = await self.max_seq()
                if lo <= top:
                    hi = min(lo + VERIFY_BATCH, top + 1)
                    pending = asyncio.ensure_future(self.fetch(lo, hi))
                yield rows
                if lo > top:
                    return
        finally:
            # Let a prefetch in flight finish rather than cancel it: a query cancelled half-way could leave
            # the caller's connection mid-command. Its rows are simply dropped.
            with contextlib.suppress(Exception):
                await pending


@dataclass
class _Worker:
    """A ``chain_scan`` process verifying ``lo..hi`` on its own connection."""

    lo: int
    hi: int
    answer: asyncio.Future[tuple[bytes, bytes]] | None
    process: asyncio.subprocess.Process | None = None

    @classmethod
    def start(cls, backend: str, target: str, lo: int, hi: int, wanted: set[int]) -> _Worker:
        job = {
            "backend": backend,
            "database": target,
            "lo": lo,
            "hi": hi,
            "wanted": sorted(seq for seq in wanted if lo <= seq <= hi),
            "batch": VERIFY_BATCH,
        }
        worker = cls(lo, hi, None)
        worker.answer = asyncio.ensure_future(worker._run(json.dumps(job).encode()))
        return worker

    async def _run(self, job: bytes) -> tuple[bytes, bytes]:
        self.process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-I",  # no PYTHON* variables, no script folder or user site on the path: stdlib and the venv
            WORKER_SCRIPT,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )
        return await self.process.communicate(job)

    async def continue_walk(self, walk: ChainWalk) -> bool:
        """Take this range's verdict into ``walk``; False when the walk must go on serially from there."""
        if self.answer is None:
            return False
        try:
            out, _ = await self.answer
            if self.process is None or self.process.returncode != 0:
                return False
            answer = json.loads(out)
            count, last_hash, stopped = answer["count"], answer["last_hash"], answer["stopped"]
            hashes_at = {int(seq): value for seq, value in answer["hashes_at"].items()}
        except (ValueError, KeyError, TypeError, AttributeError, OSError):
            return False  # the worker could not run (or said something odd): this process does the range
        if answer.get("anchor") != walk.prev_hash or not isinstance(last_hash, str):
            return False
        if not (isinstance(count, int) and self.lo - 1 <= count <= self.hi):
            return False
        if not all(self.lo <= seq <= count and seq in walk.wanted for seq in hashes_at):
            return False
        walk.hashes_at.update(hashes_at)
        walk.count, walk.prev_hash = count, last_hash
        return stopped is False and count == self.hi

    async def close(self) -> None:
        if self.answer is None:
            return
        if not self.answer.done():
            with contextlib.suppress(ProcessLookupError):
                if self.process is not None and self.process.returncode is None:
                    self.process.kill()
        with contextlib.suppress(Exception):
            await self.answer
        self.answer = None


async def _reference_verdict(session: AsyncSession, seq: int, prev_hash: str) -> str | None:
    """The reference check of one record through SQLAlchemy's types: None when it is intact."""
    try:
        row = (
            await session.execute(select(*AuditRecord.__table__.columns).where(AuditRecord.seq == seq))
        ).one()
    except (ValueError, TypeError, DataError):  # DataError: the driver cannot load it (a year before 1)
        return f"record {seq} has malformed stored fields"
    if row.prev_hash != prev_hash:
        return f"record {seq} does not link to record {seq - 1}"
    try:
        fields = hashed_fields(row)
    except DecryptionError:
        return f"record {seq} has a malformed sealed payload"
    except (ValueError, TypeError):
        return f"record {seq} has malformed stored fields"
    try:
        intact = record_hash(prev_hash, fields) == row.hash
    except (ValueError, TypeError):
        return f"record {seq} has malformed stored fields"
    return None if intact else f"record {seq} was modified (hash mismatch)"


def check_checkpoints(
    readout: CheckpointReadout, walk: ChainWalk, verify_key: Ed25519PublicKey | None
) -> VerifyResult:
    """Every checkpoint on its own: bad lines are listed; valid ones must match the chain they cover."""
    problems = list(readout.problems)
    first_bad_seq, reason = walk.first_bad_seq, walk.reason
    chain_intact = first_bad_seq is None
    if readout.checkpoints and verify_key is None:
        problems.append(
            CheckpointProblem(
                None,
                f"{len(readout.checkpoints)} checkpoints but no verification key is configured "
                "(CARECANVAS_AUDIT_VERIFY_KEY_FILE, or --public-key)",
            )
        )
    checked = 0
    anchored = 0
    last_valid: SignedCheckpoint | None = None
    previous_good = 0
    for located in sorted(readout.checkpoints, key=lambda item: (item.checkpoint.seq, item.line)):
        if verify_key is None:
            break
        checkpoint, line = located.checkpoint, located.line
        if not checkpoint.is_signed_by(verify_key):
            problems.append(
                CheckpointProblem(line, f"checkpoint at seq {checkpoint.seq} has an invalid signature")
            )
            continue
        if walk.first_bad_seq is not None and checkpoint.seq >= walk.first_bad_seq:
            continue  # covers the broken part; the chain's own verdict already says where
        if checkpoint.seq > walk.last_seq:
            if first_bad_seq is None:
                first_bad_seq = walk.last_seq + 1
                reason = (
                    f"chain ends at seq {walk.last_seq} but a signed checkpoint covers seq {checkpoint.seq} "
                    f"(line {line}): records were deleted from the tail"
                )
            continue
        if checkpoint.seq and walk.hashes_at.get(checkpoint.seq) != checkpoint.head_hash:
            if first_bad_seq is None or previous_good + 1 < first_bad_seq:
                first_bad_seq = previous_good + 1
                reason = (
                    f"records {previous_good + 1}..{checkpoint.seq} do not match the signed checkpoint "
                    f"at seq {checkpoint.seq} (line {line}): the chain was rewritten"
                )
            continue
        checked += 1
        previous_good = checkpoint.seq
        anchored = max(anchored, checkpoint.seq)
        last_valid = checkpoint
    ok = first_bad_seq is None and not problems
    if reason is None and problems:
        first = problems[0]
        reason = first.reason if first.line is None else f"checkpoint line {first.line}: {first.reason}"
    return VerifyResult(
        ok=ok,
        count=walk.count,
        first_bad_seq=first_bad_seq,
        reason=reason,
        checkpoints_checked=checked,
        anchored_seq=anchored,
        problems=tuple(problems),
        checkpoint_source=readout.source,
        chain_intact=chain_intact and first_bad_seq is None,
        last_checkpoint=last_valid,
    )
