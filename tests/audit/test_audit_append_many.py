"""AuditLog.append_many on SQLite and PostgreSQL: one INSERT for many records that link onto the chain's head
and each other, records identical to one-by-one appends, and a rollback that leaves the chain as it was."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from service.audit import AuditAction, AuditAppend, AuditError, AuditLog, AuditOutcome
from service.crypto import Keyring
from service.crypto.keyring import new_key_material
from service.db.models import AuditRecord


@pytest.fixture
def audit() -> AuditLog:
    return AuditLog(Keyring(new_key_material()))


def entry(n: int, **overrides: object) -> AuditAppend:
    fields: dict[str, object] = {
        "action": AuditAction.GENERATE,
        "outcome": AuditOutcome.SUCCESS,
        "actor": "Practitioner/prac-1",
        "patient": f"pat-{n}",
        "ehr": "sandbox",
        "resource": f"urn:carecanvas:job:{n}",
        "request_id": f"req-{n}",
        "detail": {"n": n},
    }
    fields.update(overrides)
    return AuditAppend(**fields)  # type: ignore[arg-type]


async def test_many_records_link_onto_the_head_and_each_other(
    audit: AuditLog, engine: AsyncEngine, sessionmaker: async_sessionmaker[AsyncSession]
) -> None:
    async with sessionmaker() as db, db.begin():
        await audit.append_entry(db, entry(0))  # a head to link onto
    async with sessionmaker() as db, db.begin():
        refs = await audit.append_many(db, [entry(n) for n in range(1, 21)])
    assert [ref.seq for ref in refs] == list(range(2, 22))
    async with sessionmaker() as db, db.begin():
        after = await audit.append_entry(db, entry(99))  # and the next append links onto them
    assert after.seq == 22
    async with sessionmaker() as db:
        verdict = await audit.verify(db)
        assert verdict.ok, verdict.reason
        assert verdict.count == 22
        entries = await audit.entries(db)
    by_seq = {e.seq: e for e in entries}
    assert by_seq[5].patient == "pat-4"
    assert by_seq[5].detail == {"n": 4}
    assert by_seq[5].request_id == "req-4"


async def test_a_rolled_back_group_leaves_the_chain_and_the_next_append_as_before(
    audit: AuditLog, sessionmaker: async_sessionmaker[AsyncSession]
) -> None:
    async with sessionmaker() as db, db.begin():
        await audit.append_entry(db, entry(0))
    async with sessionmaker() as db:
        await audit.append_many(db, [entry(n) for n in range(1, 6)])
        await db.rollback()
    async with sessionmaker() as db, db.begin():
        ref = await audit.append_entry(db, entry(7))
    assert ref.seq == 2  # linked onto the record that was committed, not onto the rolled-back ones
    async with sessionmaker() as db:
        assert (await audit.verify(db)).ok
        assert (await db.execute(select(func.count()).select_from(AuditRecord))).scalar_one() == 2


async def test_one_invalid_entry_refuses_the_whole_group_before_anything_is_written(
    audit: AuditLog, sessionmaker: async_sessionmaker[AsyncSession]
) -> None:
    async with sessionmaker() as db, db.begin():
        with pytest.raises(AuditError, match="request_id"):
            await audit.append_many(db, [entry(1), entry(2, request_id="x" * 200)])
        assert (await db.execute(select(func.count()).select_from(AuditRecord))).scalar_one() == 0


async def test_no_entries_write_nothing(
    audit: AuditLog, sessionmaker: async_sessionmaker[AsyncSession]
) -> None:
    async with sessionmaker() as db, db.begin():
        assert await audit.append_many(db, []) == []
