"""Linking a record onto the chain head in one statement: INSERT … SELECT only while the head is as expected.

The append path remembers the head it last wrote, so an append is usually one statement instead of a head
read plus an insert. The INSERT writes nothing unless record ``prev_seq`` is the head of the chain and has
hash ``prev_hash``; a stale head (another process appended, or our last append was rolled back with its
transaction) costs one retry after a fresh head read, never a wrong link. Appends still hold the chain lock
(see service.audit.log), so the retry cannot race.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Table, and_, bindparam, exists, insert, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from service.db.models import AuditRecord

_TABLE: Table = AuditRecord.__table__  # type: ignore[assignment]
_COLUMNS = list(_TABLE.columns)
_LATER = select(_TABLE.c.seq).where(_TABLE.c.seq >= bindparam("new_seq")).limit(1)
_PREVIOUS = select(_TABLE.c.seq).where(
    and_(_TABLE.c.seq == bindparam("prev_seq"), _TABLE.c.hash == bindparam("prev_hash_check"))
)
_INSERT_IF_HEAD = (
    insert(_TABLE)
    .from_select(
        [column.key for column in _COLUMNS],
        select(*[bindparam(f"v_{column.key}", type_=column.type) for column in _COLUMNS]).where(
            ~exists(_LATER),
            or_(bindparam("prev_seq") == 0, exists(_PREVIOUS)),
        ),
    )
    .returning(_TABLE.c.seq)
)  # the driver's rowcount of INSERT … SELECT is not reliable everywhere


async def insert_if_head(
    session: AsyncSession, values: dict[str, Any], *, prev_seq: int, prev_hash: str
) -> bool:
    """Insert ``values`` (record ``prev_seq + 1``) if ``prev_seq``/``prev_hash`` is the chain's head."""
    params: dict[str, Any] = {f"v_{key}": value for key, value in values.items()}
    params.update(new_seq=prev_seq + 1, prev_seq=prev_seq, prev_hash_check=prev_hash)
    result = await session.execute(_INSERT_IF_HEAD, params)
    return result.first() is not None
