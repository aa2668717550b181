"""The audit chain's fast check of stored rows, and a worker process that runs it over one seq range.

Standard library only (psycopg is imported when a PostgreSQL worker connects), so a worker process starts
cheaply: ``service.audit.verify`` runs this file by path (``python -I chain_scan.py``), which imports neither
the ``service`` package nor SQLAlchemy. The worker reads its job (the database, a seq range, the checkpoint
seqs wanted) as JSON on stdin, so no password appears in a process listing, and writes one JSON line.

The scan builds each record's canonical JSON from one template with the same string encoder ``json.dumps``
uses, so the bytes hashed are exactly ``chain.canonical_json``'s. It stops at the first record it cannot vouch
for; the caller decides that record (gap, broken link, or the reference path's verdict) and goes on.
"""

from __future__ import annotations

import hashlib
import json
import re
import sqlite3
import sys
from binascii import b2a_base64
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from json.encoder import encode_basestring  # the encoder json.dumps uses
from typing import Any
from urllib.parse import quote

GENESIS_HASH = "0" * 64  # chain.GENESIS_HASH (a test checks they agree)
# service.crypto.envelope's blob layout: MAGIC, key id length, key id, wrapped key length, wrapped key, then
# the body (nonce + ciphertext + tag) that the hash covers. A test checks they agree with the envelope.
MAGIC = b"CC1"
NONCE_BYTES = 12
TAG_BYTES = 16
WRAPPED_KEY_BYTES = NONCE_BYTES + 32 + TAG_BYTES

_COLUMNS = (
    "seq, {at}, action, outcome, actor_digest, patient_digest, ehr, resource_type, request_id, sealed, "
    "prev_hash, hash FROM audit_records"
)
# Seq ranges, not ``seq >= x ORDER BY seq LIMIT n``: PostgreSQL without table statistics (a fresh table, or
# autovacuum off) plans that as a scan and sort of the whole table for every batch; a range stays on the
# primary key. recorded_at: SQLite stores the text "YYYY-MM-DD HH:MM:SS.ffffff" (naive UTC).
SQLITE_RANGE = "SELECT " + _COLUMNS.format(at="recorded_at") + " WHERE seq >= ? AND seq < ? ORDER BY seq"
# recorded_at is read as an int8 (see ``scan``): a time no Python datetime can hold (before year 1, infinity)
# then fails in the scan, not in the driver, and the reference reports it as malformed.
POSTGRES_RANGE = "SELECT " + _COLUMNS.format(at="recorded_at") + " WHERE seq >= %s AND seq < %s ORDER BY seq"
BATCH = 10_000

_SQLITE_TIME = re.compile(r"([1-9]\d{3}-\d\d-\d\d) (?:[01]\d|2[0-3]):[0-5]\d:[0-5]\d\.\d{6}")
_POSTGRES_EPOCH = date(2000, 1, 1).toordinal()
# The previous hash, "\n", then chain.canonical_json of chain.HASHED_FIELDS (keys sorted; the first five as
# _HEAD, kept per distinct five values, at most _HEADS_KEPT of them); the two values put in unescaped (time,
# base64) are validated first.
_HEAD = '"action":%s,"actor_digest":%s,"ehr":%s,"outcome":%s,"patient_digest":%s'
_TEMPLATE = '%s\n{%s,"recorded_at":"%s","request_id":%s,"resource_type":%s,"sealed_body":"%s","seq":%d}'
_HEADS_KEPT = 4096
_MAGIC_LEN = len(MAGIC)
_MIN_BODY = NONCE_BYTES + TAG_BYTES


@dataclass
class ChainWalk:
    """Where a walk is: records verified so far, the hashes checkpoints need, and the first problem."""

    wanted: set[int]
    count: int = 0  # records 1..count verified (or, in a worker, lo..count after the record lo-1)
    prev_hash: str = GENESIS_HASH
    hashes_at: dict[int, str] = field(default_factory=dict)
    first_bad_seq: int | None = None
    reason: str | None = None
    good_dates: set[str] = field(default_factory=set)
    good_kids: set[bytes] = field(default_factory=set)
    day_names: dict[int, str] = field(default_factory=dict)  # PostgreSQL: day number -> YYYY-MM-DD
    heads: dict[tuple[Any, ...], str] = field(default_factory=dict)  # see scan

    @property
    def last_seq(self) -> int:
        return self.count

    def accept(self, seq: int, stored: str) -> None:
        if seq in self.wanted:
            self.hashes_at[seq] = stored
        self.prev_hash = stored
        self.count = seq


def scan(rows: Sequence[tuple[Any, ...]], start: int, walk: ChainWalk, *, sqlite: bool) -> int:
    """Verify ``rows[start:]`` in one tight loop; return the index of the first row it cannot vouch for.

    Gaps and broken links are final (``walk.first_bad_seq`` is set); other doubts go to the reference path.
    """
    time_pattern = _SQLITE_TIME
    encode, sha256 = encode_basestring, hashlib.sha256
    good_dates, good_kids, day_names = walk.good_dates, walk.good_kids, walk.day_names
    wanted, hashes_at, heads = walk.wanted, walk.hashes_at, walk.heads
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
                if sqlite:
                    if time_pattern.fullmatch(at) is None:
                        return index
                    day = at[:10]
                    if day not in good_dates:
                        datetime.strptime(day, "%Y-%m-%d")  # a real calendar day, as the reference parses it
                        good_dates.add(day)
                    at = f"{day}T{at[11:]}Z"
                else:
                    # timestamptz as psycopg's int8 loader reads its binary form: microseconds since
                    # 2000-01-01 UTC (no datetime, no time zone object; the day's name is cached).
                    days, micros = divmod(at, 86_400_000_000)
                    day = day_names.get(days)
                    if day is None:
                        moment = date.fromordinal(_POSTGRES_EPOCH + days)
                        if moment.year < 1000:  # canonical_time would not spell it with 4 digits
                            return index
                        day = day_names[days] = moment.isoformat()
                    seconds, micros = divmod(micros, 1_000_000)
                    minutes, seconds = divmod(seconds, 60)
                    at = f"{day}T{minutes // 60:02d}:{minutes % 60:02d}:{seconds:02d}.{micros:06d}Z"
                if type(seq) is not int:
                    return index
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
                # The first five keys, spelled once per distinct (action, actor, ehr, outcome, patient): one
                # user's work on one patient repeats them record after record.
                head = heads.get((action, actor, ehr, outcome, patient))
                if head is None:
                    head = _HEAD % (
                        encode(action),
                        "null" if actor is None else encode(actor),
                        "null" if ehr is None else encode(ehr),
                        encode(outcome),
                        "null" if patient is None else encode(patient),
                    )
                    if len(heads) >= _HEADS_KEPT:
                        heads.clear()
                    heads[(action, actor, ehr, outcome, patient)] = head
                hashed = _TEMPLATE % (
                    prev,
                    head,
                    at,
                    "null" if request is None else encode(request),
                    "null" if rtype is None else encode(rtype),
                    b2a_base64(sealed[body_at:], newline=False).decode(),
                    seq,
                )
                if sha256(hashed.encode()).hexdigest() != stored:
                    return index
            except (TypeError, ValueError, IndexError, AttributeError, OverflowError):
                return index
            if seq in wanted:
                hashes_at[seq] = stored
            prev_hash = stored
            expected += 1
        return len(rows)
    finally:
        walk.count, walk.prev_hash = expected - 1, prev_hash


def verify_range(fetch: Any, lo: int, hi: int, wanted: set[int], batch: int = BATCH) -> dict[str, Any]:
    """Verify records ``lo..hi`` (``fetch(a, b)``: the rows with ``a <= seq < b`` in seq order).

    The record before ``lo`` is read too, for the hash ``lo`` must link to (``GENESIS_HASH`` before 1). The
    answer says how far the range verified (``count``, the hash there) and whether it stopped early, at a
    record the caller must decide (anything the scan did not vouch for, a gap, a missing tail).
    """
    if lo > 1:
        before = fetch(lo - 1, lo)
        if len(before) != 1 or before[0][0] != lo - 1 or not isinstance(before[0][-1], str):
            return {"lo": lo, "hi": hi, "anchor": None, "count": lo - 1, "stopped": True, "hashes_at": {}}
        anchor = before[0][-1]
    else:
        anchor = GENESIS_HASH
    walk = ChainWalk(wanted, count=lo - 1, prev_hash=anchor)
    at = lo
    while at <= hi and walk.first_bad_seq is None:
        upper = min(at + batch, hi + 1)
        rows = fetch(at, upper)
        if scan(rows, 0, walk, sqlite=fetch.sqlite) < len(rows):
            break
        at = upper
    return {
        "lo": lo,
        "hi": hi,
        "anchor": anchor,
        "count": walk.count,
        "last_hash": walk.prev_hash,
        "stopped": walk.count < hi,
        "hashes_at": {str(seq): value for seq, value in walk.hashes_at.items()},
    }


class _SqliteFetch:
    sqlite = True

    def __init__(self, path: str) -> None:
        # Read-only: a missing file is an error, never a new empty database.
        self._connection = sqlite3.connect(f"file:{quote(path)}?mode=ro", uri=True)
        self._connection.execute("PRAGMA query_only=ON")

    def __call__(self, lo: int, hi: int) -> list[tuple[Any, ...]]:
        return self._connection.execute(SQLITE_RANGE, (lo, hi)).fetchall()


def postgres_cursor(connection: Any) -> Any:
    """A binary cursor (bytea without text parsing) that reads timestamptz as its int8 microseconds."""
    from psycopg.types.numeric import Int8BinaryLoader

    cursor = connection.cursor(binary=True)
    cursor.adapters.register_loader("timestamptz", Int8BinaryLoader)
    return cursor


class _PostgresFetch:
    sqlite = False

    def __init__(self, conninfo: str) -> None:
        import psycopg  # only PostgreSQL workers pay for it

        self._connection = psycopg.connect(conninfo)
        self._connection.read_only = True  # its one transaction is READ ONLY

    def __call__(self, lo: int, hi: int) -> list[tuple[Any, ...]]:
        with postgres_cursor(self._connection) as cursor:
            cursor.execute(POSTGRES_RANGE, (lo, hi))
            return cursor.fetchall()


def main() -> int:
    job = json.loads(sys.stdin.read())
    fetch = _SqliteFetch(job["database"]) if job["backend"] == "sqlite" else _PostgresFetch(job["database"])
    wanted = {int(seq) for seq in job["wanted"]}
    answer = verify_range(fetch, int(job["lo"]), int(job["hi"]), wanted, int(job["batch"]))
    sys.stdout.write(json.dumps(answer) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
