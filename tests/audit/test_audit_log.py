"""Audit log on SQLite and PostgreSQL: caller transactions, linear chain, verify, checkpoints, search."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import delete, select, text, update
from sqlalchemy.exc import DBAPIError, IntegrityError

from service.audit import AuditAction, AuditError, AuditLog, JsonlCheckpointSink
from service.audit.chain import GENESIS_HASH
from service.crypto import Keyring
from service.crypto.keyring import new_key_material
from service.db.engine import make_engine
from service.db.models import AuditRecord


@pytest.fixture
def keyring():
    return Keyring(new_key_material())


@pytest.fixture
def signing_key():
    return Ed25519PrivateKey.generate()


@pytest.fixture
def audit(keyring, tmp_path, signing_key):
    return AuditLog(
        keyring, sink=JsonlCheckpointSink(tmp_path / "checkpoints.jsonl"), signing_key=signing_key
    )


async def append(audit, sessionmaker, n=1, **overrides):
    fields = {
        "action": AuditAction.FHIR_READ,
        "outcome": "success",
        "actor": "Practitioner/prac-1",
        "patient": "pat-1",
        "ehr": "sandbox",
        "resource": "Condition/cond-1",
        "request_id": "req-1",
        "detail": {"count": 1},
    }
    fields.update(overrides)
    refs = []
    for _ in range(n):
        async with sessionmaker() as session, session.begin():
            refs.append(await audit.append(session, **fields))
    return refs


async def tamper(db_url, *statements):
    """Bypass the append-only guards the way an attacker with database-owner access could."""
    engine = make_engine(db_url)
    try:
        async with engine.begin() as connection:
            if engine.dialect.name == "postgresql":
                await connection.execute(text("SET LOCAL session_replication_role = replica"))
            else:
                await connection.execute(text("DROP TRIGGER IF EXISTS audit_records_no_update"))
                await connection.execute(text("DROP TRIGGER IF EXISTS audit_records_no_delete"))
            for statement in statements:
                await connection.execute(statement)
    finally:
        await engine.dispose()


async def verify(audit, sessionmaker):
    async with sessionmaker() as session, session.begin():
        return await audit.verify(session)


async def test_append_links_records_and_keeps_identifiers_encrypted(audit, sessionmaker, keyring):
    refs = await append(audit, sessionmaker, n=3)
    assert [r.seq for r in refs] == [1, 2, 3]
    async with sessionmaker() as session:
        rows = (await session.execute(select(AuditRecord).order_by(AuditRecord.seq))).scalars().all()
    assert rows[0].prev_hash == GENESIS_HASH
    assert rows[1].prev_hash == rows[0].hash
    assert rows[2].prev_hash == rows[1].hash
    assert rows[0].resource_type == "Condition"
    assert rows[0].patient_digest == keyring.keyed_digest("patient:pat-1")
    for row in rows:
        stored = repr([getattr(row, c.name) for c in AuditRecord.__table__.columns])
        assert "pat-1" not in stored
        assert "prac-1" not in stored
        assert "cond-1" not in stored
    assert (await verify(audit, sessionmaker)).ok


async def test_append_is_in_the_callers_transaction(audit, sessionmaker):
    async with sessionmaker() as session, session.begin():
        await audit.append(
            session,
            action="view",
            outcome="success",
            actor=None,
            patient="pat-1",
            ehr=None,
            resource=None,
            request_id=None,
        )
        await session.rollback()
    async with sessionmaker() as session:
        assert (await session.execute(select(AuditRecord))).scalars().all() == []
    [ref] = await append(audit, sessionmaker)
    assert ref.seq == 1  # the rolled-back record left no gap


async def test_failed_append_fails_the_callers_action(audit, sessionmaker):
    with pytest.raises(AuditError, match="JSON-serialisable"):
        async with sessionmaker() as session, session.begin():
            await audit.append(
                session,
                action="view",
                outcome="success",
                actor=None,
                patient=None,
                ehr=None,
                resource=None,
                request_id=None,
                detail={"x": object.__new__(type("T", (), {"__str__": None}))},
            )
    with pytest.raises(AuditError, match="outcome"):
        await append(audit, sessionmaker, outcome="fine")
    with pytest.raises(AuditError, match="action"):
        await append(audit, sessionmaker, action="Fhir Read")
    with pytest.raises(AuditError, match=r"request_id must be 1\.\.128"):
        await append(audit, sessionmaker, request_id="r" * 129)
    async with sessionmaker() as session:
        assert (await session.execute(select(AuditRecord))).scalars().all() == []


async def test_concurrent_appends_keep_one_linear_chain(audit, engine, sessionmaker):
    async def writer(index):
        for _ in range(5):
            async with sessionmaker() as session, session.begin():
                await audit.append(
                    session,
                    action="view",
                    outcome="success",
                    actor=f"u{index}",
                    patient="p",
                    ehr=None,
                    resource=None,
                    request_id=None,
                )

    await asyncio.gather(*(writer(i) for i in range(6)))
    async with sessionmaker() as session:
        seqs = (await session.execute(select(AuditRecord.seq).order_by(AuditRecord.seq))).scalars().all()
    assert seqs == list(range(1, 31))
    result = await verify(audit, sessionmaker)
    assert result.ok
    assert result.count == 30
    assert engine.pool.checkedout() == 0


async def test_verify_detects_an_edited_field(audit, sessionmaker, db_url):
    await append(audit, sessionmaker, n=4)
    await tamper(db_url, update(AuditRecord).where(AuditRecord.seq == 2).values(outcome="denied"))
    result = await verify(audit, sessionmaker)
    assert (result.ok, result.first_bad_seq) == (False, 2)
    assert "modified" in result.reason


async def test_verify_detects_edited_ciphertext(audit, sessionmaker, db_url):
    await append(audit, sessionmaker, n=3)
    async with sessionmaker() as session:
        sealed = (await session.execute(select(AuditRecord.sealed).where(AuditRecord.seq == 3))).scalar_one()
    await tamper(
        db_url,
        update(AuditRecord).where(AuditRecord.seq == 3).values(sealed=sealed[:-1] + bytes([sealed[-1] ^ 1])),
    )
    result = await verify(audit, sessionmaker)
    assert (result.ok, result.first_bad_seq) == (False, 3)


async def test_verify_detects_a_deleted_middle_record(audit, sessionmaker, db_url):
    await append(audit, sessionmaker, n=5)
    await tamper(db_url, delete(AuditRecord).where(AuditRecord.seq == 3))
    result = await verify(audit, sessionmaker)
    assert (result.ok, result.first_bad_seq) == (False, 3)
    assert "missing" in result.reason


async def test_verify_detects_a_deleted_tail_via_checkpoint(audit, sessionmaker, db_url):
    await append(audit, sessionmaker, n=5)
    async with sessionmaker() as session, session.begin():
        checkpoint = await audit.checkpoint(session)
    assert checkpoint.seq == 5
    assert (await verify(audit, sessionmaker)).checkpoints_checked == 1
    await tamper(db_url, delete(AuditRecord).where(AuditRecord.seq >= 4))
    result = await verify(audit, sessionmaker)
    assert (result.ok, result.first_bad_seq) == (False, 4)
    assert "tail" in result.reason


async def test_verify_detects_a_rewritten_chain_via_checkpoint(audit, sessionmaker, db_url, keyring):
    await append(audit, sessionmaker, n=3)
    async with sessionmaker() as session, session.begin():
        await audit.checkpoint(session)
    await append(audit, sessionmaker, n=2)
    async with sessionmaker() as session, session.begin():
        await audit.checkpoint(session)
    # The attacker deletes everything and writes a fresh, internally consistent chain of the same length.
    await tamper(db_url, delete(AuditRecord))
    await append(audit, sessionmaker, n=5, outcome="denied")
    result = await verify(audit, sessionmaker)
    assert (result.ok, result.first_bad_seq) == (False, 1)
    assert "rewritten" in result.reason


async def test_verify_detects_a_forged_checkpoint(audit, sessionmaker, tmp_path):
    await append(audit, sessionmaker, n=2)
    forger = AuditLog(
        Keyring(new_key_material()),
        sink=JsonlCheckpointSink(tmp_path / "checkpoints.jsonl"),
        signing_key=Ed25519PrivateKey.generate(),
    )
    async with sessionmaker() as session, session.begin():
        await forger.checkpoint(session)
    result = await verify(audit, sessionmaker)
    assert not result.ok
    assert "invalid signature" in result.reason


async def test_search_by_patient_actor_action_and_time(audit, sessionmaker):
    start = datetime.now(UTC)
    await append(audit, sessionmaker, patient="Patient/pat-1", actor="Practitioner/prac-1")
    await append(audit, sessionmaker, patient="pat-2", actor="Practitioner/prac-2", action="view")
    await append(
        audit, sessionmaker, patient="pat-1", actor="Practitioner/prac-2", action="approve", detail={"n": 2}
    )
    async with sessionmaker() as session, session.begin():
        by_patient = await audit.search(session, patient="pat-1")
        by_actor = await audit.search(session, actor="Practitioner/prac-2")
        by_action = await audit.search(session, action="approve")
        none_later = await audit.search(session, since=datetime.now(UTC) + timedelta(seconds=5))
        all_before = await audit.search(session, until=start)
        limited = await audit.search(session, limit=1)
    assert [e.seq for e in by_patient] == [3, 1]
    assert {e.actor for e in by_actor} == {"Practitioner/prac-2"}
    assert by_action[0].detail == {"n": 2}
    assert by_action[0].resource == "Condition/cond-1"
    assert none_later == []
    assert all_before == []
    assert [e.seq for e in limited] == [3]


async def test_trigger_allows_only_rewrapping_sealed(audit, sessionmaker, db_url):
    await append(audit, sessionmaker, n=2)
    if db_url.startswith("postgresql"):
        with pytest.raises(DBAPIError, match="append-only"):
            async with sessionmaker() as session, session.begin():
                await session.execute(text("TRUNCATE audit_records"))
    async with sessionmaker() as session:
        sealed = (await session.execute(select(AuditRecord.sealed).where(AuditRecord.seq == 1))).scalar_one()
    changed_body = (
        update(AuditRecord).where(AuditRecord.seq == 1).values(sealed=sealed[:-1] + bytes([sealed[-1] ^ 1]))
    )
    if db_url.startswith("postgresql"):
        # PostgreSQL's trigger parses the blob and refuses any change of the body.
        with pytest.raises(DBAPIError, match="append-only"):
            async with sessionmaker() as session, session.begin():
                await session.execute(changed_body)
        assert (await verify(audit, sessionmaker)).ok
    else:
        # SQLite's trigger only pins the plaintext columns; the chain catches a changed body.
        async with sessionmaker() as session, session.begin():
            await session.execute(changed_body)
        assert (await verify(audit, sessionmaker)).first_bad_seq == 1


async def test_guards_reject_update_and_delete(audit, sessionmaker):
    await append(audit, sessionmaker, n=1)
    with pytest.raises((DBAPIError, IntegrityError), match="append-only"):
        async with sessionmaker() as session, session.begin():
            await session.execute(update(AuditRecord).values(outcome="denied"))
    with pytest.raises((DBAPIError, IntegrityError), match="append-only"):
        async with sessionmaker() as session, session.begin():
            await session.execute(delete(AuditRecord))
    assert (await verify(audit, sessionmaker)).count == 1


async def test_maybe_checkpoint_writes_every_n_records(audit, sessionmaker, tmp_path, keyring, signing_key):
    await append(audit, sessionmaker, n=2)
    async with sessionmaker() as session, session.begin():
        assert await audit.maybe_checkpoint(session, every=3) is None
    await append(audit, sessionmaker, n=1)
    async with sessionmaker() as session, session.begin():
        written = await audit.maybe_checkpoint(session, every=3)
        assert written.seq == 3
        assert await audit.maybe_checkpoint(session, every=3) is None
    # A fresh AuditLog (new process) picks up where the sink left off.
    again = AuditLog(
        keyring, sink=JsonlCheckpointSink(tmp_path / "checkpoints.jsonl"), signing_key=signing_key
    )
    async with sessionmaker() as session, session.begin():
        assert await again.maybe_checkpoint(session, every=3) is None
    lines = (tmp_path / "checkpoints.jsonl").read_text().splitlines()
    assert len(lines) == 1
    assert (await verify(audit, sessionmaker)).checkpoints_checked == 1
    with pytest.raises(AuditError, match="need a sink"):
        async with sessionmaker() as session, session.begin():
            await AuditLog(keyring).checkpoint(session)
