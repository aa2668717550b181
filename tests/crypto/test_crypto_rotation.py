"""Key rotation over every ciphertext column, on SQLite and PostgreSQL: usage counts, resumable and
concurrent-safe re-encryption."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import LargeBinary, select, update

from service.audit import AuditLog
from service.crypto import DecryptionError, Keyring, KeyringError, KeyUsage, LocalKeyFileProvider, aad_for
from service.crypto.keyring import new_key_material
from service.crypto.rotation import (
    ReencryptProgress,
    encrypted_columns,
    key_usage,
    not_on_primary,
    reencrypt,
    reencrypt_all,
)
from service.db.models import ENCRYPTED_COLUMNS, Base, Document, Job, PortraitNote, PortraitReview, WebSession
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
        session.add(
            PortraitReview(
                job_id=job_ids[0],
                ehr_name="e",
                status="waiting",
                details=old.encrypt(b"{}", aad=aad_for("portrait_reviews", job_ids[0], "details")),
            )
        )
        session.add(
            PortraitNote(
                id="n1",
                job_id=job_ids[0],
                kind="note",
                body=old.encrypt(b"{}", aad=aad_for("portrait_notes", "n1", "body")),
            )
        )
    await queue.claim_batch(worker_id="w", max_jobs=1)
    await queue.complete(job_ids[0], "w", artifacts={"png": b"img"})

    new_kid = provider.add_key()
    provider.promote(new_kid)
    new = Keyring.from_provider(provider)
    usage = await key_usage(sessionmaker, old.primary_kek_id)
    assert dict(usage.counts) == {
        "web sessions": 1,
        "job specs": 5,
        "artifacts": 1,
        "document drafts": 1,
        "audit payloads": 3,
        "portrait reviews": 1,
        "portrait notes": 1,
    }
    # While anything is still wrapped by the old key, retiring it is refused and says how much.
    with pytest.raises(KeyringError, match="still wraps 1 web sessions, 5 job specs, 1 artifacts"):
        provider.retire(old.primary_kek_id, usage=usage)
    # 5 specs + 3 audit records + 1 session + 1 document + 1 artifact + 1 portrait review + 1 note
    assert await reencrypt_all(sessionmaker, new, batch_size=2) == 13
    assert await reencrypt_all(sessionmaker, new, batch_size=2) == 0
    async with sessionmaker() as session:
        for model, _key, column in ENCRYPTED_COLUMNS:
            blobs = (await session.execute(select(getattr(model, column)))).scalars().all()
            assert blobs
            assert {new.kek_id_of(b) for b in blobs} == {new_kid}

    usage = await key_usage(sessionmaker, old.primary_kek_id)
    assert usage.total == 0
    provider.retire(old.primary_kek_id, usage=usage)
    retired = Keyring.from_provider(provider)
    assert old.primary_kek_id not in retired.kek_ids
    new_queue = JobQueue(sessionmaker, retired)
    assert [j.spec["n"] for j in await new_queue.claim_batch(worker_id="w", max_jobs=10)] == [1, 2, 3, 4]
    assert await new_queue.read_artifact(job_ids[0], "png") == b"img"
    new_audit = AuditLog(retired)
    async with sessionmaker() as session, session.begin():
        assert (await new_audit.verify(session)).ok  # re-wrapping left the audit chain intact
        assert [e.detail["n"] for e in await new_audit.search(session, patient="pat-1")] == [1]
    # A keyring without the new key fails closed.
    with pytest.raises(DecryptionError):
        await JobQueue(sessionmaker, Keyring(old.material)).read_artifact(job_ids[0], "png")


async def test_rotation_rejects_bad_batch_size(sessionmaker, tmp_path):
    keyring = Keyring.from_provider(LocalKeyFileProvider.generate(tmp_path / "keys.json"))
    with pytest.raises(ValueError, match="batch_size"):
        await reencrypt_all(sessionmaker, keyring, batch_size=0)


def test_every_binary_column_is_listed_for_rotation():
    # A new ciphertext column that key rotation does not know would keep its key in use forever.
    listed = {(column.model.__tablename__, column.column_name) for column in encrypted_columns()}
    binary = {
        (table.name, column.name)
        for table in Base.metadata.tables.values()
        for column in table.columns
        if isinstance(column.type, LargeBinary)
    }
    assert binary == listed


class Interrupted(Exception):
    """Stands for the process being stopped between two batches."""


async def _jobs(sessionmaker, keyring: Keyring, count: int) -> list[str]:
    queue = JobQueue(sessionmaker, keyring)
    async with sessionmaker() as session, session.begin():
        return [
            await queue.enqueue(session, kind="k", bucket="b", spec={"n": n}, session_id_hash=None)
            for n in range(count)
        ]


async def test_reencrypt_resumes_after_an_interruption(sessionmaker, tmp_path):
    provider = LocalKeyFileProvider.generate(tmp_path / "keys.json")
    old = Keyring.from_provider(provider)
    job_ids = await _jobs(sessionmaker, old, 30)
    new_kid = provider.add_key()
    provider.promote(new_kid)
    keyring = Keyring.from_provider(provider)
    seen: list[ReencryptProgress] = []

    def stop_after_two_batches(progress: ReencryptProgress) -> None:
        seen.append(progress)
        if len(seen) == 2:
            raise Interrupted

    with pytest.raises(Interrupted):
        await reencrypt(sessionmaker, keyring, batch_size=4, progress=stop_after_two_batches)
    assert [(p.kind, p.done, p.total) for p in seen] == [("job specs", 4, 30), ("job specs", 8, 30)]
    # Both batches were committed before the interruption; nothing else changed.
    assert (await not_on_primary(sessionmaker, new_kid))["job specs"] == 22

    progress: list[ReencryptProgress] = []
    report = await reencrypt(sessionmaker, keyring, batch_size=4, progress=progress.append)
    assert report.rewrapped["job specs"] == 22  # it continued where it stopped, it did not start again
    assert progress[0].total == 22
    assert report.complete
    assert report.total_remaining == 0
    assert (await key_usage(sessionmaker, old.primary_kek_id)).total == 0
    claimed = await JobQueue(sessionmaker, Keyring(provider.load())).claim_batch(worker_id="w", max_jobs=30)
    assert sorted(job.spec["n"] for job in claimed) == list(range(30))
    assert {job.id for job in claimed} == set(job_ids)


def _document_aad(document_id: str) -> bytes:
    return aad_for("documents", document_id, "content")


async def test_reencrypt_is_correct_under_concurrent_writes(sessionmaker, tmp_path):
    """A writer that still encrypts under the old primary for a while, updating rows while the re-wrap runs:
    every update survives and nothing is left on the old key."""
    provider = LocalKeyFileProvider.generate(tmp_path / "keys.json")
    setup = Keyring.from_provider(provider)
    job_ids = await _jobs(sessionmaker, setup, 12)
    document_ids = [f"doc-{n}" for n in range(12)]
    async with sessionmaker() as session, session.begin():
        for document_id, job_id in zip(document_ids, job_ids, strict=True):
            session.add(
                Document(
                    id=document_id,
                    job_id=job_id,
                    content=setup.encrypt(b'{"v": -1}', aad=_document_aad(document_id)),
                )
            )
    # The "API process": loaded before the promotion, checks its key file every 50 ms.
    writer_keyring = Keyring.from_provider(provider, refresh_seconds=0.05)
    new_kid = provider.add_key()
    provider.promote(new_kid)
    last_written: dict[str, int] = {}
    stop = asyncio.Event()

    async def writer() -> None:
        version = 0
        while not stop.is_set():
            for document_id in document_ids:
                version += 1
                async with sessionmaker() as session, session.begin():
                    blob = writer_keyring.encrypt(
                        json.dumps({"v": version}).encode(), aad=_document_aad(document_id)
                    )
                    await session.execute(
                        update(Document).where(Document.id == document_id).values(content=blob)
                    )
                last_written[document_id] = version
                await asyncio.sleep(0.002)

    task = asyncio.create_task(writer())
    try:
        await asyncio.sleep(0.02)  # the writer is under way with the old primary
        report = await reencrypt(
            sessionmaker, Keyring.from_provider(provider), batch_size=3, settle_seconds=0.4
        )
    finally:
        stop.set()
        await task
    assert report.complete
    assert report.passes >= 2
    assert writer_keyring.primary_kek_id == new_kid  # the writer followed the promotion
    fresh = Keyring(provider.load())
    async with sessionmaker() as session:
        rows = (await session.execute(select(Document.id, Document.content))).all()
    for document_id, blob in rows:
        assert fresh.kek_id_of(blob) == new_kid
        content = json.loads(fresh.decrypt(blob, aad=_document_aad(document_id)))
        assert content == {"v": last_written[document_id]}  # no update was overwritten with stale data
    assert (await key_usage(sessionmaker, setup.primary_kek_id)).total == 0


async def test_reencrypt_reports_ciphertexts_no_key_opens_and_keeps_them(sessionmaker, tmp_path):
    provider = LocalKeyFileProvider.generate(tmp_path / "keys.json")
    keyring = Keyring.from_provider(provider)
    [job_id] = await _jobs(sessionmaker, keyring, 1)
    stranger = Keyring(new_key_material())  # a key this installation never had
    orphan = stranger.encrypt(b"{}", aad=_document_aad("doc-x"))
    async with sessionmaker() as session, session.begin():
        session.add(Document(id="doc-x", job_id=job_id, content=orphan))
    provider.promote(provider.add_key())
    report = await reencrypt(sessionmaker, keyring)
    assert report.undecryptable["document drafts"] == 1
    assert report.remaining == {**{kind: 0 for kind in report.remaining}, "document drafts": 1}
    assert not report.complete
    assert report.rewrapped["job specs"] == 1
    async with sessionmaker() as session:
        assert (await session.execute(select(Document.content))).scalar_one() == orphan  # left as it was
        assert (await session.execute(select(Job.id))).scalar_one() == job_id


async def test_key_usage_counts_only_that_key(sessionmaker, tmp_path):
    provider = LocalKeyFileProvider.generate(tmp_path / "keys.json")
    first = Keyring.from_provider(provider)
    await _jobs(sessionmaker, first, 3)
    second_kid = provider.add_key()
    provider.promote(second_kid)
    first.refresh()
    await _jobs(sessionmaker, first, 2)  # encrypted under the new primary now
    assert (await key_usage(sessionmaker, second_kid)).counts["job specs"] == 2
    old_usage = await key_usage(sessionmaker, next(k for k in first.kek_ids if k != second_kid))
    assert old_usage.counts["job specs"] == 3
    assert old_usage.describe() == "3 job specs"
    assert KeyUsage(kid="k", counts={}).describe() == "nothing"
