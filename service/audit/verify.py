"""Verifying the audit chain: links, hashes and gaps in the database, then the signed checkpoints."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from service.audit.chain import GENESIS_HASH, hashed_fields, record_hash
from service.audit.checkpoints import SignedCheckpoint
from service.crypto.envelope import DecryptionError
from service.db.models import AuditRecord

_VERIFY_BATCH = 500


@dataclass(frozen=True)
class VerifyResult:
    ok: bool
    count: int
    first_bad_seq: int | None = None
    reason: str | None = None
    checkpoints_checked: int = 0


async def verify_chain(
    session: AsyncSession,
    checkpoints: Sequence[SignedCheckpoint],
    verify_key: Ed25519PublicKey | None,
) -> VerifyResult:
    """Walk the chain (links, hashes, gaps), then check every signed checkpoint against it."""
    count = 0
    expected_seq = 1
    prev_hash = GENESIS_HASH
    hashes_at: dict[int, str] = {}
    wanted = {cp.seq for cp in checkpoints}
    last_seq = 0
    while True:
        # Plain rows, not ORM objects: verifying a long chain must not fill the caller's session.
        rows = (
            await session.execute(
                select(*AuditRecord.__table__.columns)
                .where(AuditRecord.seq >= expected_seq)
                .order_by(AuditRecord.seq)
                .limit(_VERIFY_BATCH)
            )
        ).all()
        if not rows:
            break
        for row in rows:
            if row.seq != expected_seq:
                return VerifyResult(
                    False, count, expected_seq, f"record {expected_seq} is missing (gap in seq)"
                )
            if row.prev_hash != prev_hash:
                return VerifyResult(
                    False, count, row.seq, f"record {row.seq} does not link to record {row.seq - 1}"
                )
            try:
                fields = hashed_fields(row)
            except (DecryptionError, ValueError):
                return VerifyResult(False, count, row.seq, f"record {row.seq} has a malformed sealed payload")
            if record_hash(prev_hash, fields) != row.hash:
                return VerifyResult(False, count, row.seq, f"record {row.seq} was modified (hash mismatch)")
            if row.seq in wanted:
                hashes_at[row.seq] = row.hash
            prev_hash = row.hash
            last_seq = row.seq
            expected_seq += 1
            count += 1
    return check_checkpoints(checkpoints, hashes_at, verify_key, count=count, last_seq=last_seq)


def check_checkpoints(
    checkpoints: Sequence[SignedCheckpoint],
    hashes_at: Mapping[int, str],
    verify_key: Ed25519PublicKey | None,
    *,
    count: int,
    last_seq: int,
) -> VerifyResult:
    if checkpoints and verify_key is None:
        return VerifyResult(False, count, None, "checkpoints exist but no verification key is configured")
    previous_good = 0
    for checked, checkpoint in enumerate(sorted(checkpoints, key=lambda cp: cp.seq), start=1):
        assert verify_key is not None  # noqa: S101 - narrowed by the check above
        if not checkpoint.is_signed_by(verify_key):
            return VerifyResult(
                False,
                count,
                None,
                f"checkpoint at seq {checkpoint.seq} has an invalid signature",
                checked - 1,
            )
        if checkpoint.seq == 0:
            continue
        if checkpoint.seq > last_seq:
            return VerifyResult(
                False,
                count,
                last_seq + 1,
                f"chain ends at seq {last_seq} but a signed checkpoint covers seq {checkpoint.seq}: "
                "records were deleted from the tail",
                checked - 1,
            )
        if hashes_at.get(checkpoint.seq) != checkpoint.head_hash:
            return VerifyResult(
                False,
                count,
                previous_good + 1,
                f"records {previous_good + 1}..{checkpoint.seq} do not match the signed checkpoint "
                f"at seq {checkpoint.seq}: the chain was rewritten",
                checked - 1,
            )
        previous_good = checkpoint.seq
    return VerifyResult(True, count, None, None, len(checkpoints))
