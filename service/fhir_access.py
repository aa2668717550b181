"""FHIR access on behalf of a launched session: its tokens, refreshed before expiry and saved back encrypted."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import httpx
from sqlalchemy.ext.asyncio import AsyncSession

from fhir_adapters import EhrRegistration, FhirClient, SmartConfiguration, TokenSet, refresh
from service.sessions import SessionStore, WebSession

# Refresh this long before the access token expires, so a request never starts with a dying token.
REFRESH_MARGIN = timedelta(seconds=30)


class SessionExpiredError(RuntimeError):
    """The access token expired and cannot be refreshed: the user must launch again."""


class SessionTokenSource:
    """TokenSource for FhirClient: hands out the session's token, refreshing (once) when needed."""

    def __init__(
        self,
        *,
        session: WebSession,
        store: SessionStore,
        db: AsyncSession,
        registration: EhrRegistration,
        http: httpx.AsyncClient,
    ) -> None:
        self._session = session
        self._store = store
        self._db = db
        self._registration = registration
        self._http = http

    @property
    def token_set(self) -> TokenSet:
        return TokenSet.from_dict(self._session.data["token_set"])

    async def access_token(self) -> str:
        token_set = self.token_set
        if token_set.expires_at and token_set.expires_at - REFRESH_MARGIN <= datetime.now(UTC):
            return await self.refreshed_token()
        return token_set.access_token

    async def refreshed_token(self) -> str:
        token_set = self.token_set
        if not token_set.refresh_token:
            raise SessionExpiredError("The EHR session has expired. Please launch CareCanvas again.")
        config = SmartConfiguration.from_dict(self._session.data["smart_config"])
        fresh = await refresh(registration=self._registration, config=config, token_set=token_set, http=self._http)
        self._session.data["token_set"] = fresh.to_dict()
        await self._store.save(self._db, self._session)
        await self._db.commit()
        return fresh.access_token


def open_fhir(
    *,
    session: WebSession,
    store: SessionStore,
    db: AsyncSession,
    registration: EhrRegistration,
    http: httpx.AsyncClient,
    transport: httpx.AsyncBaseTransport | None = None,
) -> FhirClient:
    source = SessionTokenSource(session=session, store=store, db=db, registration=registration, http=http)
    return FhirClient(registration.iss, auth=source, transport=transport)
