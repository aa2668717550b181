"""Who calls the API: the app's own front end (session cookie + X-CSRF-Token) or an EHR-embedded front
end (`Authorization: Bearer <the EHR's access token>`, validated by RFC 7662 introspection at that EHR).

A bearer caller names its EHR with `X-EHR: <registration name>`; the header may be left out when exactly
one EHR is registered. The token must be active, unexpired, issued for that EHR's FHIR base (`aud`) by its
authorization server (`iss`, when the answer carries one), and carry a patient. It becomes an ephemeral,
never persisted session whose FHIR client uses that same token; its jobs are owned by a keyed digest of
(EHR, patient, fhirUser), so a token for another patient or user never sees them. Introspection answers
are cached briefly, keyed by a hash of the token (never the token itself).
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any

import httpx
import structlog
from fastapi import Depends, Request

from fhir_adapters import FhirError, GrantedScopes, SmartConfiguration, discover
from fhir_adapters.client import origin_of
from service.audit import AuditAction, AuditOutcome
from service.logging import bind_ehr
from service.services import Services
from service.sessions import SessionData, SessionKind, WebSession
from service.settings import EhrSettings
from service.web.context import (
    DbDep,
    RequestContext,
    RequestIdDep,
    ServicesDep,
    clinician_context,
)
from service.web.errors import AppError, ErrorCode
from service.workflows.launch import config_to_dict

log = structlog.get_logger("carecanvas.api.auth")

EHR_HEADER = "x-ehr"
CACHE_SECONDS = 30.0
CACHE_ENTRIES = 4096
DISCOVERY_SECONDS = 300.0
_MAX_TOKEN_CHARS = 8192


def _refused(message: str, *, status: int = 401) -> AppError:
    return AppError(status, "The access token was not accepted", message, code=ErrorCode.UNAUTHENTICATED)


@dataclass(frozen=True)
class TokenInfo:
    """What the EHR's introspection said about a token (the parts CareCanvas relies on)."""

    ehr_name: str
    patient: str
    fhir_user: str | None
    scope: str
    expires_at: float
    client_id: str | None


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "replace")).hexdigest()


def bearer_token(authorization: str) -> str:
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or len(token) > _MAX_TOKEN_CHARS or not token.isascii():
        raise _refused("Send `Authorization: Bearer <access token from your EHR>`.")
    return token


def _audiences(value: object) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [item for item in value if isinstance(item, str)]
    return []


def check_introspection(answer: object, *, ehr: EhrSettings, issuer: str | None, now: float) -> TokenInfo:
    """The token is usable here only if every one of these holds; the first that does not is the reason."""
    if not isinstance(answer, dict) or answer.get("active") is not True:
        raise _refused("The EHR says this token is not active (expired, revoked or not its own).")
    if str(answer.get("token_type", "bearer")).lower() not in {"bearer", "access_token"}:
        raise _refused("This is not an access token.")
    exp = answer.get("exp")
    if not isinstance(exp, (int, float)) or isinstance(exp, bool) or exp <= now:
        raise _refused("The token has expired.")
    base = ehr.iss.rstrip("/")
    if base not in [aud.rstrip("/") for aud in _audiences(answer.get("aud"))]:
        raise _refused("The token was issued for another server, not this EHR's FHIR base.")
    token_issuer = answer.get("iss")
    if token_issuer is not None and issuer is not None and token_issuer != issuer:
        raise _refused("The token was issued by another authorization server.")
    patient = answer.get("patient")
    if not isinstance(patient, str) or not patient:
        raise _refused("The token is not scoped to a patient.", status=403)
    fhir_user = answer.get("fhirUser")
    client_id = answer.get("client_id")
    return TokenInfo(
        ehr_name=ehr.name,
        patient=patient,
        fhir_user=fhir_user if isinstance(fhir_user, str) else None,
        scope=str(answer.get("scope") or ""),
        expires_at=float(exp),
        client_id=client_id if isinstance(client_id, str) else None,
    )


def _allowed(url: str, origins: frozenset[tuple[str, str, int]]) -> bool:
    try:
        return origin_of(url) in origins
    except ValueError:
        return False


class BearerVerifier:
    """Validates EHR access tokens by introspection, with a short cache keyed by the token's hash."""

    def __init__(self) -> None:
        self._tokens: OrderedDict[str, tuple[float, TokenInfo]] = OrderedDict()
        self._configs: dict[str, tuple[float, SmartConfiguration]] = {}

    def _cached(self, key: str, now: float) -> TokenInfo | None:
        entry = self._tokens.get(key)
        if entry is None:
            return None
        until, info = entry
        if until <= now or info.expires_at <= time.time():
            del self._tokens[key]
            return None
        return info

    def _remember(self, key: str, info: TokenInfo, now: float) -> None:
        self._tokens[key] = (min(now + CACHE_SECONDS, now + max(0.0, info.expires_at - time.time())), info)
        while len(self._tokens) > CACHE_ENTRIES:
            self._tokens.popitem(last=False)

    def forget_all(self) -> None:
        self._tokens.clear()

    async def _config(self, services: Services, ehr: EhrSettings) -> SmartConfiguration:
        now = time.monotonic()
        cached = self._configs.get(ehr.name)
        if cached is not None and cached[0] > now:
            return cached[1]
        registration = services.ehrs.registration(ehr)
        try:
            config = await discover(
                ehr.iss, http=services.connections.smart(ehr.name), registration=registration
            )
        except FhirError as error:
            raise AppError(
                503, "The EHR is not answering right now", "Please try again in a minute.",
                code=ErrorCode.EHR_UNAVAILABLE,
            ) from error  # fmt: skip
        self._configs[ehr.name] = (now + DISCOVERY_SECONDS, config)
        return config

    async def _introspect(
        self, services: Services, ehr: EhrSettings, config: SmartConfiguration, token: str
    ) -> object:
        endpoint = config.raw.get("introspection_endpoint")
        registration = services.ehrs.registration(ehr)
        if not isinstance(endpoint, str) or not _allowed(endpoint, registration.allowed_auth_origins()):
            raise _refused("This EHR offers no token introspection that CareCanvas may use.")
        form = {"token": token, "token_type_hint": "access_token"}
        http = services.connections.smart(ehr.name)
        if not ehr.client_secret:
            form["client_id"] = ehr.client_id
        try:
            if ehr.client_secret:
                auth = httpx.BasicAuth(ehr.client_id, ehr.client_secret)
                response = await http.post(endpoint, data=form, auth=auth)
            else:
                response = await http.post(endpoint, data=form)
        except httpx.HTTPError as error:
            log.warning("token introspection failed", ehr=ehr.name, error_type=type(error).__name__)
            raise AppError(
                503, "The EHR is not answering right now", "Please try again in a minute.",
                code=ErrorCode.EHR_UNAVAILABLE,
            ) from error  # fmt: skip
        if response.status_code != 200:
            log.warning("token introspection refused", ehr=ehr.name, status=response.status_code)
            raise _refused("The EHR could not check this token.")
        try:
            return response.json()
        except ValueError:
            raise _refused("The EHR answered the token check with something that is not JSON.") from None

    async def verify(self, services: Services, ehr: EhrSettings, token: str) -> tuple[TokenInfo, bool]:
        """The token's facts and whether they were fresh from the EHR (False: from the cache)."""
        key = f"{ehr.name}:{token_digest(token)}"
        now = time.monotonic()
        cached = self._cached(key, now)
        if cached is not None:
            return cached, False
        config = await self._config(services, ehr)
        answer = await self._introspect(services, ehr, config, token)
        info = check_introspection(answer, ehr=ehr, issuer=config.issuer, now=time.time())
        self._remember(key, info, now)
        return info, True

    async def config(self, services: Services, ehr: EhrSettings) -> SmartConfiguration:
        return await self._config(services, ehr)


def ehr_for(services: Services, name: str | None) -> EhrSettings:
    """The registration a bearer caller names (or the only one there is)."""
    ehrs = services.ehrs.all()
    if name is None:
        if len(ehrs) == 1:
            return ehrs[0]
        raise _refused("Say which EHR issued the token with the `X-EHR` header.", status=400)
    for ehr in ehrs:
        if ehr.name == name:
            return ehr
    raise _refused("The `X-EHR` header names no EHR registered with CareCanvas.")


def owner_digest(services: Services, info: TokenInfo) -> str:
    """Who owns a bearer caller's jobs: keyed, so the jobs table never holds a guessable patient digest."""
    return "bearer:" + services.keyring.keyed_digest(f"{info.ehr_name}\x00{info.patient}\x00{info.fhir_user}")


def ephemeral_session(
    services: Services, info: TokenInfo, token: str, config: SmartConfiguration
) -> WebSession:
    """A session that lives for one request: never saved, its FHIR client uses the caller's own token."""
    expires = datetime.fromtimestamp(info.expires_at, UTC)
    scopes = GrantedScopes.parse(info.scope)
    token_set = {
        "access_token": token,
        "expires_at": expires.isoformat(),
        "scope": str(scopes),
        "refresh_token": None,
        "token_type": "Bearer",
        "patient": info.patient,
        "encounter": None,
        "fhir_user": info.fhir_user,
        "need_patient_banner": False,
    }
    data = SessionData(
        kind=SessionKind.EHR,
        smart_config=config_to_dict(config),
        token_set=token_set,
        patient=info.patient,
        fhir_user=info.fhir_user,
    )
    return WebSession(
        id_hash=owner_digest(services, info),
        ehr_name=info.ehr_name,
        csrf_token="",
        expires_at=expires,
        data=data,
    )


async def _audit_token_use(services: Services, info: TokenInfo, request_id: str | None) -> None:
    # Once per introspection (not per cached use); refused tokens are logged, not audited, so a caller
    # without any credential cannot fill the audit log.
    async with services.sessionmaker() as db:
        await services.audit.append(
            db,
            action=AuditAction.TOKEN_USE,
            outcome=AuditOutcome.SUCCESS,
            actor=info.fhir_user,
            patient=info.patient,
            ehr=info.ehr_name,
            resource=None,
            request_id=request_id,
            detail={"client_id": info.client_id, "mode": "bearer"},
        )
        await db.commit()


async def bearer_context(
    request: Request, services: Services, db: Any, rid: str | None, authorization: str
) -> RequestContext:
    token = bearer_token(authorization)
    ehr = ehr_for(services, request.headers.get(EHR_HEADER))
    verifier: BearerVerifier = request.app.state.api_bearer
    info, fresh = await verifier.verify(services, ehr, token)
    if fresh:
        await _audit_token_use(services, info, rid)
    config = await verifier.config(services, ehr)
    session = ephemeral_session(services, info, token, config)
    bind_ehr(session.ehr_name)
    return RequestContext(services=services, db=db, session=session, request_id=rid)


async def api_context(
    request: Request, services: ServicesDep, db: DbDep, rid: RequestIdDep
) -> RequestContext:
    """Bearer when an Authorization header is sent, else the session cookie with its CSRF header."""
    authorization = request.headers.get("authorization")
    if authorization is not None:
        return await bearer_context(request, services, db, rid, authorization)
    return await clinician_context(request, services, db, rid)


ApiContext = Annotated[RequestContext, Depends(api_context)]
