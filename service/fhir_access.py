"""FHIR access for a launched session: its tokens, refreshed before expiry and saved back encrypted."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import httpx
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from fhir_adapters import EhrRegistration, FhirClient, SmartError, SmartTokenSource, TokenSet
from service.sessions import SessionStore, WebSession
from service.workflows.launch import config_from_dict

_EXPIRED = "The EHR session has expired. Please launch CareCanvas again."


class SessionExpiredError(RuntimeError):
    """The access token expired and cannot be refreshed: the user must launch again."""


class _PersistingTokenSource(SmartTokenSource):
    """A refresh that fails means the EHR session is over: say so instead of looping on 401s."""

    async def access_token(self) -> str:
        try:
            return await super().access_token()
        except SmartError as error:
            raise SessionExpiredError(_EXPIRED) from error

    async def refreshed_token(self) -> str:
        if not self.token_set.refresh_token:
            raise SessionExpiredError(_EXPIRED)
        try:
            return await super().refreshed_token()
        except SmartError as error:
            raise SessionExpiredError(_EXPIRED) from error


def open_fhir(
    *,
    session: WebSession,
    store: SessionStore,
    sessionmaker: async_sessionmaker[AsyncSession],
    registration: EhrRegistration,
    smart_http: httpx.AsyncClient,
    fhir_http: httpx.AsyncClient | None,
    transport: httpx.AsyncBaseTransport | None = None,
    capabilities: Mapping[str, Any] | None = None,
) -> FhirClient:
    """A client over the EHR's shared pool (`fhir_http`); `transport` (tests only) builds a private one."""
    if session.data.smart_config is None or session.data.token_set is None:
        raise SessionExpiredError(_EXPIRED)

    async def save_refreshed(token_set: TokenSet) -> None:
        # Rotated refresh tokens replace the old ones at once, encrypted, in a short transaction of their
        # own: the request's transaction stays the request's (it may still roll back).
        session.data.token_set = token_set.to_dict()
        async with sessionmaker() as db:
            await store.save(db, session)
            await db.commit()

    source = _PersistingTokenSource(
        registration=registration,
        config=config_from_dict(session.data.smart_config),
        token_set=TokenSet.from_dict(session.data.token_set),
        http=smart_http,
        on_refresh=save_refreshed,
    )
    return FhirClient(
        registration.iss, auth=source, transport=transport, http=fhir_http, capabilities=capabilities
    )
