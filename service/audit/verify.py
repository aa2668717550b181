"""Verifying the audit chain: links, hashes and gaps in the database, then the signed checkpoints.

Speed: rows come straight from the database driver in large keyset batches (no ORM or SQLAlchemy row
processing), and each record's canonical JSON is built from one template with the same string encoder
``json.dumps`` uses, so the bytes hashed are exactly ``chain.canonical_json``'s. Anything the fast path does
not recognise (an odd timestamp, a malformed blob, a hash mismatch) is decided by the reference path
(``chain.hashed_fields`` + ``chain.record_hash`` on a SQLAlchemy row), so the verdicts are the reference's.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
from binascii import b2a_base64
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from json.encoder import encode_basestring  # the encoder json.dumps uses
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy import select
from sqlalchemy.exc import DataError
from sqlalchemy.ext.asyncio import AsyncSession

from service.audit.chain import GENESIS_HASH, hashed_fields, record_hash
from service.audit.checkpoints import (
    CheckpointProblem,
    CheckpointReadout,
    LocatedCheckpoint,
    SignedCheckpoint,
)
from service.crypto.envelope import MAGIC, NONCE_BYTES, TAG_BYTES, WRAPPED_KEY_BYTES, DecryptionError
from service.db.models import AuditRecord

VERIFY_BATCH = 10_000
# recorded_at: SQLite stores the text "YYYY-MM-DD HH:MM:SS.ffffff" (naive UTC); PostgreSQL's timestamptz
# arrives as an aware datetime over psycopg's binary protocol.
_SQLITE_QUERY = (
    "SELECT seq, recorded_at, action, outcome, actor_digest, patient_digest, ehr, resource_type, request_id, "
    "sealed, prev_hash, hash FROM audit_records WHERE seq >= ? ORDER BY seq LIMIT ?"
)
# A timestamp before year 1 (which no Python datetime can hold, so psycopg refuses to load it) comes as NULL:
# the fast path then doubts the row and the reference reports it as malformed, instead of the batch failing.
_POSTGRES_QUERY = (
    "SELECT seq, CASE WHEN recorded_at >= '0001-01-01 00:00:00+00' THEN recorded_at END, action, outcome, "
    "actor_digest, patient_digest, ehr, resource_type, request_id, sealed, prev_hash, hash "
    "FROM audit_records WHERE seq >= %s ORDER BY seq LIMIT %s"
)
_SQLITE_TIME = re.compile(r"([1-9]\d{3}-\d\d-\d\d) (?:[01]\d|2[0-3]):[0-5]\d:[0-5]\d\.\d{6}")
_CANONICAL_TIME = re.compile(r"([1-9]\d{3}-\d\d-\d\d)T(?:[01]\d|2[0-3]):[0-5]\d:[0-5]\d\.\d{6}Z")
# The previous hash, "\n", then chain.canonical_json of chain.HASHED_FIELDS (keys sorted); the two values put
# in unescaped (time, base64) are validated first.
_TEMPLATE = (
    '%s\n{"action":%s,"actor_digest":%s,"ehr":%s,"outcome":%s,"patient_digest":%s,"recorded_at":"%s",'
    '"request_id":%s,"resource_type":%s,"sealed_body":"%s","seq":%d}'
)
_MAGIC_LEN = len(MAGIC)
_MIN_BODY = NONCE_BYTES + TAG_BYTES


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


@dataclass
class _ChainWalk:
    """Where the walk is: records verified so far, the hashes checkpoints need, and the first problem."""

    wanted: set[int]
    count: int = 0
    prev_hash: str = GENESIS_HASH
    hashes_at: dict[int, str] = field(default_factory=dict)
    first_bad_seq: int | None = None
    reason: str | None = None
    good_dates: set[str] = field(default_factory=set)
    good_kids: set[bytes] = field(default_factory=set)

    @property
    def last_seq(self) -> int:
        return self.count  # records 1..count verified

    def accept(self, seq: int, stored: str) -> None:
        if seq in self.wanted:
            self.hashes_at[seq] = stored
        self.prev_hash = stored
        self.count = seq


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


async def _walk_chain(session: AsyncSession, wanted: set[int]) -> _ChainWalk:
    walk = _ChainWalk(wanted)
    async with contextlib.aclosing(_batches(session)) as batches:
        async for rows, sqlite in batches:
            start = 0
            while start < len(rows):
                start = _scan(rows, start, walk, sqlite=sqlite)
                if walk.first_bad_seq is not None:
                    return walk
                if start < len(rows):
                    # The fast path could not vouch for this record: the reference decides.
                    seq, stored = rows[start][0], rows[start][-1]
                    verdict = await _reference_verdict(session, seq, walk.prev_hash)
                    if verdict is not None:
                        walk.first_bad_seq, walk.reason = seq, verdict
                        return walk
                    walk.accept(seq, stored)
                    start += 1
    return walk


def _scan(rows: Sequence[tuple[Any, ...]], start: int, walk: _ChainWalk, *, sqlite: bool) -> int:
    """Verify ``rows[start:]`` in one tight loop; return the index of the first row it cannot vouch for.

    Gaps and broken links are final (``walk.first_bad_seq`` is set); other doubts go to the reference path.
    """
    time_pattern = _SQLITE_TIME if sqlite else _CANONICAL_TIME
    encode, sha256 = encode_basestring, hashlib.sha256
    good_dates, good_kids, wanted, hashes_at = walk.good_dates, walk.good_kids, walk.wanted, walk.hashes_at
    expected, prev_hash = walk.count + 1, walk.prev_hash
    index = start
    try:
        for index in range(start, len(rows)):
            seq, at, action, outcome, actor, patient, ehr, rtype, request, sealed, prev, stored = rows[index]
            if seq != expected:
                walk.first_bad_seq, walk.reason = expected, f"record {expected} is missing (gap in seq)"
                return index
            if prev != prev_hash:
                walk.first_bad_seq, walk.reason = seq, f"record {seq} does not link to record {seq - 1}"
                return index
            try:
                if not sqlite:
                    # psycopg's aware datetime (binary, parsed in C); isoformat is C too, unlike strftime.
                    if at.utcoffset():
                        at = at.astimezone(UTC)
                    at = at.isoformat(timespec="microseconds")
                    if not at.endswith("+00:00"):
                        return index
                    at = at[:-6] + "Z"
                if time_pattern.fullmatch(at) is None or type(seq) is not int:
                    return index
                day = at[:10]
                if day not in good_dates:
                    datetime.strptime(day, "%Y-%m-%d")  # a real calendar day, as the reference parses it
                    good_dates.add(day)
                if sqlite:
                    at = f"{day}T{at[11:]}Z"
                kid_len = sealed[_MAGIC_LEN]
                body_at = _MAGIC_LEN + 2 + kid_len + WRAPPED_KEY_BYTES
                kid = sealed[_MAGIC_LEN + 1 : _MAGIC_LEN + 1 + kid_len]
                if (
                    sealed[:_MAGIC_LEN] != MAGIC
                    or kid_len == 0
                    or sealed[_MAGIC_LEN + 1 + kid_len] != WRAPPED_KEY_BYTES
                    or len(sealed) - body_at < _MIN_BODY
                ):
                    return index
                if kid not in good_kids:
                    kid.decode()
                    good_kids.add(kid)
                hashed = _TEMPLATE % (
                    prev,
                    encode(action),
                    "null" if actor is None else encode(actor),
                    "null" if ehr is None else encode(ehr),
                    encode(outcome),
                    "null" if patient is None else encode(patient),
                    at,
                    "null" if request is None else encode(request),
                    "null" if rtype is None else encode(rtype),
                    b2a_base64(memoryview(sealed)[body_at:], newline=False).decode(),
                    seq,
                )
                if sha256(hashed.encode()).hexdigest() != stored:
                    return index
            except (TypeError, ValueError, IndexError, AttributeError):
                return index
            if seq in wanted:
                hashes_at[seq] = stored
            prev_hash = stored
            expected += 1
        return len(rows)
    finally:
        walk.count, walk.prev_hash = expected - 1, prev_hash


async def _batches(session: AsyncSession) -> AsyncGenerator[tuple[Sequence[tuple[Any, ...]], bool]]:
    """Keyset batches of plain driver tuples, read inside the session's transaction.

    The next batch is fetched while the caller hashes the current one (the driver works in its own thread on
    SQLite, in the server on PostgreSQL).
    """
    connection = await session.connection()  # begins the session's transaction (BEGIN on SQLite too)
    sqlite = connection.dialect.name == "sqlite"
    driver = (await connection.get_raw_connection()).driver_connection
    if driver is None:
        raise RuntimeError("the database connection has no driver connection")

    async def fetch(after: int) -> Sequence[tuple[Any, ...]]:
        if sqlite:
            cursor = await driver.execute(_SQLITE_QUERY, (after, VERIFY_BATCH))
            try:
                return list(await cursor.fetchall())
            finally:
                await cursor.close()
        async with driver.cursor(binary=True) as cursor:  # bytea and timestamptz without text parsing
            await cursor.execute(_POSTGRES_QUERY, (after, VERIFY_BATCH))
            return list(await cursor.fetchall())

    pending = asyncio.ensure_future(fetch(1))
    try:
        while True:
            rows = await pending
            if len(rows) == VERIFY_BATCH:
                pending = asyncio.ensure_future(fetch(rows[-1][0] + 1))
            if rows:
                yield rows, sqlite
            if len(rows) < VERIFY_BATCH:
                return
    finally:
        # Let a prefetch in flight finish rather than cancel it: a query cancelled half-way could leave the
        # caller's connection mid-command. Its rows are simply dropped.
        with contextlib.suppress(Exception):
            await pending


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
    readout: CheckpointReadout, walk: _ChainWalk, verify_key: Ed25519PublicKey | None
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
