"""Console patient names come from banners stored encrypted in live sessions (SQLite and PostgreSQL)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from service.crypto import Keyring, LocalKeyFileProvider
from service.db.models import WebSession as WebSessionRow
from service.sessions import SessionData, SessionKind, SessionStore
from service.workflows.compliance import patient_names


def banner(name: str) -> dict[str, object]:
    return {"display_name": name, "birth_date": None, "gender": None, "identifier": None}


async def test_names_from_live_sessions_only(
    sessionmaker: async_sessionmaker[AsyncSession], tmp_path: Path
) -> None:
    keyring = Keyring.from_provider(LocalKeyFileProvider.generate(tmp_path / "keys.json"))
    store = SessionStore(keyring=keyring, lifetime=timedelta(minutes=5))
    async with sessionmaker() as db:
        await store.create(
            db, ehr_name="sandbox", data=SessionData(patient="pat-1", banner=banner("Maria Rivera"))
        )
        await store.create(db, ehr_name="sandbox", data=SessionData(patient="pat-2"))  # no banner read yet
        _, ended = await store.create(
            db, ehr_name="sandbox", data=SessionData(patient="pat-3", banner=banner("Linh Nguyen"))
        )
        await store.create(db, ehr_name="staff-idp", data=SessionData(kind=SessionKind.STAFF))
        await db.execute(
            update(WebSessionRow)
            .where(WebSessionRow.id_hash == ended.id_hash)
            .values(expires_at=ended.expires_at - timedelta(hours=1))
        )
        await db.commit()
    async with sessionmaker() as db:
        names = await patient_names(
            store, db, ["Patient/pat-1", "pat-2", "Patient/pat-3", None, "not a ref!"]
        )
        assert names == {"Patient/pat-1": "Maria Rivera"}
        assert await patient_names(store, db, []) == {}
        # The names are in no column in plaintext: only the encrypted session data holds them.
        stored = (await db.execute(select(WebSessionRow.data))).scalars().all()
        assert all(b"Maria" not in blob for blob in stored)
