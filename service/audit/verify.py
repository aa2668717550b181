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
from binascii import b2a_base64
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass, field
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
# The database builds each record's canonical JSON up to ``"sealed_body":"`` (the previous hash, "\n", then
# chain.canonical_json's sorted keys); Python adds the base64 body and the seq, and hashes. Four columns
# instead of twelve and no datetime objects: fetching the wide rows was most of the time on PostgreSQL. A
# record the database cannot spell safely gets a NULL prefix and goes to the reference path. A spelling the
# database gets wrong only makes the hash differ (the reference then decides); a match is proof, because each
# spelling is injective: strings JSON-escaped, the time in one fixed form, blobs and odd types refused.
_STRING_KEYS = ("action", "actor_digest", "ehr", "outcome", "patient_digest")
_AFTER_TIME_KEYS = ("request_id", "resource_type")
_NOT_NULL = frozenset({"action", "outcome"})


def _prefix_sql(spell: Callable[[str], str], time_value: str, newline: str) -> str:
    """``prev_hash || "\n" || '{"action":' || … || ',"sealed_body":"'`` with ``spell`` quoting each string."""
    values = [(key, spell(key)) for key in _STRING_KEYS]
    values.append(("recorded_at", time_value))
    values += [(key, spell(key)) for key in _AFTER_TIME_KEYS]
    parts = [f"'{'{' if n == 0 else ','}\"{key}\":' || {value}" for n, (key, value) in enumerate(values)]
    return " || ".join(["prev_hash", newline, *parts, '\',"sealed_body":"\''])


def _sqlite_json(column: str) -> str:
    return f"json_quote({column})"  # SQLite's JSON string escaping is json.dumps's; NULL gives null


def _pg_json(column: str) -> str:
    """Quoted as is when no string of the record needs escaping (``plain``), else ``to_json``."""
    as_is, escaped = f"'\"' || {column} || '\"'", f"to_json({column})::text"
    if column not in _NOT_NULL:
        as_is, escaped = f"coalesce({as_is}, 'null')", f"coalesce({escaped}, 'null')"
    return f"CASE WHEN plain THEN {as_is} ELSE {escaped} END"


_SQLITE_TIME_GLOB = (
    "-".join(["[0-9]" * 4, "[0-9]" * 2, "[0-9]" * 2]) + " " + ":".join(["[0-9]" * 2] * 3) + "."
)
_SQLITE_TIME_GLOB += "[0-9]" * 6
# Text columns only (a blob would make json_quote fail), the time exactly as SQLAlchemy writes it.
_SQLITE_SPELLABLE = " AND ".join(
    [
        "typeof(seq) = 'integer'",
        "typeof(prev_hash) = 'text'",
        "typeof(recorded_at) = 'text'",
        *(f"typeof({key}) = 'text'" for key in sorted(_NOT_NULL)),
        *(
            f"typeof({key}) IN ('text', 'null')"
            for key in (*_STRING_KEYS, *_AFTER_TIME_KEYS)
            if key not in _NOT_NULL
        ),
        f"recorded_at GLOB '{_SQLITE_TIME_GLOB}'",
    ]
)
_SQLITE_TIME = "'\"' || substr(recorded_at, 1, 10) || 'T' || substr(recorded_at, 12) || 'Z\"'"
_SQLITE_QUERY = (  # built from constants only
    f"SELECT seq, hash, sealed, CASE WHEN {_SQLITE_SPELLABLE} "  # noqa: S608
    f"THEN {_prefix_sql(_sqlite_json, _SQLITE_TIME, 'char(10)')} END "
    "FROM audit_records WHERE seq >= ? ORDER BY seq LIMIT ?"
)
# Years 1000-9999 only, so the four-digit year is the whole year (to_char drops the era). ``plain``: no
# character of the record's strings needs JSON escaping, checked once on their concatenation.
_PG_TIME = "'\"' || to_char(recorded_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"') || '\"'"
_PG_SPELLABLE = "recorded_at >= '1000-01-01 00:00:00+00' AND recorded_at < '10000-01-01 00:00:00+00'"
_PG_PLAIN = f"concat({', '.join((*_STRING_KEYS, *_AFTER_TIME_KEYS))}) !~ '[\\x01-\\x1f\"\\\\]' AS plain"
_PG_NEWLINE = "E'\\n'"
_POSTGRES_QUERY = (  # built from constants only
    f"SELECT seq, hash, sealed, CASE WHEN {_PG_SPELLABLE} "  # noqa: S608
    f"THEN {_prefix_sql(_pg_json, _PG_TIME, _PG_NEWLINE)} "
    f"END FROM audit_records CROSS JOIN LATERAL (SELECT {_PG_PLAIN}) AS spelling "
    "WHERE seq >= %s ORDER BY seq LIMIT %s"
)
_SUFFIX = '%s%s","seq":%d}'
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
        async for rows in batches:
            start = 0
            while start < len(rows):
                start = _scan(rows, start, walk)
                if walk.first_bad_seq is not None:
                    return walk
                if start < len(rows):
                    # The fast path could not vouch for this record: the reference decides.
                    seq, stored = rows[start][0], rows[start][1]
                    verdict = await _reference_verdict(session, seq, walk.prev_hash)
                    if verdict is not None:
                        walk.first_bad_seq, walk.reason = seq, verdict
                        return walk
                    walk.accept(seq, stored)
                    start += 1
    return walk


def _scan(rows: Sequence[tuple[Any, ...]], start: int, walk: _ChainWalk) -> int:
    """Verify ``rows[start:]`` in one tight loop; return the index of the first row it cannot vouch for.

    Gaps and broken links are final (``walk.first_bad_seq`` is set); other doubts go to the reference path.
    """
    sha256, suffix = hashlib.sha256, _SUFFIX
    good_kids, wanted, hashes_at = walk.good_kids, walk.wanted, walk.hashes_at
    expected, prev_hash = walk.count + 1, walk.prev_hash
    index = start
    try:
        for index in range(start, len(rows)):
            seq, stored, sealed, prefix = rows[index]
            if seq != expected:
                walk.first_bad_seq, walk.reason = expected, f"record {expected} is missing (gap in seq)"
                return index
            if prefix is None:
                return index  # the database could not spell it: the reference decides, link included
            if not prefix.startswith(prev_hash):
                walk.first_bad_seq, walk.reason = seq, f"record {seq} does not link to record {seq - 1}"
                return index
            try:
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
                body = b2a_base64(memoryview(sealed)[body_at:], newline=False).decode()
                if sha256((suffix % (prefix, body, seq)).encode()).hexdigest() != stored:
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


async def _batches(session: AsyncSession) -> AsyncGenerator[Sequence[tuple[Any, ...]]]:
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
                yield rows
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
