"""Key rotation over the database: count what a KEK still wraps, re-wrap every ciphertext onto the primary.

Only the wrapped data key in a blob's header changes; payloads are not re-encrypted, so the audit chain's
hashes (over the body) survive. Re-wrapping is safe while the API and workers run: each batch is one short
transaction that re-reads each row, re-wraps it and writes it back only if it is still the value it read
(compare-and-set), so a concurrent update is never overwritten with stale data. Batches are committed one at
a time and only rows not yet on the primary are selected, so an interrupted run simply continues when it is
started again.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from sqlalchemy import ColumnElement, LargeBinary, func, not_, select, type_coerce, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from service.crypto.envelope import DecryptionError, header_prefix
from service.crypto.keyring import Keyring, KeyringError, KeyUsage
from service.db.models import ENCRYPTED_COLUMNS, Base

# What each encrypted column holds, in the words `keys retire` and `keys reencrypt` report.
KIND_LABELS = {
    "web_sessions.data": "web sessions",
    "jobs.spec": "job specs",
    "artifacts.ciphertext": "artifacts",
    "documents.content": "document drafts",
    "audit_records.sealed": "audit payloads",
    "portrait_reviews.details": "portrait reviews",
    "portrait_notes.body": "portrait notes",
}
DEFAULT_BATCH_SIZE = 50
MAX_PASSES = 5


@dataclass(frozen=True)
class EncryptedColumn:
    """One ciphertext column and the primary key that orders it."""

    model: type[Base]
    key_name: str
    column_name: str

    @property
    def key(self) -> Any:
        return getattr(self.model, self.key_name)

    @property
    def value(self) -> Any:
        return getattr(self.model, self.column_name)

    @property
    def label(self) -> str:
        name = f"{self.model.__tablename__}.{self.column_name}"
        return KIND_LABELS.get(name, name)


def encrypted_columns() -> tuple[EncryptedColumn, ...]:
    return tuple(EncryptedColumn(model, key, column) for model, key, column in ENCRYPTED_COLUMNS)


def _wrapped_by(column: Any, kid: str) -> ColumnElement[bool]:
    prefix = header_prefix(kid)
    # substr on a BLOB/bytea counts bytes on SQLite and PostgreSQL alike; no blob leaves the database.
    return func.substr(column, 1, len(prefix)) == type_coerce(prefix, LargeBinary)


async def key_usage(sessionmaker: async_sessionmaker[AsyncSession], kid: str) -> KeyUsage:
    """How many stored objects of each kind ``kid`` wraps (0 everywhere: it may be retired)."""
    counts: dict[str, int] = {}
    async with sessionmaker() as session:
        for column in encrypted_columns():
            query = select(func.count()).select_from(column.model).where(_wrapped_by(column.value, kid))
            counts[column.label] = int((await session.execute(query)).scalar_one())
    return KeyUsage(kid=kid, counts=counts)


async def not_on_primary(sessionmaker: async_sessionmaker[AsyncSession], primary: str) -> dict[str, int]:
    """Per kind, how many ciphertexts are not wrapped by ``primary``."""
    counts: dict[str, int] = {}
    async with sessionmaker() as session:
        for column in encrypted_columns():
            query = (
                select(func.count()).select_from(column.model).where(not_(_wrapped_by(column.value, primary)))
            )
            counts[column.label] = int((await session.execute(query)).scalar_one())
    return counts


@dataclass(frozen=True)
class ReencryptProgress:
    """Reported after every committed batch."""

    kind: str
    done: int  # re-wrapped in this pass so far
    total: int  # not on the primary when this pass reached this kind
    pass_number: int


@dataclass
class ReencryptReport:
    primary: str
    rewrapped: dict[str, int] = field(default_factory=dict)
    # Rows a concurrent writer changed between our read and our write: the writer's value stands.
    lost_races: int = 0
    # Ciphertexts no key in the keyring opens; left untouched and reported, never dropped.
    undecryptable: dict[str, int] = field(default_factory=dict)
    remaining: dict[str, int] = field(default_factory=dict)
    passes: int = 0

    @property
    def total_rewrapped(self) -> int:
        return sum(self.rewrapped.values())

    @property
    def total_remaining(self) -> int:
        return sum(self.remaining.values())

    @property
    def complete(self) -> bool:
        return self.total_remaining == 0


async def reencrypt(
    sessionmaker: async_sessionmaker[AsyncSession],
    keyring: Keyring,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    settle_seconds: float = 0.0,
    progress: Callable[[ReencryptProgress], None] | None = None,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> ReencryptReport:
    """Re-wrap every ciphertext onto the primary KEK, pass after pass until none is left on another key.

    ``settle_seconds``: how long processes may still encrypt under the previous primary (a promotion just
    happened); after the first pass we wait that long and make another, so their last writes are caught too.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be ≥ 1")
    keyring.refresh()
    report = ReencryptReport(primary=keyring.primary_kek_id)
    columns = encrypted_columns()
    for column in columns:
        report.rewrapped[column.label] = 0
    for pass_number in range(1, MAX_PASSES + 1):
        report.passes = pass_number
        undecryptable: dict[str, int] = {}
        changed = 0
        for column in columns:
            done, failed = await _pass_over(
                sessionmaker,
                keyring,
                column,
                report,
                batch_size=batch_size,
                pass_number=pass_number,
                progress=progress,
            )
            changed += done
            undecryptable[column.label] = failed
        report.undecryptable = undecryptable
        if pass_number == 1 and settle_seconds > 0:
            await sleep(settle_seconds)
            continue
        if changed == 0:
            break
    report.remaining = await not_on_primary(sessionmaker, report.primary)
    return report


async def _pass_over(
    sessionmaker: async_sessionmaker[AsyncSession],
    keyring: Keyring,
    column: EncryptedColumn,
    report: ReencryptReport,
    *,
    batch_size: int,
    pass_number: int,
    progress: Callable[[ReencryptProgress], None] | None,
) -> tuple[int, int]:
    """One keyset-ordered pass over one column; returns (re-wrapped, undecryptable)."""
    primary = report.primary
    total = (await not_on_primary(sessionmaker, primary))[column.label]
    done = failed = 0
    last_key: Any = None
    while total:
        if keyring.primary_kek_id != primary:
            raise KeyringError(
                f"the primary key changed from {primary} to {keyring.primary_kek_id} while re-encrypting; "
                "run `carecanvas keys reencrypt` again"
            )
        async with sessionmaker() as session, session.begin():
            keys = await _next_keys(session, column, primary, last_key, batch_size)
            for key in keys:
                outcome = await _rewrap_row(session, keyring, column, primary, key)
                if outcome is _Outcome.REWRAPPED:
                    done += 1
                elif outcome is _Outcome.UNDECRYPTABLE:
                    failed += 1
                elif outcome is _Outcome.LOST_RACE:
                    report.lost_races += 1
        if progress is not None and keys:
            progress(ReencryptProgress(kind=column.label, done=done, total=total, pass_number=pass_number))
        if len(keys) < batch_size:
            break
        last_key = keys[-1]
    report.rewrapped[column.label] += done
    return done, failed


async def _next_keys(
    session: AsyncSession, column: EncryptedColumn, primary: str, last_key: Any, batch_size: int
) -> Sequence[Any]:
    query = select(column.key).where(not_(_wrapped_by(column.value, primary)))
    if last_key is not None:
        query = query.where(column.key > last_key)
    return (await session.execute(query.order_by(column.key).limit(batch_size))).scalars().all()


class _Outcome(Enum):
    REWRAPPED = "rewrapped"
    UNDECRYPTABLE = "undecryptable"
    LOST_RACE = "lost race"
    NOTHING_TO_DO = "nothing to do"


async def _rewrap_row(
    session: AsyncSession, keyring: Keyring, column: EncryptedColumn, primary: str, key: Any
) -> _Outcome:
    # Re-read inside this transaction: the value we re-wrap is the newest committed one.
    blob = (await session.execute(select(column.value).where(column.key == key))).scalar_one_or_none()
    if blob is None or bytes(blob).startswith(header_prefix(primary)):
        return _Outcome.NOTHING_TO_DO  # deleted meanwhile, or a writer already stored it under the primary
    try:
        rewrapped = keyring.rewrap(bytes(blob))
    except DecryptionError:
        return _Outcome.UNDECRYPTABLE
    result = await session.execute(
        update(column.model)
        .where(column.key == key, column.value == blob)
        .values({column.column_name: rewrapped})
        .execution_options(synchronize_session=False)
    )
    return _Outcome.REWRAPPED if result.rowcount else _Outcome.LOST_RACE  # type: ignore[attr-defined]


async def reencrypt_all(
    sessionmaker: async_sessionmaker[AsyncSession], keyring: Keyring, *, batch_size: int = DEFAULT_BATCH_SIZE
) -> int:
    """Re-wrap everything onto the primary; returns how many values changed (see ``reencrypt``)."""
    return (await reencrypt(sessionmaker, keyring, batch_size=batch_size)).total_rewrapped
