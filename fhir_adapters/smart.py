"""SMART App Launch 2.x client side: discovery, authorization request, code exchange, refresh, id_token."""

from __future__ import annotations

import asyncio
import base64
import hmac
import ipaddress
import json
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Literal
from urllib.parse import urlencode, urlsplit

import httpx
from joserfc import jwk, jwt
from joserfc.errors import JoseError

from fhir_adapters.client import origin_of
from fhir_adapters.errors import (
    DiscoveryError,
    DiscoveryProblem,
    IdTokenError,
    SmartError,
    StateError,
    TokenError,
)
from fhir_adapters.pkce import code_challenge_s256, new_code_verifier, new_nonce, new_state
from fhir_adapters.scopes import GrantedScopes

ClientAuth = Literal["public", "client_secret_basic", "private_key_jwt"]
SigningAlg = Literal["RS384", "ES384"]

ID_TOKEN_ALGORITHMS = ("RS256", "RS384", "ES256", "ES384")
CLIENT_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
_MAX_RESPONSE_BYTES = 1_000_000
_ASSERTION_LIFETIME_SECONDS = 300
_CLOCK_LEEWAY_SECONDS = 60
# A token response without expires_in gets a short assumed lifetime, so we refresh early rather than late.
_ASSUMED_TOKEN_LIFETIME_SECONDS = 300
_SECRET_FIELDS = frozenset({"access_token", "refresh_token", "id_token"})
_KNOWN_TOKEN_FIELDS = _SECRET_FIELDS | {
    "token_type",
    "expires_in",
    "scope",
    "patient",
    "encounter",
    "need_patient_banner",
    "smart_style_url",
}


@dataclass(frozen=True)
class EhrRegistration:
    """One EHR we are registered with. Secrets are kept out of repr()."""

    name: str
    iss: str
    client_id: str
    client_auth: ClientAuth
    redirect_uri: str
    client_secret: str | None = field(default=None, repr=False)
    private_key: str | dict[str, Any] | None = field(default=None, repr=False)
    key_id: str | None = None
    signing_alg: SigningAlg = "RS384"
    scopes: tuple[str, ...] = ()
    frame_origins: tuple[str, ...] = ()
    auth_origins: tuple[str, ...] = ()
    launch_url: str | None = None

    def __post_init__(self) -> None:
        _check_endpoint_url("iss", self.iss)
        if self.client_auth not in ("public", "client_secret_basic", "private_key_jwt"):
            raise ValueError("client_auth must be public, client_secret_basic or private_key_jwt")
        if self.client_auth == "client_secret_basic" and not self.client_secret:
            raise ValueError(f"registration {self.name!r}: client_secret_basic needs client_secret")
        if self.client_auth == "private_key_jwt" and (not self.private_key or not self.key_id):
            raise ValueError(f"registration {self.name!r}: private_key_jwt needs private_key and key_id")
        if self.signing_alg not in ("RS384", "ES384"):
            raise ValueError("signing_alg must be RS384 or ES384")

    def allowed_auth_origins(self) -> frozenset[tuple[str, str, int]]:
        """Origins the authorization server may live on: the FHIR base's plus those configured."""
        return frozenset({origin_of(self.iss), *(origin_of(o) for o in self.auth_origins)})


@dataclass(frozen=True)
class SmartConfiguration:
    """The parts of {iss}/.well-known/smart-configuration we rely on."""

    fhir_base: str
    issuer: str | None
    authorization_endpoint: str
    token_endpoint: str
    jwks_uri: str | None
    capabilities: tuple[str, ...]
    code_challenge_methods_supported: tuple[str, ...]
    scopes_supported: tuple[str, ...] = ()
    grant_types_supported: tuple[str, ...] = ()
    token_endpoint_auth_methods_supported: tuple[str, ...] = ()
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False)


@dataclass(frozen=True)
class PendingAuthorization:
    """What must be remembered (server-side, bound to the session) between redirect and callback."""

    url: str = field(repr=False)
    state: str = field(repr=False)
    code_verifier: str = field(repr=False)
    nonce: str = field(repr=False)
    created_at: datetime
    redirect_uri: str
    scopes: tuple[str, ...]
    iss: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "state": self.state,
            "code_verifier": self.code_verifier,
            "nonce": self.nonce,
            "created_at": self.created_at.isoformat(),
            "redirect_uri": self.redirect_uri,
            "scopes": list(self.scopes),
            "iss": self.iss,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PendingAuthorization:
        return cls(
            url=data["url"],
            state=data["state"],
            code_verifier=data["code_verifier"],
            nonce=data["nonce"],
            created_at=datetime.fromisoformat(data["created_at"]),
            redirect_uri=data["redirect_uri"],
            scopes=tuple(data["scopes"]),
            iss=data["iss"],
        )


@dataclass(frozen=True)
class TokenSet:
    """A token response, parsed. Tokens are kept out of repr(); `to_dict` output must be stored encrypted."""

    access_token: str = field(repr=False)
    expires_at: datetime
    scopes: GrantedScopes
    refresh_token: str | None = field(default=None, repr=False)
    token_type: str = "Bearer"  # noqa: S105 - the OAuth token type name, not a secret
    patient: str | None = field(default=None, repr=False)
    encounter: str | None = field(default=None, repr=False)
    id_token_claims: Mapping[str, Any] | None = field(default=None, repr=False)
    fhir_user: str | None = field(default=None, repr=False)
    need_patient_banner: bool = True
    smart_style_url: str | None = None
    extras: Mapping[str, Any] = field(default_factory=dict, repr=False)

    def expires_within(self, seconds: float, *, now: datetime | None = None) -> bool:
        return self.expires_at - (now or datetime.now(UTC)) <= timedelta(seconds=seconds)

    def to_dict(self) -> dict[str, Any]:
        return {
            "access_token": self.access_token,
            "expires_at": self.expires_at.isoformat(),
            "scope": str(self.scopes),
            "refresh_token": self.refresh_token,
            "token_type": self.token_type,
            "patient": self.patient,
            "encounter": self.encounter,
            "id_token_claims": dict(self.id_token_claims) if self.id_token_claims is not None else None,
            "fhir_user": self.fhir_user,
            "need_patient_banner": self.need_patient_banner,
            "smart_style_url": self.smart_style_url,
            "extras": dict(self.extras),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TokenSet:
        expires_at = datetime.fromisoformat(data["expires_at"])
        if expires_at.tzinfo is None:
            raise ValueError("stored expires_at must be timezone-aware")
        return cls(
            access_token=data["access_token"],
            expires_at=expires_at,
            scopes=GrantedScopes.parse(data.get("scope")),
            refresh_token=data.get("refresh_token"),
            token_type=data.get("token_type", "Bearer"),
            patient=data.get("patient"),
            encounter=data.get("encounter"),
            id_token_claims=data.get("id_token_claims"),
            fhir_user=data.get("fhir_user"),
            need_patient_banner=bool(data.get("need_patient_banner", True)),
            smart_style_url=data.get("smart_style_url"),
            extras=dict(data.get("extras") or {}),
        )


# ---- helpers ---------------------------------------------------------------------------------------


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_endpoint_url(name: str, url: object) -> str:
    """Absolute https URL (plain http only on loopback, for local sandboxes), no credentials or fragment."""
    if not isinstance(url, str) or not url:
        raise ValueError(f"{name} must be an absolute URL")
    parts = urlsplit(url)
    host = parts.hostname or ""
    secure = parts.scheme == "https" or (parts.scheme == "http" and _is_loopback(host))
    if secure and host and not parts.username and not parts.password and not parts.fragment:
        return url
    raise ValueError(f"{name} must be an https URL (http only on loopback) without credentials or fragment")


async def _request_json(
    http: httpx.AsyncClient,
    method: str,
    url: str,
    *,
    what: str,
    error_class: type[SmartError],
    data: Mapping[str, str] | None = None,
    headers: Mapping[str, str] | None = None,
) -> tuple[int, dict[str, Any]]:
    """Send one request (no redirects, bounded body) and return (status, JSON object)."""
    request_headers = {"Accept": "application/json", **(headers or {})}
    try:
        async with http.stream(
            method,
            url,
            data=dict(data) if data is not None else None,
            headers=request_headers,
            follow_redirects=False,
        ) as response:
            chunks: list[bytes] = []
            size = 0
            async for chunk in response.aiter_bytes():
                size += len(chunk)
                if size > _MAX_RESPONSE_BYTES:
                    raise error_class(f"{what}: response larger than {_MAX_RESPONSE_BYTES} bytes")
                chunks.append(chunk)
    except httpx.TransportError as exc:
        raise error_class(f"{what}: request failed ({type(exc).__name__})", temporary=True) from None
    status = response.status_code
    if 300 <= status < 400:
        raise error_class(f"{what}: redirect {status} refused", status=status)
    try:
        body = json.loads(b"".join(chunks)) if chunks else None
    except (ValueError, UnicodeDecodeError):
        body = None
    if not isinstance(body, dict):
        raise error_class(
            f"{what}: answer {status} is not a JSON object", status=status, temporary=status >= 500
        )
    return status, body


def _strings(value: object) -> tuple[str, ...]:
    return tuple(v for v in value if isinstance(v, str)) if isinstance(value, list) else ()


# ---- discovery and the authorization request -------------------------------------------------------


async def discover(
    iss: str, *, http: httpx.AsyncClient, registration: EhrRegistration | None = None
) -> SmartConfiguration:
    """Fetch and check {iss}/.well-known/smart-configuration.

    Endpoint origins must be the FHIR base's or ones the registration lists (`auth_origins`); whole
    origins are compared (scheme, host, port), never string prefixes.
    """
    if registration is not None and iss != registration.iss:
        raise DiscoveryError("iss does not match the registration's iss exactly")
    try:
        _check_endpoint_url("iss", iss)
        allowed = registration.allowed_auth_origins() if registration else frozenset({origin_of(iss)})
    except ValueError as exc:
        raise DiscoveryError(str(exc)) from None
    url = iss.rstrip("/") + "/.well-known/smart-configuration"
    status, body = await _request_json(http, "GET", url, what="SMART discovery", error_class=DiscoveryError)
    if status != 200:
        raise DiscoveryError(f"SMART discovery answered {status}", status=status, temporary=status >= 500)

    def endpoint(name: str, *, required: bool) -> str | None:
        value = body.get(name)
        if value is None and not required:
            return None
        try:
            _check_endpoint_url(name, value)
            in_allowed = origin_of(str(value)) in allowed
        except ValueError as exc:
            # urlsplit's own messages (e.g. a bad port) do not say which field was wrong.
            detail = str(exc) if str(exc).startswith(name) else f"{name} is not a usable URL"
            raise DiscoveryError(f"SMART discovery: {detail}") from None
        if not in_allowed:
            raise DiscoveryError(
                f"SMART discovery: {name} is on an origin the registration does not allow",
                problem=DiscoveryProblem.ORIGIN_NOT_ALLOWED,
            )
        return str(value)

    authorization_endpoint = endpoint("authorization_endpoint", required=True)
    token_endpoint = endpoint("token_endpoint", required=True)
    issuer = endpoint("issuer", required=False)
    jwks_uri = endpoint("jwks_uri", required=False)
    methods = _strings(body.get("code_challenge_methods_supported"))
    if "S256" not in methods:
        raise DiscoveryError(
            "SMART discovery: the server does not offer PKCE S256", problem=DiscoveryProblem.NO_PKCE
        )
    capabilities = _strings(body.get("capabilities"))
    if "sso-openid-connect" in capabilities and (issuer is None or jwks_uri is None):
        raise DiscoveryError("SMART discovery: sso-openid-connect needs issuer and jwks_uri")
    if authorization_endpoint is None or token_endpoint is None:  # unreachable: both are required above
        raise DiscoveryError("SMART discovery: authorization_endpoint and token_endpoint are required")
    return SmartConfiguration(
        fhir_base=iss,
        issuer=issuer,
        authorization_endpoint=authorization_endpoint,
        token_endpoint=token_endpoint,
        jwks_uri=jwks_uri,
        capabilities=capabilities,
        code_challenge_methods_supported=methods,
        scopes_supported=_strings(body.get("scopes_supported")),
        grant_types_supported=_strings(body.get("grant_types_supported")),
        token_endpoint_auth_methods_supported=_strings(body.get("token_endpoint_auth_methods_supported")),
        raw=body,
    )


def begin_authorization(
    *,
    registration: EhrRegistration,
    config: SmartConfiguration,
    redirect_uri: str,
    launch: str | None,
    scopes: Sequence[str],
    now: datetime | None = None,
) -> PendingAuthorization:
    """Build the authorization URL (PKCE S256, 256-bit state and nonce, aud = iss)."""
    if not scopes:
        raise ValueError("scopes must not be empty")
    if any(not s or " " in s for s in scopes):
        raise ValueError("each scope must be a non-empty string without spaces")
    if launch is not None and not launch:
        raise ValueError("launch must be None or a non-empty string")
    state, verifier, nonce = new_state(), new_code_verifier(), new_nonce()
    params = {
        "response_type": "code",
        "client_id": registration.client_id,
        "redirect_uri": redirect_uri,
        "scope": " ".join(scopes),
        "state": state,
        "aud": registration.iss,
        "code_challenge": code_challenge_s256(verifier),
        "code_challenge_method": "S256",
    }
    if "openid" in scopes:
        params["nonce"] = nonce
    if launch is not None:
        params["launch"] = launch
    separator = "&" if urlsplit(config.authorization_endpoint).query else "?"
    return PendingAuthorization(
        url=config.authorization_endpoint + separator + urlencode(params),
        state=state,
        code_verifier=verifier,
        nonce=nonce,
        created_at=now or datetime.now(UTC),
        redirect_uri=redirect_uri,
        scopes=tuple(scopes),
        iss=registration.iss,
    )


def check_state(
    pending: PendingAuthorization,
    returned_state: str | None,
    *,
    max_age: timedelta = timedelta(minutes=10),
    now: datetime | None = None,
) -> None:
    """Raise StateError unless the callback's state is this pending authorization's and still fresh."""
    if not returned_state or not hmac.compare_digest(returned_state.encode(), pending.state.encode()):
        raise StateError(
            "the callback's state does not match the pending authorization", error="invalid_state"
        )
    if (now or datetime.now(UTC)) - pending.created_at > max_age:
        raise StateError("the pending authorization expired; start the launch again", error="expired_state")


# ---- client authentication and the token endpoint --------------------------------------------------


def client_assertion(*, registration: EhrRegistration, audience: str, now: float | None = None) -> str:
    """A private_key_jwt client assertion (RFC 7523): iss = sub = client_id, aud = token endpoint."""
    if registration.private_key is None or registration.key_id is None:
        raise ValueError("private_key_jwt needs private_key and key_id in the registration")
    private_key: Any = registration.private_key
    key = (
        jwk.import_key(private_key, "RSA")
        if registration.signing_alg == "RS384"
        else jwk.import_key(private_key, "EC")
    )
    issued = int(now if now is not None else time.time())
    claims = {
        "iss": registration.client_id,
        "sub": registration.client_id,
        "aud": audience,
        "iat": issued,
        "exp": issued + _ASSERTION_LIFETIME_SECONDS,
        "jti": secrets.token_urlsafe(24),
    }
    header = {"alg": registration.signing_alg, "kid": registration.key_id, "typ": "JWT"}
    return jwt.encode(header, claims, key, algorithms=[registration.signing_alg])


def _client_auth(
    registration: EhrRegistration, config: SmartConfiguration
) -> tuple[dict[str, str], dict[str, str]]:
    """(extra form fields, extra headers) that authenticate the client at the token endpoint."""
    if registration.client_auth == "public":
        return {"client_id": registration.client_id}, {}
    if registration.client_auth == "client_secret_basic":
        # RFC 6749 §2.3.1: both parts are form-urlencoded before base64.
        user = urlencode({"": registration.client_id})[1:]
        password = urlencode({"": registration.client_secret or ""})[1:]
        basic = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
        return {}, {"Authorization": f"Basic {basic}"}
    assertion = client_assertion(registration=registration, audience=config.token_endpoint)
    return {"client_assertion_type": CLIENT_ASSERTION_TYPE, "client_assertion": assertion}, {}


async def _token_request(
    *,
    registration: EhrRegistration,
    config: SmartConfiguration,
    form: dict[str, str],
    http: httpx.AsyncClient,
) -> dict[str, Any]:
    extra_form, headers = _client_auth(registration, config)
    status, body = await _request_json(
        http,
        "POST",
        config.token_endpoint,
        what="token request",
        error_class=TokenError,
        data={**form, **extra_form},
        headers=headers,
    )
    if status != 200:
        error = body.get("error") if isinstance(body.get("error"), str) else ""
        description = body.get("error_description")
        raise TokenError(
            f"token endpoint answered {status} {error or 'without an error code'}",
            error=str(error),
            error_description=description if isinstance(description, str) else "",
            status=status,
            temporary=status >= 500 or status == 429,
        )
    if not isinstance(body.get("access_token"), str) or not body["access_token"]:
        raise TokenError("token response has no access_token", error="invalid_response")
    if str(body.get("token_type", "")).lower() != "bearer":
        raise TokenError("token response token_type is not Bearer", error="invalid_response")
    return body


def _token_set(
    body: Mapping[str, Any],
    *,
    requested_scopes: Sequence[str],
    id_token_claims: Mapping[str, Any] | None,
    previous: TokenSet | None = None,
) -> TokenSet:
    expires_in = body.get("expires_in")
    lifetime = (
        expires_in
        if isinstance(expires_in, int | float) and not isinstance(expires_in, bool) and expires_in > 0
        else _ASSUMED_TOKEN_LIFETIME_SECONDS
    )
    scope = body.get("scope")
    # RFC 6749 §5.1: an omitted scope means the requested scopes were granted.
    scopes = GrantedScopes.parse(scope) if isinstance(scope, str) else GrantedScopes.parse(requested_scopes)

    def text(name: str, fallback: str | None) -> str | None:
        value = body.get(name)
        return value if isinstance(value, str) and value else fallback

    claims = (
        id_token_claims if id_token_claims is not None else (previous.id_token_claims if previous else None)
    )
    fhir_user = claims.get("fhirUser") if claims else None
    banner = body.get("need_patient_banner")
    return TokenSet(
        access_token=body["access_token"],
        expires_at=datetime.now(UTC) + timedelta(seconds=float(lifetime)),
        scopes=scopes,
        refresh_token=text("refresh_token", previous.refresh_token if previous else None),
        token_type="Bearer",  # noqa: S106 - the OAuth token type name, not a secret
        patient=text("patient", previous.patient if previous else None),
        encounter=text("encounter", previous.encounter if previous else None),
        id_token_claims=claims,
        fhir_user=fhir_user if isinstance(fhir_user, str) else (previous.fhir_user if previous else None),
        need_patient_banner=banner
        if isinstance(banner, bool)
        else (previous.need_patient_banner if previous else True),
        smart_style_url=text("smart_style_url", previous.smart_style_url if previous else None),
        extras={k: v for k, v in body.items() if k not in _KNOWN_TOKEN_FIELDS},
    )


async def exchange_code(
    *,
    registration: EhrRegistration,
    config: SmartConfiguration,
    code: str,
    pending: PendingAuthorization,
    http: httpx.AsyncClient,
) -> TokenSet:
    """Trade the authorization code (with the PKCE verifier) for tokens; verifies any id_token."""
    if not code:
        raise TokenError("the callback carried no authorization code", error="invalid_request")
    body = await _token_request(
        registration=registration,
        config=config,
        form={
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": pending.redirect_uri,
            "code_verifier": pending.code_verifier,
        },
        http=http,
    )
    claims = None
    if isinstance(body.get("id_token"), str):
        claims = await verify_id_token(
            body["id_token"], config=config, client_id=registration.client_id, nonce=pending.nonce, http=http
        )
    return _token_set(body, requested_scopes=pending.scopes, id_token_claims=claims)


async def refresh(
    *, registration: EhrRegistration, config: SmartConfiguration, token_set: TokenSet, http: httpx.AsyncClient
) -> TokenSet:
    """Use the refresh token; keeps the old refresh token and launch context when none are returned."""
    if not token_set.refresh_token:
        raise TokenError("no refresh token to refresh with", error="invalid_grant")
    body = await _token_request(
        registration=registration,
        config=config,
        form={"grant_type": "refresh_token", "refresh_token": token_set.refresh_token},
        http=http,
    )
    # A refreshed id_token has no nonce to check against; we keep the claims from the launch instead.
    return _token_set(body, requested_scopes=token_set.scopes.raw, id_token_claims=None, previous=token_set)


async def backend_services_token(
    *,
    registration: EhrRegistration,
    config: SmartConfiguration,
    scopes: Sequence[str],
    http: httpx.AsyncClient,
) -> TokenSet:
    """SMART Backend Services: client_credentials with the registration's client authentication."""
    if registration.client_auth == "public":
        raise TokenError("backend services need a confidential client", error="invalid_client")
    body = await _token_request(
        registration=registration,
        config=config,
        form={"grant_type": "client_credentials", "scope": " ".join(scopes)},
        http=http,
    )
    return replace(_token_set(body, requested_scopes=scopes, id_token_claims=None), need_patient_banner=False)


# ---- id_token ----------------------------------------------------------------------------------------


def _segment_json(token: str, index: int) -> dict[str, Any]:
    try:
        segment = token.split(".")[index]
        decoded = json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
    except (IndexError, ValueError, UnicodeDecodeError):
        raise IdTokenError("id_token is not a well-formed JWT", error="invalid_token") from None
    if not isinstance(decoded, dict):
        raise IdTokenError("id_token is not a well-formed JWT", error="invalid_token")
    return decoded


async def verify_id_token(
    id_token: str,
    *,
    config: SmartConfiguration,
    client_id: str,
    nonce: str | None,
    http: httpx.AsyncClient,
    now: int | None = None,
) -> dict[str, Any]:
    """Verify signature (issuer's JWKS), algorithm, iss, aud/azp, exp, iat and nonce; return the claims."""
    header = _segment_json(id_token, 0)
    if id_token.count(".") != 2:
        raise IdTokenError("id_token is not a signed compact JWT", error="invalid_token")
    alg = header.get("alg")
    if alg not in ID_TOKEN_ALGORITHMS:
        raise IdTokenError(f"id_token algorithm not allowed; allowed: {', '.join(ID_TOKEN_ALGORITHMS)}")
    if config.jwks_uri is None or config.issuer is None:
        raise IdTokenError("the SMART configuration has no jwks_uri/issuer to verify an id_token with")
    status, jwks = await _request_json(http, "GET", config.jwks_uri, what="JWKS", error_class=IdTokenError)
    if status != 200:
        raise IdTokenError(f"JWKS answered {status}", status=status, temporary=status >= 500)
    try:
        key_set = jwk.KeySet.import_key_set(jwks)  # type: ignore[arg-type]
        token = jwt.decode(id_token, key_set, algorithms=list(ID_TOKEN_ALGORITHMS))
    except (JoseError, ValueError, KeyError, TypeError) as exc:
        raise IdTokenError(
            f"id_token signature check failed ({type(exc).__name__})", error="invalid_token"
        ) from None
    claims = dict(token.claims)
    options: dict[str, Any] = {
        "iss": {"essential": True, "value": config.issuer},
        "aud": {"essential": True, "value": client_id},
        "exp": {"essential": True},
        "iat": {"essential": True},
        "sub": {"essential": True},
    }
    if nonce is not None:
        options["nonce"] = {"essential": True, "value": nonce}
    registry = jwt.JWTClaimsRegistry(now=now, leeway=_CLOCK_LEEWAY_SECONDS, **options)
    try:
        registry.validate(claims)
    except JoseError as exc:
        # joserfc's messages name the claim ("invalid_claim: Invalid claim: 'aud'"), never its value.
        raise IdTokenError(f"id_token rejected: {exc}", error="invalid_token") from None
    audiences = claims["aud"] if isinstance(claims["aud"], list) else [claims["aud"]]
    # OpenID Connect Core §3.1.3.7: with several audiences, azp must name us.
    if len(audiences) > 1 and claims.get("azp") != client_id:
        raise IdTokenError("id_token has several audiences and azp is not this client", error="invalid_token")
    return claims


# ---- a TokenSource for FhirClient --------------------------------------------------------------------


class SmartTokenSource:
    """Gives FhirClient a valid access token, refreshing shortly before expiry and once after a 401."""

    def __init__(
        self,
        *,
        registration: EhrRegistration,
        config: SmartConfiguration,
        token_set: TokenSet,
        http: httpx.AsyncClient,
        on_refresh: Callable[[TokenSet], Awaitable[None]] | None = None,
        refresh_margin_seconds: float = 60,
    ) -> None:
        self.token_set = token_set
        self._registration = registration
        self._config = config
        self._http = http
        self._on_refresh = on_refresh
        self._margin = refresh_margin_seconds
        self._lock = asyncio.Lock()

    async def _refresh(self, stale_token: str) -> str:
        async with self._lock:
            # Another task may have refreshed while we waited for the lock.
            if self.token_set.access_token != stale_token:
                return self.token_set.access_token
            self.token_set = await refresh(
                registration=self._registration,
                config=self._config,
                token_set=self.token_set,
                http=self._http,
            )
            if self._on_refresh is not None:
                await self._on_refresh(self.token_set)
            return self.token_set.access_token

    async def access_token(self) -> str:
        if self.token_set.refresh_token and self.token_set.expires_within(self._margin):
            return await self._refresh(self.token_set.access_token)
        return self.token_set.access_token

    async def refreshed_token(self) -> str:
        if not self.token_set.refresh_token:
            return self.token_set.access_token  # nothing to refresh with; the retry will fail as 401
        return await self._refresh(self.token_set.access_token)
