"""FHIR access for a launched session: its tokens, refreshed before expiry and saved back encrypted."""

from __future__ import annotations

import httpx
from sqlalchemy.ext.asyncio import AsyncSession

from fhir_adapters import EhrRegistration, FhirClient, SmartError, SmartTokenSource, TokenSet
from service.sessions import SessionStore, WebSession
from service.workflows.launch import config_from_dict


class SessionExpiredError(RuntimeError):
    """The access token expired and cannot be refreshed: the user must launch again."""


class _PersistingTokenSource(SmartTokenSource):
    """A refresh that fails means the EHR session is over: say so instead of looping on 401s."""

    async def access_token(self) -> str:
        try:
            return await super().access_token()
        except SmartError as error:
            raise SessionExpiredError(
                "The EHR session has expired. Please launch CareCanvas again."
            ) from error

    async def refreshed_token(self) -> str:
        if not self.token_set.refresh_token:
            raise SessionExpiredError("The EHR session has expired. Please launch CareCanvas again.")
        try:
            return await super().refreshed_token()
        except SmartError as error:
            raise SessionExpiredError(
                "The EHR session has expired. Please launch CareCanvas again."
            ) from error


def open_fhir(
    *,
    session: WebSession,
    store: SessionStore,
    db: AsyncSession,
    registration: EhrRegistration,
    http: httpx.AsyncClient,
    transport: httpx.AsyncBaseTransport | None = None,
) -> FhirClient:
    async def save_refreshed(token_set: TokenSet) -> None:
        # Rotated refresh tokens replace the old ones at once, encrypted, in their own commit.
        session.data["token_set"] = token_set.to_dict()
        await store.save(db, session)
        await db.commit()

    source = _PersistingTokenSource(
        registration=registration,
        config=config_from_dict(session.data["smart_config"]),
        token_set=TokenSet.from_dict(session.data["token_set"]),
        http=http,
        on_refresh=save_refreshed,
    )
    return FhirClient(registration.iss, auth=source, transport=transport)
