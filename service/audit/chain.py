"""Pure hash-chain functions: canonical JSON of a record's stored fields and its SHA-256 link hash."""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from service.crypto.envelope import blob_body

GENESIS_HASH = "0" * 64

# The stored columns an audit hash covers, in addition to the previous hash. ``sealed_body`` is the nonce and
# ciphertext of the encrypted part (base64), without the re-wrappable key header.
HASHED_FIELDS = (
    "seq",
    "recorded_at",
    "action",
    "outcome",
    "actor_digest",
    "patient_digest",
    "ehr",
    "resource_type",
    "request_id",
    "sealed_body",
)

ChainValue = str | int | None


def canonical_time(moment: datetime) -> str:
    """One spelling per instant: UTC, microseconds, ``Z``."""
    if moment.tzinfo is None:
        raise ValueError("audit timestamps must be timezone-aware")
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def canonical_json(fields: Mapping[str, ChainValue]) -> bytes:
    """Sorted keys, no whitespace, UTF-8: the same bytes for the same fields on every machine."""
    for key, value in fields.items():
        if value is not None and not isinstance(value, str | int):
            raise TypeError(f"chain field {key!r} must be str, int or None, not {type(value).__name__}")
    return json.dumps(dict(fields), sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def record_hash(prev_hash: str, fields: Mapping[str, ChainValue]) -> str:
    """SHA-256 hex over the previous hash and the canonical JSON of the record's fields."""
    missing = set(HASHED_FIELDS) - set(fields)
    if missing:
        raise ValueError(f"record fields missing from the hash: {sorted(missing)}")
    extra = set(fields) - set(HASHED_FIELDS)
    if extra:
        raise ValueError(
            f"unexpected record fields: {sorted(extra)}; hashed fields are {list(HASHED_FIELDS)}"
        )
    if len(prev_hash) != 64:
        raise ValueError("prev_hash must be 64 hex characters")
    return hashlib.sha256(prev_hash.encode() + b"\n" + canonical_json(fields)).hexdigest()


def checkpoint_message(*, seq: int, head_hash: str, time: str) -> bytes:
    """The bytes an audit checkpoint signature covers."""
    return canonical_json(
        {"kind": "carecanvas-audit-checkpoint/1", "seq": seq, "head_hash": head_hash, "time": time}
    )


def hashed_fields(row: Any) -> dict[str, ChainValue]:
    """The hashed fields of an ``AuditRecord`` or a Core row of its columns."""
    return {
        "seq": row.seq,
        "recorded_at": canonical_time(row.recorded_at),
        "action": row.action,
        "outcome": row.outcome,
        "actor_digest": row.actor_digest,
        "patient_digest": row.patient_digest,
        "ehr": row.ehr,
        "resource_type": row.resource_type,
        "request_id": row.request_id,
        "sealed_body": base64.b64encode(blob_body(row.sealed)).decode(),
    }
