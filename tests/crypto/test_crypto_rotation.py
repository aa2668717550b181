"""Key rotation over every ciphertext column, on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select

from service.audit import AuditLog
from service.crypto import DecryptionError, Keyring, LocalKeyFileProvider, aad_for
from service.crypto.rotation import reencrypt_all
from service.db.models import ENCRYPTED_COLUMNS, Document, WebSession
from service.jobs import JobQueue


async def test_rotation_rewraps_everything_and_old_key_can_be_retired(sessionmaker, tmp_path):
    provider = LocalKeyFileProvider.generate(tmp_path / "keys.json")
    old = Keyring.from_provider(provider)
    queue = JobQueue(sessionmaker, old)
    audit = AuditLog(old)
    async with sessionmaker() as session, session.begin():
        job_ids = [
            await queue.enqueue(session, kind="k", bucket="b", spec={"n": n}, session_id_hash=None)
            for n in range(5)
        ]
        for n in range(3):
            await audit.append(
                session,
                action="view",
                outcome="success",
                actor="u",
                patient=f"pat-{n}",
                ehr=None,
                resource=None,
                request_id=None,
                detail={"n": n},
            )
        session.add(
            WebSession(
                id_hash="h" * 64,
                expires_at=datetime.now(UTC) + timedelta(hours=1),
                csrf_token="c",
                data=old.encrypt(b"{}", aad=aad_for("web_sessions", "h" * 64, "data")),
            )
        )
        session.add(
            Document(
                id="d1",
                job_id=job_ids[0],
                content=old.encrypt(b"{}", aad=aad_for("documents", "d1", "content")),
            )
        )
    await queue.claim_batch(worker_id="w", max_jobs=1)
    await queue.complete(job_ids[0], "w", artifacts={"png": b"img"})

    new_kid = provider.add_key()
    provider.promote(new_kid)
    new = Keyring.from_provider(provider)
    # 5 specs + 3 audit records + 1 session + 1 document + 1 artifact
    assert await reencrypt_all(sessionmaker, new, batch_size=2) == 11
    assert await reencrypt_all(sessionmaker, new, batch_size=2) == 0
    async with sessionmaker() as session:
        for model, _key, column in ENCRYPTED_COLUMNS:
            blobs = (await session.execute(select(getattr(model, column)))).scalars().all()
            assert blobs
            assert {new.kek_id_of(b) for b in blobs} == {new_kid}

    provider.retire(old.primary_kek_id)
    retired = Keyring.from_provider(provider)
    assert old.primary_kek_id not in retired.kek_ids
    new_queue = JobQueue(sessionmaker, retired)
    assert [j.spec["n"] for j in await new_queue.claim_batch(worker_id="w", max_jobs=10)] == [1, 2, 3, 4]
    assert await new_queue.read_artifact(job_ids[0], "png") == b"img"
    new_audit = AuditLog(retired)
    async with sessionmaker() as session, session.begin():
        assert (await new_audit.verify(session)).ok  # re-wrapping left the audit chain intact
        assert [e.detail["n"] for e in await new_audit.search(session, patient="pat-1")] == [1]
    # The old keyring no longer matters, and one without the new key fails closed.
    with pytest.raises(DecryptionError):
        await JobQueue(sessionmaker, old).read_artifact(job_ids[0], "png")


async def test_rotation_rejects_bad_batch_size(sessionmaker, tmp_path):
    keyring = Keyring.from_provider(LocalKeyFileProvider.generate(tmp_path / "keys.json"))
    with pytest.raises(ValueError, match="batch_size"):
        await reencrypt_all(sessionmaker, keyring, batch_size=0)
