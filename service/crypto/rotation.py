"""Key rotation: re-wrap every stored data key onto the primary KEK (payloads are not re-encrypted)."""

from __future__ import annotations

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from service.crypto.keyring import Keyring
from service.db.models import ENCRYPTED_COLUMNS


async def reencrypt_all(
    sessionmaker: async_sessionmaker[AsyncSession], keyring: Keyring, *, batch_size: int = 100
) -> int:
    """Re-wrap every ciphertext column onto ``keyring``'s primary KEK; returns how many values changed.

    Each batch is its own transaction and each row is updated only if its ciphertext is still the one we read
    (compare-and-set), so concurrent writers are never overwritten. Afterwards older KEKs can be retired.
    Audit records are included: their hash covers only the body, which re-wrapping leaves untouched.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be ≥ 1")
    primary = keyring.primary_kek_id
    changed = 0
    for model, key_name, column_name in ENCRYPTED_COLUMNS:
        key_column = getattr(model, key_name)
        value_column = getattr(model, column_name)
        last_key = None
        while True:
            query = select(key_column, value_column).order_by(key_column).limit(batch_size)
            if last_key is not None:
                query = query.where(key_column > last_key)
            async with sessionmaker() as session, session.begin():
                rows = (await session.execute(query)).all()
                for key, blob in rows:
                    if blob is None or keyring.kek_id_of(blob) == primary:
                        continue
                    result = await session.execute(
                        update(model)
                        .where(key_column == key, value_column == blob)
                        .values({column_name: keyring.rewrap(blob)})
                        .execution_options(synchronize_session=False)
                    )
                    changed += result.rowcount  # type: ignore[attr-defined]
            if len(rows) < batch_size:
                break
            last_key = rows[-1][0]
    return changed
