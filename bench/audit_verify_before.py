"""The verify walk as shipped before seq ranges and worker processes (for bench_audit's side-by-side run).

A copy of ``service.audit.verify``'s walk at commit 3707b55: keyset batches (``seq >= ? ORDER BY seq LIMIT
?``) of plain driver tuples, the next fetched while one is hashed, PostgreSQL's timestamptz as an aware
datetime, one process. Doubts go to today's reference path (``verify._reference_verdict``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
from binascii import b2a_base64
from collections.abc import AsyncGenerator, Sequence
from datetime import UTC, datetime
from json.encoder import encode_basestring
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from service.audit.chain_scan import ChainWalk as _ChainWalk
from service.audit.verify import _reference_verdict
from service.crypto.envelope import MAGIC, NONCE_BYTES, TAG_BYTES, WRAPPED_KEY_BYTES

VERIFY_BATCH = 10_000
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


async def walk_chain(session: AsyncSession, wanted: set[int]) -> _ChainWalk:
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
