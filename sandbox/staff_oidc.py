"""The sandbox's staff OpenID Provider (authlib): pick a staff user, code + PKCE, RS256 id_tokens.

It stands in for a hospital's identity provider (Entra ID, Okta, Keycloak): compliance officers sign in to
CareCanvas's console here, with a `groups` claim saying which roles they hold. It has its own signing key and
issuer (`{auth server}/staff`), so nothing the SMART server issues is valid here and the reverse.
"""

from __future__ import annotations

import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

from authlib.oauth2.rfc6749 import (
    AuthorizationServer,
    InvalidRequestError,
    InvalidScopeError,
    OAuth2Error,
    OAuth2Request,
    grants,
)
from joserfc.jwk import RSAKey
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from sandbox.auth import scopes as scope_rules
from sandbox.auth.config import ClientRegistration
from sandbox.auth.oauth import Client, FormOAuth2Request, S256Only, _unsigned_jwt
from sandbox.keys import generate_signing_key, public_jwks, sign_jwt

STAFF_PATH = "/staff"
STAFF_CLIENT_ID = "carecanvas-staff"
STAFF_CONFIDENTIAL_CLIENT_ID = "carecanvas-staff-confidential"
COMPLIANCE_GROUP = "carecanvas-compliance"
PORTRAIT_ARTIST_GROUP = "portrait-artists"
STAFF_SCOPES: tuple[str, ...] = ("openid", "profile", "email", "groups")
# Where the service takes the staff sign-in back (next to its launch URL, like the SMART callback).
STAFF_CALLBACK_PATH = "/compliance/callback"
_NO_STORE = {"Cache-Control": "no-store"}


@dataclass(frozen=True)
class StaffUser:
    """One member of staff the sandbox knows; `groups` is what the id_token's `groups` claim carries."""

    sub: str
    name: str
    email: str
    groups: tuple[str, ...]

    def claims(self, scopes: list[str]) -> dict[str, Any]:
        """The user's claims that the granted scopes release (OIDC Core §5.4)."""
        claims: dict[str, Any] = {"sub": self.sub}
        if "profile" in scopes:
            claims["name"] = self.name
        if "email" in scopes:
            claims["email"] = self.email
        if "groups" in scopes:
            claims["groups"] = list(self.groups)
        return claims


DEFAULT_STAFF_USERS: tuple[StaffUser, ...] = (
    StaffUser(
        "staff-olivia", "Olivia Okafor-Test", "olivia.okafor@sandbox.invalid", (COMPLIANCE_GROUP, "staff")
    ),
    StaffUser("staff-marcus", "Dr. Marcus Lee-Test", "marcus.lee@sandbox.invalid", ("clinicians", "staff")),
    # A portrait artist: CareCanvas's reviewer role when staff_oidc.reviewer_roles maps this group.
    StaffUser(
        "staff-rosa", "Rosa Alvarez-Test", "rosa.alvarez@sandbox.invalid", (PORTRAIT_ARTIST_GROUP, "staff")
    ),
)


@dataclass
class StaffMisbehaviour:
    """Switches that make the id_tokens wrong in one specific way each (for the service's tests)."""

    id_token_wrong_nonce: bool = False
    id_token_expired: bool = False
    id_token_wrong_aud: bool = False
    id_token_wrong_issuer: bool = False
    id_token_wrong_key: bool = False
    id_token_alg_none: bool = False

    def reset(self) -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, False)


@dataclass
class StaffOidcConfig:
    """The provider's issuer, its clients and users, its key and lifetimes."""

    issuer: str
    clients: list[ClientRegistration] = field(default_factory=list)
    users: tuple[StaffUser, ...] = DEFAULT_STAFF_USERS
    signing_key: RSAKey = field(default_factory=generate_signing_key)
    id_token_lifetime: int = 600
    access_token_lifetime: int = 600
    code_lifetime: int = 120
    misbehave: StaffMisbehaviour = field(default_factory=StaffMisbehaviour)

    def __post_init__(self) -> None:
        self.issuer = self.issuer.rstrip("/")

    @property
    def authorization_endpoint(self) -> str:
        return f"{self.issuer}/authorize"

    @property
    def token_endpoint(self) -> str:
        return f"{self.issuer}/token"

    @property
    def jwks_uri(self) -> str:
        return f"{self.issuer}/jwks.json"

    @property
    def userinfo_endpoint(self) -> str:
        return f"{self.issuer}/userinfo"

    def user(self, sub: str) -> StaffUser | None:
        return next((user for user in self.users if user.sub == sub), None)


def staff_clients(redirect_uris: list[str], *, secret: str | None = None) -> list[ClientRegistration]:
    """The service's staff clients: a public PKCE one and a confidential (client_secret_basic) one."""
    public = ClientRegistration(
        STAFF_CLIENT_ID, client_type="public", redirect_uris=list(redirect_uris), scopes=list(STAFF_SCOPES)
    )
    confidential = ClientRegistration(
        STAFF_CONFIDENTIAL_CLIENT_ID,
        client_type="confidential-symmetric",
        redirect_uris=list(redirect_uris),
        scopes=list(STAFF_SCOPES),
        secret=secret or secrets.token_urlsafe(24),
        grant_types=["authorization_code"],
    )
    return [public, confidential]


def openid_configuration(config: StaffOidcConfig) -> dict[str, Any]:
    """OpenID Provider metadata (OpenID Connect Discovery 1.0 §3)."""
    return {
        "issuer": config.issuer,
        "authorization_endpoint": config.authorization_endpoint,
        "token_endpoint": config.token_endpoint,
        "jwks_uri": config.jwks_uri,
        "userinfo_endpoint": config.userinfo_endpoint,
        "response_types_supported": ["code"],
        "grant_types_supported": ["authorization_code"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": ["RS256"],
        "scopes_supported": list(STAFF_SCOPES),
        "claims_supported": [
            "iss",
            "sub",
            "aud",
            "exp",
            "iat",
            "auth_time",
            "nonce",
            "name",
            "email",
            "groups",
        ],
        "code_challenge_methods_supported": ["S256"],
        "token_endpoint_auth_methods_supported": ["none", "client_secret_basic"],
    }


@dataclass
class StaffCode:
    """An issued authorization code (authlib's AuthorizationCodeMixin)."""

    code: str
    client_id: str
    redirect_uri: str
    scope: str
    code_challenge: str | None
    code_challenge_method: str | None
    nonce: str | None
    user: StaffUser
    auth_time: int
    expires_at: float
    used: bool = False

    def get_redirect_uri(self) -> str:
        return self.redirect_uri

    def get_scope(self) -> str:
        return self.scope


@dataclass(frozen=True)
class StaffAccessToken:
    user: StaffUser
    scope: str
    expires_at: float


class StaffStore:
    """Codes and access tokens, thread-safe (tests read it from another thread than the server's)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._codes: dict[str, StaffCode] = {}
        self._tokens: dict[str, StaffAccessToken] = {}

    def save_code(self, code: StaffCode) -> None:
        with self._lock:
            self._codes[code.code] = code

    def get_code(self, code: str) -> StaffCode | None:
        with self._lock:
            return self._codes.get(code)

    def spend_code(self, code: StaffCode) -> None:
        with self._lock:
            code.used = True

    def save_token(self, token: str, record: StaffAccessToken) -> None:
        with self._lock:
            self._tokens[token] = record

    def get_token(self, token: str) -> StaffAccessToken | None:
        with self._lock:
            record = self._tokens.get(token)
        if record is None or time.time() >= record.expires_at:
            return None
        return record


@dataclass(frozen=True)
class _Subject:
    """What authlib hands the token generator: the user, and the code's nonce and sign-in time."""

    user: StaffUser
    nonce: str | None
    auth_time: int


class StaffOpenIDProvider(AuthorizationServer):
    """authlib AuthorizationServer issuing opaque access tokens and RS256 id_tokens for staff users."""

    def __init__(self, config: StaffOidcConfig) -> None:
        super().__init__(scopes_supported=list(STAFF_SCOPES))
        self.config = config
        self.store = StaffStore()
        self.clients: dict[str, ClientRegistration] = {c.client_id: c for c in config.clients}
        # Same kid as the real key but not in the JWKS, for the id_token_wrong_key switch.
        self._stranger_key = generate_signing_key(kid=config.signing_key.kid)
        self.register_token_generator("default", self._generate_token)
        self.register_grant(StaffCodeGrant, [S256Only(required=True)])

    # --- authlib framework hooks -------------------------------------------------------------------
    def query_client(self, client_id: str) -> Client | None:
        registration = self.clients.get(client_id)
        return Client(registration) if registration else None

    def create_oauth2_request(self, request: OAuth2Request) -> OAuth2Request:
        return request

    def create_json_request(self, request: Any) -> Any:
        raise TypeError("the sandbox staff provider takes form-encoded requests only, never JSON")

    def handle_response(self, status: int, body: Any, headers: Any) -> tuple[int, Any, list[tuple[str, str]]]:
        return status, body, list(headers)

    def send_signal(self, name: str, *args: Any, **kwargs: Any) -> None:
        """No signal system in the sandbox."""

    def validate_requested_scope(self, scope: str | None) -> None:
        if "openid" not in scope_rules.split_scope(scope):
            raise InvalidScopeError("A staff sign-in needs the 'openid' scope.")

    def save_token(self, token: dict[str, Any], request: OAuth2Request) -> None:
        subject: _Subject = token.pop("_subject")
        record = StaffAccessToken(subject.user, token["scope"], time.time() + int(token["expires_in"]))
        self.store.save_token(token["access_token"], record)

    # --- tokens ------------------------------------------------------------------------------------
    def _generate_token(
        self,
        *,
        grant_type: str,
        client: Client,
        user: _Subject | None = None,
        scope: str | None = None,
        expires_in: int | None = None,
        include_refresh_token: bool = True,
    ) -> dict[str, Any]:
        if user is None:  # only the authorization code grant is registered, which always has a user
            raise InvalidRequestError("This provider issues tokens to signed-in staff only.")
        granted = scope_rules.split_scope(scope)
        return {
            "access_token": secrets.token_urlsafe(32),
            "token_type": "Bearer",
            "expires_in": self.config.access_token_lifetime,
            "scope": " ".join(granted),
            "id_token": self.id_token(client_id=client.client_id, subject=user, scopes=granted),
            "_subject": user,
        }

    def id_token(self, *, client_id: str, subject: _Subject, scopes: list[str]) -> str:
        switches = self.config.misbehave
        issued = int(time.time()) - (7200 if switches.id_token_expired else 0)
        claims: dict[str, Any] = {
            **subject.user.claims(scopes),
            "iss": "https://foreign-idp.invalid" if switches.id_token_wrong_issuer else self.config.issuer,
            "aud": "some-other-client" if switches.id_token_wrong_aud else client_id,
            "iat": issued,
            "exp": issued + self.config.id_token_lifetime,
            "auth_time": subject.auth_time,
        }
        if subject.nonce is not None:
            claims["nonce"] = f"{subject.nonce}-tampered" if switches.id_token_wrong_nonce else subject.nonce
        if switches.id_token_alg_none:
            return _unsigned_jwt(claims)
        key = self._stranger_key if switches.id_token_wrong_key else self.config.signing_key
        return sign_jwt(claims, key=key, alg="RS256")

    def userinfo(self, bearer: str) -> dict[str, Any] | None:
        """The claims for an access token (None when unknown or expired)."""
        record = self.store.get_token(bearer)
        if record is None:
            return None
        return record.user.claims(scope_rules.split_scope(record.scope))


class StaffCodeGrant(grants.AuthorizationCodeGrant):
    """Authorization code grant: PKCE S256 required, the staff user picked on the login page."""

    TOKEN_ENDPOINT_AUTH_METHODS: ClassVar[list[str]] = ["none", "client_secret_basic"]
    server: StaffOpenIDProvider
    request: FormOAuth2Request

    def validate_authorization_request(self) -> str:
        redirect_uri: str = super().validate_authorization_request()
        data = self.request.payload.data
        try:
            if not data.get("code_challenge") or data.get("code_challenge_method") != "S256":
                raise InvalidRequestError("PKCE is required: send code_challenge with method S256.")
        except InvalidRequestError as error:
            error.redirect_uri = redirect_uri
            raise
        return redirect_uri

    def save_authorization_code(self, code: str, request: OAuth2Request) -> None:
        data = request.payload.data
        self.server.store.save_code(
            StaffCode(
                code=code,
                client_id=request.client.client_id,
                redirect_uri=data["redirect_uri"],
                scope=request.scope,
                code_challenge=data.get("code_challenge"),
                code_challenge_method=data.get("code_challenge_method"),
                nonce=data.get("nonce"),
                user=request.user,
                auth_time=int(time.time()),
                expires_at=time.time() + self.server.config.code_lifetime,
            )
        )

    def query_authorization_code(self, code: str, client: Client) -> StaffCode | None:
        stored = self.server.store.get_code(code)
        if stored is None or stored.used or stored.client_id != client.client_id:
            return None
        return stored if time.time() < stored.expires_at else None

    def delete_authorization_code(self, authorization_code: StaffCode) -> None:
        self.server.store.spend_code(authorization_code)

    def authenticate_user(self, authorization_code: StaffCode) -> _Subject:
        return _Subject(authorization_code.user, authorization_code.nonce, authorization_code.auth_time)


def staff_routes(provider: StaffOpenIDProvider, templates: Any) -> list[Route]:
    """Discovery, JWKS, the login page (GET/POST /authorize), token and userinfo, relative to the issuer."""
    config = provider.config

    async def discovery(request: Request) -> Response:
        return JSONResponse(openid_configuration(config), headers={"Cache-Control": "no-cache"})

    async def jwks(request: Request) -> Response:
        return JSONResponse(public_jwks(config.signing_key), headers={"Cache-Control": "no-cache"})

    async def authorize(request: Request) -> Response:
        oauth_request = await _form_request(request)
        try:
            grant = provider.get_consent_grant(oauth_request)
        except OAuth2Error as error:
            return _authorize_error(request, provider, oauth_request, error, templates)
        chosen = config.user(oauth_request.payload.data.get("selected_user", ""))
        if chosen is None or request.method != "POST":
            return _login_page(request, provider, oauth_request, templates)
        _status, _body, headers = provider.create_authorization_response(
            request=oauth_request, grant_user=chosen, grant=grant
        )
        return RedirectResponse(dict(headers)["Location"], status_code=302, headers=_NO_STORE)

    async def token(request: Request) -> Response:
        status, body, headers = provider.create_token_response(await _form_request(request))
        return JSONResponse(body, status_code=status, headers=dict(headers))

    async def userinfo(request: Request) -> Response:
        scheme, _, bearer = request.headers.get("authorization", "").partition(" ")
        claims = provider.userinfo(bearer.strip()) if scheme.lower() == "bearer" else None
        if claims is None:
            challenge = {"WWW-Authenticate": 'Bearer error="invalid_token"', **_NO_STORE}
            return JSONResponse({"error": "invalid_token"}, status_code=401, headers=challenge)
        return JSONResponse(claims, headers=_NO_STORE)

    return [
        Route("/.well-known/openid-configuration", discovery),
        Route("/jwks.json", jwks),
        Route("/authorize", authorize, methods=["GET", "POST"]),
        Route("/token", token, methods=["POST"]),
        Route("/userinfo", userinfo, methods=["GET", "POST"]),
    ]


async def _form_request(request: Request) -> FormOAuth2Request:
    form_items: list[tuple[str, str]] = []
    if request.method == "POST":
        form = await request.form()
        form_items = [(key, value) for key, value in form.multi_items() if isinstance(value, str)]
    return FormOAuth2Request(
        method=request.method,
        uri=str(request.url),
        headers=request.headers,
        query=list(request.query_params.multi_items()),
        form=form_items,
    )


def _login_page(
    request: Request, provider: StaffOpenIDProvider, oauth_request: FormOAuth2Request, templates: Any
) -> Response:
    params = [(key, value) for key, values in oauth_request.payload.datalist.items() for value in values]
    context = {
        "users": provider.config.users,
        "params": [(key, value) for key, value in params if key != "selected_user"],
        "authorize_action": provider.config.authorization_endpoint,
        "client_id": oauth_request.payload.data.get("client_id", ""),
    }
    response: Response = templates.TemplateResponse(request, "staff_login.html", context, headers=_NO_STORE)
    return response


def _authorize_error(
    request: Request,
    provider: StaffOpenIDProvider,
    oauth_request: FormOAuth2Request,
    error: OAuth2Error,
    templates: Any,
) -> Response:
    if error.redirect_uri:
        error.state = oauth_request.payload.state
        _status, _body, headers = provider.handle_error_response(oauth_request, error)
        return RedirectResponse(dict(headers)["Location"], status_code=302, headers=_NO_STORE)
    # Unknown client or redirect URI: never redirect to an unverified address (RFC 6749 §4.1.2.1).
    context = {"error": error.error, "description": error.description}
    response: Response = templates.TemplateResponse(request, "error.html", context, status_code=400)
    return response
