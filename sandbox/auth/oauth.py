"""OAuth 2 / SMART logic on authlib's AuthorizationServer and grants, with joserfc for every JWT.

authlib has no server integration for Starlette, so this module adapts its framework-neutral pieces
(AuthorizationServer, the grant classes, CodeChallenge) directly: the ASGI routes read the request body
asynchronously, build a `FormOAuth2Request`, and call the synchronous authlib methods.
"""

from __future__ import annotations

import base64
import json
import secrets
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from authlib.oauth2.rfc6749 import (
    AuthorizationServer,
    ClientMixin,
    InvalidClientError,
    InvalidGrantError,
    InvalidRequestError,
    InvalidScopeError,
    OAuth2Payload,
    OAuth2Request,
    grants,
)
from authlib.oauth2.rfc7636 import CodeChallenge
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jws import extract_compact

from sandbox.auth import scopes as scope_rules
from sandbox.auth.config import FOREIGN_ISSUER, AuthServerConfig, ClientRegistration
from sandbox.auth.data import Directory
from sandbox.auth.store import (
    AccessTokenRecord,
    AuthorizationCode,
    AuthStore,
    LaunchContext,
    RefreshToken,
)
from sandbox.keys import generate_signing_key, key_set, sign_jwt

CLIENT_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
CLIENT_ASSERTION_ALGS = ("RS384", "ES384")
TOKEN_ENDPOINT_AUTH_METHODS = ["none", "client_secret_basic", "private_key_jwt"]


class FormPayload(OAuth2Payload):
    """Query and form parameters of one request, keeping repeats so authlib can refuse them."""

    def __init__(self, items: Sequence[tuple[str, str]]) -> None:
        self._datalist: defaultdict[str, list[str]] = defaultdict(list)
        for key, value in items:
            self._datalist[key].append(value)
        self._data = {key: values[0] for key, values in self._datalist.items()}

    @property
    def data(self) -> dict[str, str]:
        return self._data

    @property
    def datalist(self) -> defaultdict[str, list[str]]:
        return self._datalist


class FormOAuth2Request(OAuth2Request):
    """An authlib request built from an already-read Starlette request."""

    def __init__(
        self,
        *,
        method: str,
        uri: str,
        headers: Mapping[str, str],
        query: Sequence[tuple[str, str]],
        form: Sequence[tuple[str, str]],
    ) -> None:
        super().__init__(method=method, uri=uri, headers=headers)
        self._args = dict(query)
        self._form = dict(form)
        self.payload = FormPayload([*query, *form])
        self.smart_context: LaunchContext | None = None

    @property
    def args(self) -> dict[str, str]:
        return self._args

    @property
    def form(self) -> dict[str, str]:
        return self._form


@dataclass
class Client(ClientMixin):
    """authlib's view of a ClientRegistration."""

    registration: ClientRegistration

    @property
    def client_id(self) -> str:
        return self.registration.client_id

    def get_client_id(self) -> str:
        return self.client_id

    def get_default_redirect_uri(self) -> None:
        # SMART clients must always send redirect_uri; there is deliberately no default.
        return None

    def get_allowed_scope(self, scope: str | None) -> str | None:
        granted = scope_rules.narrow(scope_rules.split_scope(scope), self.registration.scopes)
        return " ".join(granted) if granted else None

    def check_redirect_uri(self, redirect_uri: str) -> bool:
        return redirect_uri in self.registration.redirect_uris

    def check_client_secret(self, client_secret: str) -> bool:
        secret = self.registration.secret
        return secret is not None and secrets.compare_digest(secret.encode(), client_secret.encode())

    def check_endpoint_auth_method(self, method: str, endpoint: str) -> bool:
        expected = {
            "public": "none",
            "confidential-symmetric": "client_secret_basic",
            "confidential-asymmetric": "private_key_jwt",
        }[self.registration.client_type]
        return method == expected

    def check_response_type(self, response_type: str) -> bool:
        return response_type == "code" and "authorization_code" in self.registration.allowed_grant_types

    def check_grant_type(self, grant_type: str) -> bool:
        return grant_type in self.registration.allowed_grant_types


class S256Only(CodeChallenge):
    """PKCE with S256 only: `plain` gives no protection against a leaked authorization request."""

    DEFAULT_CODE_CHALLENGE_METHOD = "S256"
    SUPPORTED_CODE_CHALLENGE_METHOD: ClassVar[list[str]] = ["S256"]


class SmartAuthorizationServer(AuthorizationServer):
    """authlib AuthorizationServer with SMART launch context, JWT access tokens and id_tokens."""

    def __init__(self, *, config: AuthServerConfig, store: AuthStore, directory: Directory) -> None:
        super().__init__(scopes_supported=None)
        self.config = config
        self.store = store
        self.directory = directory
        self.clients: dict[str, ClientRegistration] = {c.client_id: c for c in config.clients}
        # A key that is not in our JWKS, for the id_token_wrong_key misbehaviour.
        self._stranger_key = generate_signing_key(kid=config.signing_key.kid)
        self.register_token_generator("default", self._generate_token)
        self.register_client_auth_method("private_key_jwt", self._authenticate_private_key_jwt)
        self.register_grant(SmartAuthorizationCodeGrant, [S256Only(required=True)])
        self.register_grant(SmartRefreshTokenGrant)
        self.register_grant(SmartClientCredentialsGrant)

    # --- authlib framework hooks -------------------------------------------------------------------
    def query_client(self, client_id: str) -> Client | None:
        registration = self.clients.get(client_id)
        return Client(registration) if registration else None

    def create_oauth2_request(self, request: OAuth2Request) -> OAuth2Request:
        # The routes build the request themselves (the body has to be read asynchronously first).
        return request

    def create_json_request(self, request: Any) -> Any:
        raise TypeError("the sandbox authorization server takes form-encoded requests only, never JSON")

    def handle_response(self, status: int, body: Any, headers: Any) -> tuple[int, Any, list[tuple[str, str]]]:
        return status, body, list(headers)

    def send_signal(self, name: str, *args: Any, **kwargs: Any) -> None:
        """No signal system in the sandbox."""

    def validate_requested_scope(self, scope: str | None) -> None:
        if not scope_rules.split_scope(scope):
            raise InvalidScopeError("No scope was requested.")

    def save_token(self, token: dict[str, Any], request: OAuth2Request) -> None:
        """Record the access token (for introspection and revocation) and any refresh token."""
        origin = _origin_code(request)
        self.store.save_access(token.pop("_access_record"), origin_code=origin)
        refresh = token.get("refresh_token")
        if refresh:
            self.store.save_refresh(
                RefreshToken(
                    token=refresh,
                    client_id=request.client.client_id,
                    scope=token["scope"],
                    context=token.pop("_context"),
                    origin_code=origin,
                    expires_at=time.time() + self.config.refresh_token_lifetime,
                )
            )
        else:
            token.pop("_context", None)

    # --- SMART additions ---------------------------------------------------------------------------
    def register_client(self, registration: ClientRegistration) -> None:
        self.clients[registration.client_id] = registration
        self.config.clients = list(self.clients.values())

    def create_launch(self, *, patient_id: str, practitioner_id: str, encounter_id: str | None = None) -> str:
        """An EHR launch context (patient, encounter, practitioner) valid for `launch_lifetime` seconds."""
        if self.directory.patient(patient_id) is None:
            raise ValueError("unknown patient id; pick one listed in the sandbox data file")
        if self.directory.practitioner(practitioner_id) is None:
            raise ValueError("unknown practitioner id; pick one listed in the sandbox data file")
        encounter = encounter_id or self.directory.first_encounter(patient_id)
        context = LaunchContext(
            patient=patient_id,
            encounter=encounter,
            fhir_user=f"Practitioner/{practitioner_id}",
            need_patient_banner=True,
        )
        return self.store.create_launch(context, lifetime=self.config.launch_lifetime)

    def effective_issuer(self) -> str:
        return FOREIGN_ISSUER if self.config.misbehave.foreign_issuer else self.config.issuer

    def access_token_lifetime(self) -> int:
        return self.config.misbehave.access_token_lifetime or self.config.access_token_lifetime

    def mint_access_token(self, claims: Mapping[str, Any]) -> str:
        """Sign access-token claims with the server key (RS256)."""
        return sign_jwt(claims, key=self.config.signing_key, alg="RS256")

    def _generate_token(
        self,
        *,
        grant_type: str,
        client: Client,
        user: _TokenSubject | None = None,
        scope: str | None = None,
        expires_in: int | None = None,
        include_refresh_token: bool = True,
    ) -> dict[str, Any]:
        now = int(time.time())
        lifetime = expires_in or self.access_token_lifetime()
        granted = scope_rules.split_scope(scope)
        jti = secrets.token_urlsafe(16)
        claims: dict[str, Any] = {
            "iss": self.config.issuer,
            "aud": self.config.fhir_base,
            "iat": now,
            "exp": now + lifetime,
            "jti": jti,
            "scope": " ".join(granted),
            "client_id": client.client_id,
            "sub": user.context.fhir_user if user else client.client_id,
        }
        context = user.context if user else None
        if context is not None:
            claims["fhirUser"] = f"{self.config.fhir_base}/{context.fhir_user}"
            if context.patient and scope_rules.has_patient_scopes(granted):
                claims["patient"] = context.patient
        token: dict[str, Any] = {
            "access_token": self.mint_access_token(claims),
            "token_type": "Bearer",
            "expires_in": lifetime,
            "scope": " ".join(granted),
        }
        wants_refresh = "offline_access" in granted or "online_access" in granted
        if include_refresh_token and wants_refresh and context is not None:
            token["refresh_token"] = secrets.token_urlsafe(32)
        if context is not None:
            if context.patient:
                token["patient"] = context.patient
            if context.encounter:
                token["encounter"] = context.encounter
            token["need_patient_banner"] = context.need_patient_banner
            token["smart_style_url"] = self.config.smart_style_url
            if "openid" in granted and user is not None and user.issue_id_token:
                token["id_token"] = self._id_token(client=client, context=context, nonce=user.nonce)
        # Carried to save_token, which removes them before the response is sent.
        token["_context"] = context
        token["_access_record"] = AccessTokenRecord(
            jti=jti,
            client_id=client.client_id,
            scope=" ".join(granted),
            expires_at=now + lifetime,
            claims=claims,
        )
        return token

    def _id_token(self, *, client: Client, context: LaunchContext, nonce: str | None) -> str:
        switches = self.config.misbehave
        now = int(time.time())
        issued = now - 7200 if switches.id_token_expired else now
        claims: dict[str, Any] = {
            "iss": self.effective_issuer(),
            "sub": context.fhir_user,
            "aud": "some-other-client" if switches.id_token_wrong_aud else client.client_id,
            "iat": issued,
            "exp": issued + self.config.id_token_lifetime,
            "auth_time": context.auth_time,
            "fhirUser": f"{self.config.fhir_base}/{context.fhir_user}",
        }
        if nonce is not None:
            claims["nonce"] = f"{nonce}-tampered" if switches.id_token_wrong_nonce else nonce
        if switches.id_token_alg_none:
            return _unsigned_jwt(claims)
        key = self._stranger_key if switches.id_token_wrong_key else self.config.signing_key
        return sign_jwt(claims, key=key, alg="RS256")

    def _authenticate_private_key_jwt(self, query_client: Any, request: OAuth2Request) -> Client | None:
        """SMART Backend Services client authentication (RS384/ES384 assertion signed by the client)."""
        form = request.form
        if form.get("client_assertion_type") != CLIENT_ASSERTION_TYPE or not form.get("client_assertion"):
            return None
        assertion = form["client_assertion"]
        try:
            header = extract_compact(assertion.encode()).headers()
            unverified = json.loads(_b64url_decode(assertion.split(".")[1]))
        except (JoseError, ValueError, IndexError) as error:
            raise InvalidClientError(description="client_assertion is not a compact JWS.") from error
        if header.get("alg") not in CLIENT_ASSERTION_ALGS:
            raise InvalidClientError(description="client_assertion alg must be RS384 or ES384.")
        client_id = unverified.get("iss")
        client = query_client(client_id) if isinstance(client_id, str) else None
        if client is None or client.registration.jwks is None:
            raise InvalidClientError(description="client_assertion iss is no registered asymmetric client.")
        if form.get("client_id") not in (None, client_id):
            raise InvalidClientError(description="client_id does not match the client_assertion iss.")
        try:
            verified = jwt.decode(
                assertion, key_set(client.registration.jwks), algorithms=CLIENT_ASSERTION_ALGS
            )
        except (JoseError, ValueError) as error:
            raise InvalidClientError(description="client_assertion signature does not verify.") from error
        self._check_assertion_claims(verified.claims, client_id)
        return client

    def _check_assertion_claims(self, claims: Mapping[str, Any], client_id: str) -> None:
        now = time.time()
        if claims.get("sub") != client_id:
            raise InvalidClientError(description="client_assertion sub must equal iss (the client_id).")
        audience = claims.get("aud")
        audiences = audience if isinstance(audience, list) else [audience]
        if self.config.token_endpoint not in audiences:
            raise InvalidClientError(description="client_assertion aud must be the token endpoint URL.")
        exp = claims.get("exp")
        if not isinstance(exp, int | float) or exp <= now:
            raise InvalidClientError(description="client_assertion is expired or has no exp.")
        if exp > now + self.config.client_assertion_max_lifetime + 5:  # 5 s of clock skew
            raise InvalidClientError(description="client_assertion exp is more than 5 minutes ahead.")
        jti = claims.get("jti")
        if not isinstance(jti, str) or not jti:
            raise InvalidClientError(description="client_assertion needs a jti.")
        if not self.store.use_assertion_jti(f"{client_id} {jti}", expires_at=float(exp)):
            raise InvalidClientError(description="client_assertion jti was already used.")


@dataclass(frozen=True)
class _TokenSubject:
    """The `user` authlib hands to the token generator: launch context plus id_token inputs."""

    context: LaunchContext
    nonce: str | None
    issue_id_token: bool


def _origin_code(request: OAuth2Request) -> str | None:
    if request.authorization_code is not None:
        return str(request.authorization_code.code)
    if request.refresh_token is not None:
        return request.refresh_token.origin_code
    return None


def _b64url_decode(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unsigned_jwt(claims: Mapping[str, Any]) -> str:
    header = _b64url(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    return f"{header}.{_b64url(json.dumps(dict(claims)).encode())}."


class SmartAuthorizationCodeGrant(grants.AuthorizationCodeGrant):
    """Authorization code grant with SMART checks (aud, PKCE S256 required, launch context)."""

    TOKEN_ENDPOINT_AUTH_METHODS = TOKEN_ENDPOINT_AUTH_METHODS
    server: SmartAuthorizationServer
    request: FormOAuth2Request

    def validate_authorization_request(self) -> str:
        redirect_uri: str = super().validate_authorization_request()
        data = self.request.payload.data
        try:
            self._check_smart_parameters(data)
        except (InvalidRequestError, InvalidScopeError) as error:
            error.redirect_uri = redirect_uri
            raise
        return redirect_uri

    def _check_smart_parameters(self, data: Mapping[str, str]) -> None:
        config = self.server.config
        if data.get("aud") != config.fhir_base:
            raise InvalidRequestError("aud must be the FHIR base URL of this EHR exactly.")
        if not data.get("code_challenge"):
            raise InvalidRequestError("code_challenge is required (PKCE S256).")
        if data.get("code_challenge_method") != "S256":
            raise InvalidRequestError("code_challenge_method must be S256.")
        requested = scope_rules.split_scope(self.request.scope)
        dropped = config.misbehave.grant_fewer_scopes
        if dropped:
            self.request.scope = " ".join(s for s in requested if s not in dropped)
        self.request.smart_context = self._resolve_context(data, requested)

    def _resolve_context(self, data: Mapping[str, str], requested: list[str]) -> LaunchContext | None:
        """EHR launch, standalone patient pick, or plain user login; None = the patient picker is needed."""
        directory = self.server.directory
        launch_id = data.get("launch")
        if launch_id:
            if "launch" not in requested:
                raise InvalidScopeError("An EHR launch needs the 'launch' scope.")
            context = self.server.store.get_launch(launch_id)
            if context is None:
                raise InvalidRequestError("launch is unknown or expired.")
            return context
        hint = data.get("selected_patient") or data.get("login_hint") or ""
        if "launch/patient" in requested:
            if not hint:
                return None
            patient_id = hint.removeprefix("Patient/")
            if directory.patient(patient_id) is None:
                raise InvalidRequestError("The selected patient does not exist in this EHR.")
            return LaunchContext(
                patient=patient_id,
                encounter=None,
                fhir_user=f"Patient/{patient_id}",
                need_patient_banner=False,
            )
        # No patient context (e.g. an OIDC login of a compliance officer): the user is a practitioner.
        practitioner_id = hint.removeprefix("Practitioner/") if hint else ""
        if practitioner_id and directory.practitioner(practitioner_id) is None:
            raise InvalidRequestError("login_hint names no practitioner of this EHR.")
        if not practitioner_id:
            if not directory.practitioners:
                raise InvalidRequestError("This EHR has no practitioners to log in as.")
            practitioner_id = directory.practitioners[0].id
        return LaunchContext(
            patient=None,
            encounter=None,
            fhir_user=f"Practitioner/{practitioner_id}",
            need_patient_banner=False,
        )

    def save_authorization_code(self, code: str, request: OAuth2Request) -> None:
        data = request.payload.data
        self.server.store.save_code(
            AuthorizationCode(
                code=code,
                client_id=request.client.client_id,
                redirect_uri=data["redirect_uri"],
                scope=request.scope,
                code_challenge=data.get("code_challenge"),
                code_challenge_method=data.get("code_challenge_method"),
                nonce=data.get("nonce"),
                context=request.user,
                expires_at=time.time() + self.server.config.code_lifetime,
            )
        )

    def query_authorization_code(self, code: str, client: Client) -> AuthorizationCode | None:
        store = self.server.store
        stored = store.get_code(code)
        if stored is None or stored.client_id != client.client_id or time.time() >= stored.expires_at:
            return None
        if stored.used and not self.server.config.misbehave.allow_code_reuse:
            store.revoke_from_code(stored)
            raise InvalidGrantError("Authorization code was already used; tokens issued from it are revoked.")
        return stored

    def delete_authorization_code(self, authorization_code: AuthorizationCode) -> None:
        # Kept (marked used) rather than deleted, so a replay can be recognised and its tokens revoked.
        self.server.store.mark_code_used(authorization_code)

    def authenticate_user(self, authorization_code: AuthorizationCode) -> _TokenSubject:
        return _TokenSubject(authorization_code.context, authorization_code.nonce, issue_id_token=True)


class SmartRefreshTokenGrant(grants.RefreshTokenGrant):
    """Refresh with optional rotation (misbehaviour switch `rotate_refresh_tokens`)."""

    TOKEN_ENDPOINT_AUTH_METHODS = TOKEN_ENDPOINT_AUTH_METHODS
    server: SmartAuthorizationServer

    def authenticate_refresh_token(self, refresh_token: str) -> RefreshToken | None:
        stored = self.server.store.get_refresh(refresh_token)
        if stored is None or stored.is_revoked() or stored.is_expired():
            return None
        return stored

    def authenticate_user(self, refresh_token: RefreshToken) -> _TokenSubject:
        # No id_token on refresh: there is no nonce to bind it to.
        return _TokenSubject(refresh_token.context, None, issue_id_token=False)

    def issue_token(self, user: _TokenSubject, refresh_token: RefreshToken) -> dict[str, Any]:
        scope = self.request.payload.scope or refresh_token.get_scope()
        rotate = bool(self.server.config.misbehave.rotate_refresh_tokens)
        return self.generate_token(user=user, scope=scope, include_refresh_token=rotate)

    def revoke_old_credential(self, refresh_token: RefreshToken) -> None:
        if self.server.config.misbehave.rotate_refresh_tokens:
            self.server.store.revoke_refresh(refresh_token)


class SmartClientCredentialsGrant(grants.ClientCredentialsGrant):
    """SMART Backend Services: client_credentials with a private_key_jwt client assertion only."""

    TOKEN_ENDPOINT_AUTH_METHODS: ClassVar[list[str]] = ["private_key_jwt"]
    server: SmartAuthorizationServer

    def validate_token_request(self) -> None:
        super().validate_token_request()
        granted = self.request.client.get_allowed_scope(self.request.payload.scope)
        if not granted:
            raise InvalidScopeError("None of the requested scopes is allowed for this client.")
        self.request.scope = granted

    def create_token_response(self) -> tuple[int, dict[str, Any], Any]:
        token = self.generate_token(scope=self.request.scope, include_refresh_token=False)
        self.save_token(token)
        return 200, token, self.TOKEN_RESPONSE_HEADER
