"""SMART launch: begin (discovery, PKCE, state) and complete (state check, code exchange, id_token)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import httpx

from fhir_adapters import (
    EhrRegistration,
    PendingAuthorization,
    SmartConfiguration,
    SmartError,
    StateError,
    TokenSet,
    begin_authorization,
    check_state,
    discover,
    exchange_code,
)

# A pending authorization older than this is refused: the user must launch again.
PENDING_MAX_AGE = timedelta(minutes=10)


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
            "smart_config": config_to_dict(config),
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
    """Check state (single use), exchange the code; the id_token is verified by `exchange_code`."""
    pending_raw = session_data.pop("pending", None)  # single use: gone whatever happens next
    if not pending_raw or not code:
        raise LaunchStateError("This sign-in link is not valid any more. Please launch CareCanvas again.")
    pending = PendingAuthorization.from_dict(pending_raw)
    try:
        check_state(pending, state, max_age=PENDING_MAX_AGE)
    except StateError as error:
        raise LaunchStateError(
            "This sign-in link is not valid any more. Please launch CareCanvas again."
        ) from error
    config = config_from_dict(session_data["smart_config"])
    token_set = await exchange_code(
        registration=registration, config=config, code=code, pending=pending, http=http
    )
    if "openid" in pending.scopes and token_set.id_token_claims is None:
        raise SmartError("the EHR did not return the id_token it was asked for", error="invalid_token")
    return token_set, config


def config_to_dict(config: SmartConfiguration) -> dict[str, Any]:
    return {
        "fhir_base": config.fhir_base,
        "issuer": config.issuer,
        "authorization_endpoint": config.authorization_endpoint,
        "token_endpoint": config.token_endpoint,
        "jwks_uri": config.jwks_uri,
        "capabilities": list(config.capabilities),
        "code_challenge_methods_supported": list(config.code_challenge_methods_supported),
        "scopes_supported": list(config.scopes_supported),
        "grant_types_supported": list(config.grant_types_supported),
        "token_endpoint_auth_methods_supported": list(config.token_endpoint_auth_methods_supported),
    }


def config_from_dict(data: dict[str, Any]) -> SmartConfiguration:
    """The configuration checked at launch, as stored (encrypted) in the session; not fetched again."""
    return SmartConfiguration(
        fhir_base=data["fhir_base"],
        issuer=data["issuer"],
        authorization_endpoint=data["authorization_endpoint"],
        token_endpoint=data["token_endpoint"],
        jwks_uri=data["jwks_uri"],
        capabilities=tuple(data["capabilities"]),
        code_challenge_methods_supported=tuple(data["code_challenge_methods_supported"]),
        scopes_supported=tuple(data["scopes_supported"]),
        grant_types_supported=tuple(data["grant_types_supported"]),
        token_endpoint_auth_methods_supported=tuple(data["token_endpoint_auth_methods_supported"]),
    )
