"""Staff sign-in by OpenID Connect (code + PKCE, state, nonce, verified id_token) and the compliance role.

The organisation's identity provider is configured like an EHR registration (``StaffOidcSettings``). The
code exchange and id_token check are fhir_adapters' own (signature against the issuer's JWKS with an
algorithm allow-list, ``iss``, ``aud``/``azp``, ``exp``, ``iat``, ``nonce``); discovery here is OIDC's
(``{issuer}/.well-known/openid-configuration``, issuer compared exactly). No tokens are kept: a staff
session holds only who signed in (``StaffIdentity``).
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any
from urllib.parse import urlencode, urlsplit

import httpx

from fhir_adapters import (
    EhrRegistration,
    IdTokenError,
    PendingAuthorization,
    SmartConfiguration,
    SmartError,
    exchange_code,
)
from fhir_adapters.pkce import code_challenge_s256, new_code_verifier, new_nonce, new_state
from service.settings import StaffOidcSettings

PENDING_MAX_AGE = timedelta(minutes=10)
STAFF_ACTOR_PREFIX = "urn:carecanvas:staff:"
# Where a finished sign-in goes: a fixed set of paths (never a URL from the request: no open redirect).
RETURN_TARGETS: tuple[str, ...] = ("/compliance", "/reviewer")
_MAX_DOCUMENT_BYTES = 256_000
_SUBJECT = re.compile(r"^[\x21-\x7e]{1,200}$")  # OIDC sub: printable ASCII, no spaces


class SignInFailure(StrEnum):
    """Why a staff sign-in did not complete (stable; recorded in the audit detail)."""

    NO_PENDING = "no_pending_sign_in"
    STATE_MISMATCH = "state_mismatch"
    EXPIRED = "sign_in_expired"
    PROVIDER_ERROR = "provider_error"
    DISCOVERY = "discovery_failed"
    TOKEN_REFUSED = "token_refused"  # noqa: S105 - a failure reason, not a secret
    ID_TOKEN_INVALID = "id_token_invalid"  # noqa: S105 - a failure reason, not a secret
    NO_ID_TOKEN = "no_id_token"  # noqa: S105 - a failure reason, not a secret
    BAD_SUBJECT = "bad_subject"


class StaffSignInError(Exception):
    """A staff sign-in failed; ``reason`` is stable, the message is safe to show (nothing from the token)."""

    def __init__(self, reason: SignInFailure, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class ProviderMetadata:
    """The parts of the provider's OpenID configuration the sign-in uses."""

    issuer: str
    authorization_endpoint: str
    token_endpoint: str
    jwks_uri: str

    def as_smart_configuration(self) -> SmartConfiguration:
        """The shape fhir_adapters' code exchange and id_token check take (issuer, endpoints, JWKS)."""
        return SmartConfiguration(
            fhir_base=self.issuer,
            issuer=self.issuer,
            authorization_endpoint=self.authorization_endpoint,
            token_endpoint=self.token_endpoint,
            jwks_uri=self.jwks_uri,
            capabilities=("sso-openid-connect",),
            code_challenge_methods_supported=("S256",),
        )


@dataclass(frozen=True)
class StaffPending:
    """The sign-in in flight, kept server-side in the staff session until the callback spends it."""

    state: str = field(repr=False)
    nonce: str = field(repr=False)
    code_verifier: str = field(repr=False)
    created_at: datetime
    redirect_uri: str
    provider: ProviderMetadata
    return_to: str = RETURN_TARGETS[0]

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": "staff",
            "return_to": self.return_to,
            "state": self.state,
            "nonce": self.nonce,
            "code_verifier": self.code_verifier,
            "created_at": self.created_at.isoformat(),
            "redirect_uri": self.redirect_uri,
            "provider": {
                "issuer": self.provider.issuer,
                "authorization_endpoint": self.provider.authorization_endpoint,
                "token_endpoint": self.provider.token_endpoint,
                "jwks_uri": self.provider.jwks_uri,
            },
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StaffPending:
        if data.get("kind") != "staff":
            raise ValueError("not a staff sign-in")
        return cls(
            state=str(data["state"]),
            nonce=str(data["nonce"]),
            code_verifier=str(data["code_verifier"]),
            created_at=datetime.fromisoformat(data["created_at"]),
            redirect_uri=str(data["redirect_uri"]),
            provider=ProviderMetadata(**{key: str(value) for key, value in data["provider"].items()}),
            return_to=checked_return_to(data.get("return_to")),
        )


def checked_return_to(value: object) -> str:
    """One of RETURN_TARGETS; anything else is the console (the default)."""
    return value if isinstance(value, str) and value in RETURN_TARGETS else RETURN_TARGETS[0]


@dataclass(frozen=True)
class StaffIdentity:
    """Who signed in: the provider's subject, display name, email and the roles read from the role claim."""

    issuer: str
    subject: str
    name: str | None
    email: str | None
    roles: tuple[str, ...]
    signed_in_at: datetime

    @property
    def actor(self) -> str:
        """The audit actor: a URN (not a FHIR reference), so BALP exports it as an identifier."""
        return f"{STAFF_ACTOR_PREFIX}{self.subject}"

    @property
    def display(self) -> str:
        return self.name or self.email or self.subject

    def has_role(self, role: str) -> bool:
        return role in self.roles

    def to_dict(self) -> dict[str, Any]:
        return {
            "issuer": self.issuer,
            "subject": self.subject,
            "name": self.name,
            "email": self.email,
            "roles": list(self.roles),
            "signed_in_at": self.signed_in_at.isoformat(),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StaffIdentity:
        return cls(
            issuer=str(data["issuer"]),
            subject=str(data["subject"]),
            name=data.get("name"),
            email=data.get("email"),
            roles=tuple(str(role) for role in data.get("roles", ())),
            signed_in_at=datetime.fromisoformat(data["signed_in_at"]),
        )


@dataclass(frozen=True)
class StartedSignIn:
    authorize_url: str = field(repr=False)
    pending: StaffPending


# ---- discovery ---------------------------------------------------------------------------------------


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    return parts.scheme.lower(), (parts.hostname or "").lower(), parts.port


def _usable_url(url: object) -> bool:
    """https, or http on loopback (the sandbox); no credentials or fragment."""
    if not isinstance(url, str) or not url:
        return False
    parts = urlsplit(url)
    host = parts.hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    secure = parts.scheme == "https" or (parts.scheme == "http" and loopback)
    return secure and bool(host) and not parts.username and not parts.password and not parts.fragment


async def _get_json(http: httpx.AsyncClient, url: str) -> dict[str, Any]:
    try:
        async with http.stream(
            "GET", url, headers={"Accept": "application/json"}, follow_redirects=False
        ) as answer:
            body = b""
            async for chunk in answer.aiter_bytes():
                body += chunk
                if len(body) > _MAX_DOCUMENT_BYTES:
                    raise StaffSignInError(
                        SignInFailure.DISCOVERY, "The provider's configuration is too large."
                    )
    except httpx.TransportError:
        raise StaffSignInError(
            SignInFailure.DISCOVERY, "The identity provider could not be reached."
        ) from None
    if answer.status_code != 200:
        raise StaffSignInError(
            SignInFailure.DISCOVERY, f"The identity provider answered {answer.status_code}."
        )
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        document = None
    if not isinstance(document, dict):
        raise StaffSignInError(SignInFailure.DISCOVERY, "The provider's configuration is not a JSON object.")
    return document


async def discover_provider(settings: StaffOidcSettings, *, http: httpx.AsyncClient) -> ProviderMetadata:
    """Fetch and check the OpenID configuration: exact issuer, endpoints on allowed origins, S256 offered."""
    issuer = settings.issuer.rstrip("/")
    if not _usable_url(issuer):
        raise StaffSignInError(SignInFailure.DISCOVERY, "The configured issuer is not an https URL.")
    document = await _get_json(http, f"{issuer}/.well-known/openid-configuration")
    # OpenID Connect Discovery §4.3: the issuer in the document must be exactly the configured one.
    if document.get("issuer") != settings.issuer and document.get("issuer") != issuer:
        raise StaffSignInError(SignInFailure.DISCOVERY, "The provider names a different issuer.")
    allowed = {_origin(issuer), *(_origin(origin) for origin in settings.auth_origins)}
    endpoints: dict[str, str] = {}
    for name in ("authorization_endpoint", "token_endpoint", "jwks_uri"):
        value = document.get(name)
        if not _usable_url(value) or _origin(str(value)) not in allowed:
            raise StaffSignInError(
                SignInFailure.DISCOVERY, f"The provider's {name} is not on an allowed origin."
            )
        endpoints[name] = str(value)
    methods = document.get("code_challenge_methods_supported")
    # Providers that do not list their PKCE methods still get S256; one that lists others only is refused.
    if isinstance(methods, list) and "S256" not in methods:
        raise StaffSignInError(SignInFailure.DISCOVERY, "The provider does not offer PKCE with S256.")
    return ProviderMetadata(issuer=str(document["issuer"]), **endpoints)


# ---- the sign-in -------------------------------------------------------------------------------------


def authorization_url(
    settings: StaffOidcSettings,
    provider: ProviderMetadata,
    *,
    redirect_uri: str,
    now: datetime | None = None,
    return_to: str = RETURN_TARGETS[0],
) -> StartedSignIn:
    """The authorization request: code flow, PKCE S256, 256-bit state and nonce."""
    pending = StaffPending(
        return_to=checked_return_to(return_to),
        state=new_state(),
        nonce=new_nonce(),
        code_verifier=new_code_verifier(),
        created_at=now or datetime.now(UTC),
        redirect_uri=redirect_uri,
        provider=provider,
    )
    params = {
        "response_type": "code",
        "client_id": settings.client_id,
        "redirect_uri": redirect_uri,
        "scope": " ".join(settings.scopes),
        "state": pending.state,
        "nonce": pending.nonce,
        "code_challenge": code_challenge_s256(pending.code_verifier),
        "code_challenge_method": "S256",
    }
    separator = "&" if urlsplit(provider.authorization_endpoint).query else "?"
    return StartedSignIn(provider.authorization_endpoint + separator + urlencode(params), pending)


async def begin_sign_in(
    settings: StaffOidcSettings,
    *,
    http: httpx.AsyncClient,
    redirect_uri: str,
    return_to: str = RETURN_TARGETS[0],
) -> StartedSignIn:
    provider = await discover_provider(settings, http=http)
    return authorization_url(settings, provider, redirect_uri=redirect_uri, return_to=return_to)


def check_pending(
    pending_raw: Mapping[str, Any] | None, state: str | None, *, now: datetime | None = None
) -> StaffPending:
    """The pending sign-in this callback answers: present, same state (constant time), fresh."""
    try:
        pending = StaffPending.from_dict(pending_raw or {})
    except (KeyError, ValueError, TypeError):
        raise StaffSignInError(
            SignInFailure.NO_PENDING, "No sign-in was in progress in this browser (or it was already used)."
        ) from None
    if not state or not hmac.compare_digest(state.encode("utf-8", "replace"), pending.state.encode()):
        raise StaffSignInError(SignInFailure.STATE_MISMATCH, "The answer does not belong to this sign-in.")
    if (now or datetime.now(UTC)) - pending.created_at > PENDING_MAX_AGE:
        raise StaffSignInError(SignInFailure.EXPIRED, "The sign-in took too long.")
    return pending


def _registration(settings: StaffOidcSettings, pending: StaffPending) -> EhrRegistration:
    return EhrRegistration(
        name=settings.name,
        iss=pending.provider.issuer,
        client_id=settings.client_id,
        client_auth=settings.client_auth,
        client_secret=settings.client_secret,
        redirect_uri=pending.redirect_uri,
        scopes=tuple(settings.scopes),
    )


async def complete_sign_in(
    settings: StaffOidcSettings,
    *,
    pending: StaffPending,
    code: str | None,
    http: httpx.AsyncClient,
    now: datetime | None = None,
) -> StaffIdentity:
    """Exchange the code (PKCE verifier, client auth) and verify the id_token; the identity it names."""
    if not code:
        raise StaffSignInError(SignInFailure.TOKEN_REFUSED, "The provider sent no authorization code.")
    authorization = PendingAuthorization(
        url="",
        state=pending.state,
        code_verifier=pending.code_verifier,
        nonce=pending.nonce,
        created_at=pending.created_at,
        redirect_uri=pending.redirect_uri,
        scopes=tuple(settings.scopes),
        iss=pending.provider.issuer,
    )
    try:
        token_set = await exchange_code(
            registration=_registration(settings, pending),
            config=pending.provider.as_smart_configuration(),
            code=code,
            pending=authorization,
            http=http,
        )
    except IdTokenError:
        raise StaffSignInError(
            SignInFailure.ID_TOKEN_INVALID, "The provider's id_token did not verify."
        ) from None
    except SmartError:
        raise StaffSignInError(
            SignInFailure.TOKEN_REFUSED, "The provider refused the code exchange."
        ) from None
    claims = token_set.id_token_claims
    if claims is None:
        raise StaffSignInError(SignInFailure.NO_ID_TOKEN, "The provider's answer had no id_token.")
    return identity_from_claims(claims, settings=settings, now=now)


def claim_values(claims: Mapping[str, Any], path: str) -> tuple[str, ...]:
    """The strings at a (dotted) claim path: a list of strings, or one space-separated string."""
    value: Any = claims
    for part in path.split("."):
        value = value.get(part) if isinstance(value, Mapping) else None
    if isinstance(value, str):
        return tuple(value.split())
    if isinstance(value, list):
        return tuple(item for item in value if isinstance(item, str))
    return ()


def identity_from_claims(
    claims: Mapping[str, Any], *, settings: StaffOidcSettings, now: datetime | None = None
) -> StaffIdentity:
    subject = claims.get("sub")
    if not isinstance(subject, str) or not _SUBJECT.match(subject):
        raise StaffSignInError(SignInFailure.BAD_SUBJECT, "The id_token's subject is not usable.")

    def text(name: str) -> str | None:
        value = claims.get(name)
        return value[:200] if isinstance(value, str) and value.strip() else None

    return StaffIdentity(
        issuer=str(claims.get("iss", settings.issuer)),
        subject=subject,
        name=text("name"),
        email=text("email"),
        roles=claim_values(claims, settings.role_claim),
        signed_in_at=now or datetime.now(UTC),
    )


def may_use_console(identity: StaffIdentity, settings: StaffOidcSettings) -> bool:
    """The compliance role, read from the configured claim, decides; nothing else does."""
    return identity.has_role(settings.compliance_role)


def reviewer_role_of(identity: StaffIdentity, settings: StaffOidcSettings) -> str | None:
    """The portrait reviewer role ("artist" or "clinician") one of the user's IdP roles gives, if any."""
    for idp_role, reviewer_role in settings.reviewer_roles.items():
        if identity.has_role(idp_role):
            return reviewer_role
    return None


def may_sign_in(identity: StaffIdentity, settings: StaffOidcSettings) -> bool:
    """A staff session opens only for someone it is good for: the compliance role or a reviewer role."""
    return may_use_console(identity, settings) or reviewer_role_of(identity, settings) is not None
