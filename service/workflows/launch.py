"""SMART launch: begin (discovery, PKCE, state) and complete (state check, code exchange, id_token)."""

from __future__ import annotations

import hmac
import time
from dataclasses import dataclass
from typing import Any

import httpx

from fhir_adapters import (
    EhrRegistration,
    PendingAuthorization,
    SmartConfiguration,
    SmartError,
    TokenSet,
    begin_authorization,
    discover,
    exchange_code,
    verify_id_token,
)

# A pending authorization older than this is refused: the user must launch again.
PENDING_MAX_AGE_SECONDS = 600


class LaunchStateError(Exception):
    """The callback's `state` is missing, wrong, reused or expired; no token request was made."""


@dataclass(frozen=True)
class StartedLaunch:
    authorize_url: str
    session_data: dict[str, Any]


async def begin_launch(
    *, registration: EhrRegistration, launch: str | None, http: httpx.AsyncClient, scopes: tuple[str, ...]
) -> StartedLaunch:
    """Discover the EHR's endpoints and build the authorize redirect; the pending values go to the session."""
    config = await discover(registration.iss, http=http, registration=registration)
    pending = begin_authorization(
        registration=registration,
        config=config,
        redirect_uri=registration.redirect_uri,
        launch=launch,
        scopes=scopes,
    )
    return StartedLaunch(
        authorize_url=pending.url,
        session_data={
            "pending": pending.to_dict(),
            "smart_config": config.to_dict(),
            "pending_created": time.time(),
        },
    )


async def complete_launch(
    *,
    registration: EhrRegistration,
    session_data: dict[str, Any],
    code: str | None,
    state: str | None,
    http: httpx.AsyncClient,
) -> tuple[TokenSet, SmartConfiguration]:
    """Check state (single use), exchange the code, verify the id_token; raises LaunchStateError or SmartError."""
    pending_raw = session_data.pop("pending", None)  # single use: gone whatever happens next
    created = session_data.pop("pending_created", 0)
    if not pending_raw or not state or not code:
        raise LaunchStateError("This sign-in link is not valid any more. Please launch CareCanvas again.")
    pending = PendingAuthorization.from_dict(pending_raw)
    if not hmac.compare_digest(pending.state.encode(), state.encode()):
        raise LaunchStateError("This sign-in link is not valid any more. Please launch CareCanvas again.")
    if time.time() - float(created) > PENDING_MAX_AGE_SECONDS:
        raise LaunchStateError("The sign-in took too long. Please launch CareCanvas again.")
    config = SmartConfiguration.from_dict(session_data["smart_config"])
    token_set = await exchange_code(registration=registration, config=config, code=code, pending=pending, http=http)
    if token_set.id_token:
        claims = await verify_id_token(
            token_set.id_token, config=config, client_id=registration.client_id, nonce=pending.nonce, http=http
        )
        token_set = token_set.with_id_token_claims(claims)
    elif "openid" in pending.scopes:
        raise SmartError("invalid_token", "the EHR did not return the id_token it was asked for")
    return token_set, config
