"""Server-side web sessions: the browser holds an opaque id; everything else is encrypted in the database."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import time
import zlib
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

import structlog
from pydantic import BaseModel, ConfigDict, ValidationError
from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from fhir_adapters import GrantedScopes, TokenSet
from service.crypto import DecryptionError, Keyring, aad_for
from service.db.models import SpentLaunchState
from service.db.models import WebSession as WebSessionRow

log = structlog.get_logger("carecanvas.sessions")

_TABLE = "web_sessions"
# A launch in flight travels in the session cookie itself, told apart from a session id by this prefix.
PENDING_PREFIX = "p1."
_PENDING_AAD = b"carecanvas:pending-launch:v1"
# Browsers keep at most 4096 bytes per cookie (name and attributes included).
MAX_PENDING_COOKIE_CHARS = 3600


def hash_session_id(cookie_value: str) -> str:
    """The database keeps only a hash, so a leaked table cannot be replayed as cookies."""
    return hashlib.sha256(cookie_value.encode("ascii", "replace")).hexdigest()


class SessionKind(StrEnum):
    """Who a session belongs to: a clinician's EHR launch, a patient's portal launch, a staff sign-in."""

    EHR = "ehr"
    PORTAL = "portal"
    STAFF = "staff"


class SessionData(BaseModel):
    """What a server-side session holds (encrypted at rest); the browser only ever sees the opaque id."""

    model_config = ConfigDict(extra="forbid")

    kind: SessionKind = SessionKind.EHR
    # The authorization in flight (PendingAuthorization.to_dict), removed when the callback spends it.
    pending: dict[str, Any] | None = None
    smart_config: dict[str, Any] | None = None
    token_set: dict[str, Any] | None = None
    patient: str | None = None
    encounter: str | None = None
    fhir_user: str | None = None
    # The signed-in user's name from their fhirUser resource (read with the workspace), for audit records,
    # the handout ("given by") and the document's author display; None until read or when unreadable.
    user_display: str | None = None
    role: str | None = None
    style: dict[str, str] = {}
    # The patient banner from the workspace's Patient read, so later pages need no second read.
    banner: dict[str, Any] | None = None
    # The launch's visit (EncounterSummary) from the same read, so every clinician page shows the same line.
    visit: dict[str, Any] | None = None
    # The patient's preferred language (Patient.communication), as the workspace found it.
    preferred_language: str | None = None
    language_note: str | None = None
    # A staff (compliance) sign-in's identity; see service.staff_auth.
    staff: dict[str, Any] | None = None

    def tokens(self) -> TokenSet:
        if self.token_set is None:
            raise LookupError("this session has no tokens")
        return TokenSet.from_dict(self.token_set)

    @property
    def scopes(self) -> GrantedScopes:
        return GrantedScopes.parse(str((self.token_set or {}).get("scope", "")))

    @property
    def need_patient_banner(self) -> bool:
        return bool((self.token_set or {}).get("need_patient_banner", True))


@dataclass
class WebSession:
    id_hash: str
    ehr_name: str
    csrf_token: str
    expires_at: datetime
    data: SessionData = field(default_factory=SessionData)

    @property
    def patient_id(self) -> str | None:
        return self.data.patient

    @property
    def authenticated(self) -> bool:
        return bool(self.data.token_set) or self.data.staff is not None

    def csrf_matches(self, candidate: str | None) -> bool:
        # As bytes: compare_digest raises on non-ASCII str, which would turn a forged token into a 500.
        if candidate is None:
            return False
        return hmac.compare_digest(self.csrf_token.encode(), candidate.encode("utf-8", "replace"))


class SessionStore:
    """Create, load, save and end sessions; every row's data is an envelope ciphertext bound to its id."""

    def __init__(self, *, keyring: Keyring, lifetime: timedelta) -> None:
        self._keyring = keyring
        self._lifetime = lifetime
        self._last_sweep: float | None = None

    async def maybe_sweep(self, db: AsyncSession, *, every_seconds: float) -> SweepResult | None:
        """Sweep expired rows when the last sweep of this process is `every_seconds` old (0: never here).

        Called after each sign-in, so a running deployment sweeps without a timer of its own.
        """
        now = time.monotonic()
        if every_seconds <= 0 or (self._last_sweep is not None and now - self._last_sweep < every_seconds):
            return None
        self._last_sweep = now
        try:
            return await sweep_expired(db)
        except SQLAlchemyError as error:  # the sign-in already committed; the next sweep retries
            await db.rollback()
            log.warning("session sweep failed", error_type=type(error).__name__)
            return None

    def _aad(self, id_hash: str) -> bytes:
        return aad_for(_TABLE, id_hash, "data")

    async def create(self, db: AsyncSession, *, ehr_name: str, data: SessionData) -> tuple[str, WebSession]:
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
        try:
            data = SessionData.model_validate_json(plaintext)
        except ValidationError:
            # A session written by an older release: treated as ended (the user launches again).
            await db.delete(row)
            return None
        return WebSession(
            id_hash=id_hash,
            ehr_name=row.ehr_name or "",
            csrf_token=row.csrf_token,
            expires_at=expires_at,
            data=data,
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

    async def live_data(self, db: AsyncSession, *, limit: int = 10_000) -> list[SessionData]:
        """The data of every unexpired session, newest first (e.g. to find a patient's stored banner)."""
        rows = (
            await db.execute(
                select(WebSessionRow.id_hash, WebSessionRow.data)
                .where(WebSessionRow.expires_at > datetime.now(UTC))
                .order_by(WebSessionRow.created_at.desc())
                .limit(limit)
            )
        ).all()
        found: list[SessionData] = []
        for id_hash, ciphertext in rows:
            try:
                found.append(
                    SessionData.model_validate_json(self._keyring.decrypt(ciphertext, aad=self._aad(id_hash)))
                )
            except ValidationError:
                continue  # a session of an older release: nothing to read from it
        return found

    def seal_pending(self, launch: PendingLaunch) -> str:
        """The cookie value that carries a launch in flight (no row is written for it)."""
        return PendingLaunchSeal(self._keyring).seal(launch)

    def open_pending(self, cookie_value: str | None) -> PendingLaunch | None:
        return PendingLaunchSeal(self._keyring).open(cookie_value)

    def _encrypt(self, session: WebSession) -> bytes:
        plaintext = session.data.model_dump_json(exclude_defaults=True).encode()
        return self._keyring.encrypt(plaintext, aad=self._aad(session.id_hash))


class PendingLaunch(BaseModel):
    """A SMART launch between /launch and /callback: kept by the browser, sealed, never in the database.

    So an unauthenticated /launch costs no row; the callback checks it and only then creates the session.
    """

    model_config = ConfigDict(extra="forbid")

    ehr_name: str
    kind: SessionKind
    pending: dict[str, Any]
    smart_config: dict[str, Any]


class PendingLaunchTooLargeError(ValueError):
    """The EHR's SMART configuration makes the sealed launch too large for a cookie."""


class PendingLaunchSeal:
    """Seal a PendingLaunch into a cookie value (keyring AEAD: encrypted and authenticated) and open it."""

    def __init__(self, keyring: Keyring) -> None:
        self._keyring = keyring

    def seal(self, launch: PendingLaunch) -> str:
        # Compressed before encryption: nothing in it is chosen by the browser (the EHR's launch id and
        # the authorize URL are left out), so the length tells an observer nothing about the secrets.
        plaintext = zlib.compress(launch.model_dump_json().encode(), level=9)
        blob = self._keyring.encrypt(plaintext, aad=_PENDING_AAD)
        value = PENDING_PREFIX + base64.urlsafe_b64encode(blob).decode("ascii").rstrip("=")
        if len(value) > MAX_PENDING_COOKIE_CHARS:
            raise PendingLaunchTooLargeError(f"sealed launch is {len(value)} characters")
        return value

    def open(self, cookie_value: str | None) -> PendingLaunch | None:
        """The launch, or None when the cookie is missing, a session id, forged, damaged or unreadable."""
        if not cookie_value or not cookie_value.startswith(PENDING_PREFIX):
            return None
        encoded = cookie_value.removeprefix(PENDING_PREFIX)
        try:
            blob = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4))
            plaintext = self._keyring.decrypt(blob, aad=_PENDING_AAD)
            return PendingLaunch.model_validate_json(zlib.decompress(plaintext, bufsize=16_384))
        except (binascii.Error, ValueError, DecryptionError, zlib.error):
            return None


def hash_launch_state(state: str) -> str:
    return hashlib.sha256(state.encode("utf-8", "replace")).hexdigest()


async def spend_launch_state(
    sessionmaker: async_sessionmaker[AsyncSession], state: str, *, keep_until: datetime
) -> bool:
    """Record ``state`` as used, in a transaction of its own; False when it was used before (a replay).

    The primary key makes this atomic: of two racing callbacks with one state, exactly one gets True.
    """
    async with sessionmaker() as db:
        db.add(SpentLaunchState(state_hash=hash_launch_state(state), expires_at=keep_until))
        try:
            await db.commit()
        except IntegrityError:
            await db.rollback()
            return False
    return True


@dataclass(frozen=True)
class SweepResult:
    """How many expired rows a sweep deleted."""

    sessions: int
    launch_states: int


async def sweep_expired(db: AsyncSession, *, now: datetime | None = None) -> SweepResult:
    """Delete expired sessions (their tokens go with them) and spent launch states past their lifetime."""
    moment = now or datetime.now(UTC)
    sessions = await db.execute(delete(WebSessionRow).where(WebSessionRow.expires_at <= moment))
    states = await db.execute(delete(SpentLaunchState).where(SpentLaunchState.expires_at <= moment))
    await db.commit()
    return SweepResult(
        sessions=int(getattr(sessions, "rowcount", 0) or 0),
        launch_states=int(getattr(states, "rowcount", 0) or 0),
    )


def _aware(moment: datetime) -> datetime:
    # SQLite hands back naive datetimes; everything we store is UTC.
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
