"""Server-side web sessions: the browser holds an opaque id; everything else is encrypted in the database."""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncSession

from service.crypto import Keyring, aad_for
from service.db.models import WebSession as WebSessionRow

_TABLE = "web_sessions"


def hash_session_id(cookie_value: str) -> str:
    """The database keeps only a hash, so a leaked table cannot be replayed as cookies."""
    return hashlib.sha256(cookie_value.encode("ascii", "replace")).hexdigest()


@dataclass
class WebSession:
    id_hash: str
    ehr_name: str
    csrf_token: str
    expires_at: datetime
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def patient_id(self) -> str | None:
        return self.data.get("patient")

    @property
    def authenticated(self) -> bool:
        return bool(self.data.get("token_set"))

    def csrf_matches(self, candidate: str | None) -> bool:
        return candidate is not None and hmac.compare_digest(self.csrf_token, candidate)


class SessionStore:
    """Create, load, save and end sessions; every row's data is an envelope ciphertext bound to its id."""

    def __init__(self, *, keyring: Keyring, lifetime: timedelta) -> None:
        self._keyring = keyring
        self._lifetime = lifetime

    def _aad(self, id_hash: str) -> bytes:
        return aad_for(_TABLE, id_hash, "data")

    async def create(
        self, db: AsyncSession, *, ehr_name: str, data: dict[str, Any]
    ) -> tuple[str, WebSession]:
        cookie_value = secrets.token_urlsafe(32)
        now = datetime.now(UTC)
        session = WebSession(
            id_hash=hash_session_id(cookie_value),
            ehr_name=ehr_name,
            csrf_token=secrets.token_urlsafe(32),
            expires_at=now + self._lifetime,
            data=data,
        )
        db.add(
            WebSessionRow(
                id_hash=session.id_hash,
                created_at=now,
                expires_at=session.expires_at,
                ehr_name=ehr_name,
                csrf_token=session.csrf_token,
                data=self._encrypt(session),
            )
        )
        await db.flush()
        return cookie_value, session

    async def load(self, db: AsyncSession, cookie_value: str | None) -> WebSession | None:
        if not cookie_value:
            return None
        id_hash = hash_session_id(cookie_value)
        row = (
            await db.execute(select(WebSessionRow).where(WebSessionRow.id_hash == id_hash))
        ).scalar_one_or_none()
        if row is None:
            return None
        expires_at = _aware(row.expires_at)
        if expires_at <= datetime.now(UTC):
            await db.delete(row)
            return None
        plaintext = self._keyring.decrypt(row.data, aad=self._aad(id_hash))
        return WebSession(
            id_hash=id_hash,
            ehr_name=row.ehr_name or "",
            csrf_token=row.csrf_token,
            expires_at=expires_at,
            data=json.loads(plaintext),
        )

    async def save(self, db: AsyncSession, session: WebSession) -> None:
        row = (
            await db.execute(select(WebSessionRow).where(WebSessionRow.id_hash == session.id_hash))
        ).scalar_one()
        row.data = self._encrypt(session)
        row.expires_at = session.expires_at
        await db.flush()

    async def end(self, db: AsyncSession, session: WebSession) -> None:
        await db.execute(delete(WebSessionRow).where(WebSessionRow.id_hash == session.id_hash))

    def _encrypt(self, session: WebSession) -> bytes:
        plaintext = json.dumps(session.data, separators=(",", ":")).encode()
        return self._keyring.encrypt(plaintext, aad=self._aad(session.id_hash))


def _aware(moment: datetime) -> datetime:
    # SQLite hands back naive datetimes; everything we store is UTC.
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
