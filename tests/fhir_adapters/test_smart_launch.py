"""SMART client against a real loopback authorization server: discovery, PKCE, token exchange, id_token."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from fhir_test_servers import Reply, Request, ScriptedServer
from joserfc import jwt
from joserfc.errors import BadSignatureError
from joserfc.jwk import ECKey, KeySet, OctKey, RSAKey

from fhir_adapters import (
    DiscoveryError,
    EhrRegistration,
    FhirClient,
    GrantedScopes,
    IdTokenError,
    SmartConfiguration,
    SmartTokenSource,
    StateError,
    TokenError,
    TokenSet,
    backend_services_token,
    begin_authorization,
    check_state,
    discover,
    exchange_code,
    refresh,
    verify_id_token,
)
from fhir_adapters.pkce import code_challenge_s256, new_code_verifier, new_state

ISSUER_KEY = RSAKey.generate_key(2048, parameters={"kid": "issuer-1"}, private=True)
OTHER_KEY = RSAKey.generate_key(2048, parameters={"kid": "issuer-1"}, private=True)
CLIENT_RSA_KEY = RSAKey.generate_key(2048, parameters={"kid": "client-rsa"}, private=True)
CLIENT_EC_KEY = ECKey.generate_key("P-384", parameters={"kid": "client-ec"}, private=True)


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient() as client:
        yield client


def registration(server: ScriptedServer, **overrides: Any) -> EhrRegistration:
    values: dict[str, Any] = {
        "name": "test-ehr",
        "iss": f"{server.url}/fhir",
        "client_id": "carecanvas",
        "client_auth": "public",
        "redirect_uri": "http://127.0.0.1:9/callback",
    }
    values.update(overrides)
    return EhrRegistration(**values)


def smart_document(server: ScriptedServer, **overrides: Any) -> dict[str, Any]:
    doc = {
        "issuer": f"{server.url}/auth",
        "authorization_endpoint": f"{server.url}/auth/authorize",
        "token_endpoint": f"{server.url}/auth/token",
        "jwks_uri": f"{server.url}/auth/jwks",
        "code_challenge_methods_supported": ["S256"],
        "capabilities": ["launch-ehr", "permission-v2", "sso-openid-connect"],
    }
    doc.update(overrides)
    return doc


def id_token(server: ScriptedServer, *, key: RSAKey = ISSUER_KEY, alg: str = "RS256", **claims: Any) -> str:
    now = int(time.time())
    payload = {
        "iss": f"{server.url}/auth",
        "aud": "carecanvas",
        "sub": "prac-1",
        "iat": now,
        "exp": now + 300,
        "nonce": "n-1",
        "fhirUser": "Practitioner/prac-1",
    }
    payload.update(claims)
    return jwt.encode({"alg": alg, "kid": key.kid}, payload, key, algorithms=[alg])


class AuthServer:
    """Scripted authorization server: discovery, JWKS, and a token endpoint that records the forms."""

    def __init__(self, server: ScriptedServer) -> None:
        self.server = server
        self.document = smart_document(server)
        self.token_reply: Reply = Reply(
            body={
                "access_token": "at-1",
                "token_type": "Bearer",
                "expires_in": 3600,
                "scope": "launch openid",
            },
            content_type="application/json",
        )
        self.forms: list[dict[str, list[str]]] = []
        server.handle = self

    def __call__(self, request: Request) -> Reply:
        path = urlsplit(request.path).path
        if path == "/fhir/.well-known/smart-configuration":
            return Reply(body=self.document, content_type="application/json")
        if path == "/auth/jwks":
            return Reply(body={"keys": [ISSUER_KEY.as_dict(private=False)]}, content_type="application/json")
        if path == "/auth/token":
            self.forms.append(parse_qs(request.body.decode()))
            return self.token_reply
        return Reply(404)

    def config(self) -> SmartConfiguration:
        return SmartConfiguration(
            fhir_base=f"{self.server.url}/fhir",
            issuer=self.document["issuer"],
            authorization_endpoint=self.document["authorization_endpoint"],
            token_endpoint=self.document["token_endpoint"],
            jwks_uri=self.document["jwks_uri"],
            capabilities=tuple(self.document["capabilities"]),
            code_challenge_methods_supported=("S256",),
        )


# ---- PKCE, state -------------------------------------------------------------------------------------


def test_pkce_s256_matches_rfc7636_appendix_b() -> None:
    verifier = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"
    assert code_challenge_s256(verifier) == "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"


def test_verifier_and_state_are_long_random_and_url_safe() -> None:
    states = {new_state() for _ in range(200)}
    assert len(states) == 200
    for value in [*states, new_code_verifier()]:
        assert len(value) == 43  # 256 bits in unpadded base64url
        assert set(value) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
        assert len(base64.urlsafe_b64decode(value + "=")) == 32
    with pytest.raises(ValueError, match="43 to 128"):
        code_challenge_s256("short")


async def test_begin_authorization_builds_a_complete_request(server: ScriptedServer) -> None:
    auth = AuthServer(server)
    reg = registration(server)
    pending = begin_authorization(
        registration=reg,
        config=auth.config(),
        redirect_uri=reg.redirect_uri,
        launch="launch-123",
        scopes=("launch", "openid", "fhirUser", "patient/Condition.rs"),
    )
    parts = urlsplit(pending.url)
    assert f"{parts.scheme}://{parts.netloc}{parts.path}" == auth.document["authorization_endpoint"]
    query = {k: v[0] for k, v in parse_qs(parts.query).items()}
    assert query == {
        "response_type": "code",
        "client_id": "carecanvas",
        "redirect_uri": reg.redirect_uri,
        "scope": "launch openid fhirUser patient/Condition.rs",
        "state": pending.state,
        "aud": reg.iss,
        "code_challenge": code_challenge_s256(pending.code_verifier),
        "code_challenge_method": "S256",
        "nonce": pending.nonce,
        "launch": "launch-123",
    }
    assert pending.state not in repr(pending)
    assert type(pending).from_dict(pending.to_dict()) == pending


async def test_check_state(server: ScriptedServer) -> None:
    auth = AuthServer(server)
    reg = registration(server)
    pending = begin_authorization(
        registration=reg, config=auth.config(), redirect_uri=reg.redirect_uri, launch=None, scopes=("openid",)
    )
    check_state(pending, pending.state)
    with pytest.raises(StateError, match="does not match"):
        check_state(pending, pending.state[:-1] + ("A" if pending.state[-1] != "A" else "B"))
    with pytest.raises(StateError, match="does not match"):
        check_state(pending, None)
    with pytest.raises(StateError, match="expired"):
        check_state(pending, pending.state, now=pending.created_at + timedelta(minutes=11))


# ---- discovery -----------------------------------------------------------------------------------------


async def test_discover_reads_and_checks_the_configuration(
    server: ScriptedServer, http: httpx.AsyncClient
) -> None:
    AuthServer(server)
    config = await discover(f"{server.url}/fhir", http=http, registration=registration(server))
    assert config.token_endpoint == f"{server.url}/auth/token"
    assert config.issuer == f"{server.url}/auth"
    assert "permission-v2" in config.capabilities


@pytest.mark.parametrize(
    "field",
    ["authorization_endpoint", "token_endpoint", "jwks_uri", "issuer"],
)
async def test_discover_refuses_foreign_origins(
    server: ScriptedServer, http: httpx.AsyncClient, field: str
) -> None:
    auth = AuthServer(server)
    # The same machine under another host name is another origin.
    auth.document[field] = f"http://localhost:{server.port}/auth/x"
    with pytest.raises(DiscoveryError, match=field):
        await discover(f"{server.url}/fhir", http=http, registration=registration(server))


async def test_discover_accepts_configured_auth_origin(
    server: ScriptedServer, http: httpx.AsyncClient
) -> None:
    auth = AuthServer(server)
    auth.document["token_endpoint"] = "https://auth.example.org/token"
    config = await discover(
        f"{server.url}/fhir",
        http=http,
        registration=registration(server, auth_origins=("https://auth.example.org",)),
    )
    assert config.token_endpoint == "https://auth.example.org/token"
    for lookalike in ("https://auth.example.org.evil.example/token", "https://auth.example.org:8443/token"):
        auth.document["token_endpoint"] = lookalike
        with pytest.raises(DiscoveryError, match="token_endpoint"):
            await discover(
                f"{server.url}/fhir",
                http=http,
                registration=registration(server, auth_origins=("https://auth.example.org",)),
            )
    auth.document["token_endpoint"] = f"{server.url}:99999/token"
    with pytest.raises(DiscoveryError, match="token_endpoint is not a usable URL"):
        await discover(f"{server.url}/fhir", http=http)


async def test_discover_refuses_plain_http_off_loopback(
    server: ScriptedServer, http: httpx.AsyncClient
) -> None:
    auth = AuthServer(server)
    auth.document["token_endpoint"] = "http://auth.example.org/token"
    with pytest.raises(DiscoveryError, match="https"):
        await discover(
            f"{server.url}/fhir",
            http=http,
            registration=registration(server, auth_origins=("http://auth.example.org",)),
        )


async def test_discover_requires_s256(server: ScriptedServer, http: httpx.AsyncClient) -> None:
    auth = AuthServer(server)
    auth.document["code_challenge_methods_supported"] = ["plain"]
    with pytest.raises(DiscoveryError, match="S256"):
        await discover(f"{server.url}/fhir", http=http)


async def test_discover_refuses_redirects_and_errors(server: ScriptedServer, http: httpx.AsyncClient) -> None:
    server.handle = lambda r: Reply(301, headers={"Location": "https://evil.example/"})
    with pytest.raises(DiscoveryError, match="redirect"):
        await discover(f"{server.url}/fhir", http=http)
    server.handle = lambda r: Reply(503, body={"error": "x"}, content_type="application/json")
    with pytest.raises(DiscoveryError, match="503") as caught:
        await discover(f"{server.url}/fhir", http=http)
    assert caught.value.temporary
    server.handle = lambda r: Reply(200, body=b"<html/>", content_type="text/html")
    with pytest.raises(DiscoveryError, match="not a JSON object"):
        await discover(f"{server.url}/fhir", http=http)


async def test_discover_iss_must_match_registration(server: ScriptedServer, http: httpx.AsyncClient) -> None:
    AuthServer(server)
    with pytest.raises(DiscoveryError, match="exactly"):
        await discover(f"{server.url}/fhir/", http=http, registration=registration(server))
    assert server.requests == []


# ---- token endpoint --------------------------------------------------------------------------------------


async def pending_for(auth: AuthServer, reg: EhrRegistration, scopes: tuple[str, ...] = ("launch", "openid")):
    return begin_authorization(
        registration=reg, config=auth.config(), redirect_uri=reg.redirect_uri, launch="l", scopes=scopes
    )


async def test_exchange_code_public_client(server: ScriptedServer, http: httpx.AsyncClient) -> None:
    auth = AuthServer(server)
    reg = registration(server)
    pending = await pending_for(auth, reg)
    auth.token_reply = Reply(
        body={
            "access_token": "access-xyz",
            "token_type": "bearer",
            "expires_in": 600,
            "refresh_token": "rt-1",
            "scope": "launch openid patient/Condition.rs",
            "patient": "pat-1",
            "encounter": "enc-1",
            "need_patient_banner": False,
            "smart_style_url": f"{server.url}/style.json",
            "id_token": id_token(server, nonce=pending.nonce),
            "tenant": "t-1",
        },
        content_type="application/json",
    )
    tokens = await exchange_code(
        registration=reg, config=auth.config(), code="code-1", pending=pending, http=http
    )
    form = auth.forms[0]
    assert form == {
        "grant_type": ["authorization_code"],
        "code": ["code-1"],
        "redirect_uri": [reg.redirect_uri],
        "code_verifier": [pending.code_verifier],
        "client_id": ["carecanvas"],
    }
    assert tokens.access_token == "access-xyz"
    assert tokens.refresh_token == "rt-1"
    assert (tokens.patient, tokens.encounter) == ("pat-1", "enc-1")
    assert tokens.need_patient_banner is False
    assert tokens.fhir_user == "Practitioner/prac-1"
    assert tokens.scopes.allows("Condition", "search")
    assert not tokens.scopes.allows("Condition", "create")
    assert tokens.extras == {"tenant": "t-1"}
    assert timedelta(seconds=590) < tokens.expires_at - datetime.now(UTC) <= timedelta(seconds=600)
    for secret in ("access-xyz", "rt-1", "pat-1", "Practitioner/prac-1"):
        assert secret not in repr(tokens)
    assert TokenSet.from_dict(json.loads(json.dumps(tokens.to_dict()))) == tokens


async def test_exchange_code_client_secret_basic(server: ScriptedServer, http: httpx.AsyncClient) -> None:
    auth = AuthServer(server)
    reg = registration(server, client_auth="client_secret_basic", client_secret="s3cr&t:x")
    await exchange_code(
        registration=reg, config=auth.config(), code="c", pending=await pending_for(auth, reg), http=http
    )
    token_request = next(r for r in server.requests if r.path == "/auth/token")
    scheme, _, value = token_request.headers["authorization"].partition(" ")
    assert scheme == "Basic"
    assert base64.b64decode(value).decode() == "carecanvas:s3cr%26t%3Ax"
    assert "client_id" not in auth.forms[0]
    assert "s3cr" not in repr(reg)


@pytest.mark.parametrize(("key", "alg"), [(CLIENT_RSA_KEY, "RS384"), (CLIENT_EC_KEY, "ES384")])
async def test_exchange_code_private_key_jwt(
    server: ScriptedServer, http: httpx.AsyncClient, key: RSAKey | ECKey, alg: str
) -> None:
    auth = AuthServer(server)
    reg = registration(
        server,
        client_auth="private_key_jwt",
        private_key=key.as_pem(private=True).decode(),
        key_id=key.kid,
        signing_alg=alg,
    )
    for _ in range(2):
        await exchange_code(
            registration=reg, config=auth.config(), code="c", pending=await pending_for(auth, reg), http=http
        )
    jtis = []
    for form in auth.forms:
        assert form["client_assertion_type"] == ["urn:ietf:params:oauth:client-assertion-type:jwt-bearer"]
        public = KeySet.import_key_set({"keys": [key.as_dict(private=False)]})
        token = jwt.decode(form["client_assertion"][0], public, algorithms=[alg])
        assert token.header["alg"] == alg
        assert token.header["kid"] == key.kid
        claims = token.claims
        assert claims["iss"] == claims["sub"] == "carecanvas"
        assert claims["aud"] == auth.document["token_endpoint"]
        assert 0 < claims["exp"] - int(time.time()) <= 300
        jtis.append(claims["jti"])
    assert len(set(jtis)) == 2
    # A key other than the client's must not verify the assertion.
    wrong = (
        RSAKey.generate_key(2048, private=False)
        if alg == "RS384"
        else ECKey.generate_key("P-384", private=False)
    )
    with pytest.raises(BadSignatureError):
        jwt.decode(auth.forms[0]["client_assertion"][0], wrong, algorithms=[alg])


async def test_token_error_keeps_oauth_error(server: ScriptedServer, http: httpx.AsyncClient) -> None:
    auth = AuthServer(server)
    reg = registration(server)
    auth.token_reply = Reply(
        400,
        body={"error": "invalid_grant", "error_description": "code expired"},
        content_type="application/json",
    )
    with pytest.raises(TokenError) as caught:
        await exchange_code(
            registration=reg, config=auth.config(), code="c", pending=await pending_for(auth, reg), http=http
        )
    assert (caught.value.error, caught.value.error_description, caught.value.status) == (
        "invalid_grant",
        "code expired",
        400,
    )
    assert not caught.value.temporary


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"token_type": "Bearer"}, "no access_token"),
        ({"access_token": "a", "token_type": "mac"}, "not Bearer"),
    ],
)
async def test_unusable_token_responses(
    server: ScriptedServer, http: httpx.AsyncClient, body: dict[str, Any], message: str
) -> None:
    auth = AuthServer(server)
    reg = registration(server)
    auth.token_reply = Reply(body=body, content_type="application/json")
    with pytest.raises(TokenError, match=message):
        await exchange_code(
            registration=reg, config=auth.config(), code="c", pending=await pending_for(auth, reg), http=http
        )


async def test_missing_scope_means_requested_and_missing_expiry_is_short(
    server: ScriptedServer, http: httpx.AsyncClient
) -> None:
    auth = AuthServer(server)
    reg = registration(server)
    auth.token_reply = Reply(
        body={"access_token": "a", "token_type": "Bearer"}, content_type="application/json"
    )
    pending = await pending_for(auth, reg, scopes=("launch", "patient/Condition.read"))
    tokens = await exchange_code(registration=reg, config=auth.config(), code="c", pending=pending, http=http)
    assert tokens.scopes.raw == ("launch", "patient/Condition.read")
    assert tokens.expires_within(301)
    assert not tokens.expires_within(200)


async def test_refresh_keeps_old_refresh_token_and_context(
    server: ScriptedServer, http: httpx.AsyncClient
) -> None:
    auth = AuthServer(server)
    reg = registration(server)
    old = TokenSet(
        access_token="old",
        expires_at=datetime.now(UTC),
        scopes=granted("patient/Condition.rs"),
        refresh_token="rt-old",
        patient="pat-1",
    )
    auth.token_reply = Reply(
        body={"access_token": "new", "token_type": "Bearer", "expires_in": 60},
        content_type="application/json",
    )
    new = await refresh(registration=reg, config=auth.config(), token_set=old, http=http)
    assert auth.forms[0]["grant_type"] == ["refresh_token"]
    assert auth.forms[0]["refresh_token"] == ["rt-old"]
    assert (new.access_token, new.refresh_token, new.patient) == ("new", "rt-old", "pat-1")
    assert new.scopes.raw == ("patient/Condition.rs",)
    auth.token_reply = Reply(
        body={"access_token": "newer", "token_type": "Bearer", "refresh_token": "rt-2"},
        content_type="application/json",
    )
    assert (
        await refresh(registration=reg, config=auth.config(), token_set=new, http=http)
    ).refresh_token == "rt-2"


def granted(scope: str) -> GrantedScopes:
    return GrantedScopes.parse(scope)


async def test_backend_services_token(server: ScriptedServer, http: httpx.AsyncClient) -> None:
    auth = AuthServer(server)
    reg = registration(
        server,
        client_auth="private_key_jwt",
        private_key=CLIENT_RSA_KEY.as_dict(private=True),
        key_id="client-rsa",
    )
    tokens = await backend_services_token(
        registration=reg, config=auth.config(), scopes=("system/DocumentReference.cru",), http=http
    )
    assert tokens.access_token == "at-1"
    assert auth.forms[0]["grant_type"] == ["client_credentials"]
    assert auth.forms[0]["scope"] == ["system/DocumentReference.cru"]
    assert "client_assertion" in auth.forms[0]
    with pytest.raises(TokenError, match="confidential"):
        await backend_services_token(
            registration=registration(server), config=auth.config(), scopes=("x",), http=http
        )


# ---- id_token --------------------------------------------------------------------------------------------


async def test_id_token_valid(server: ScriptedServer, http: httpx.AsyncClient) -> None:
    auth = AuthServer(server)
    claims = await verify_id_token(
        id_token(server), config=auth.config(), client_id="carecanvas", nonce="n-1", http=http
    )
    assert claims["fhirUser"] == "Practitioner/prac-1"


def unsigned(server: ScriptedServer) -> str:
    def seg(value: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()

    now = int(time.time())
    claims = {
        "iss": f"{server.url}/auth",
        "aud": "carecanvas",
        "sub": "x",
        "iat": now,
        "exp": now + 60,
        "nonce": "n-1",
    }
    return f"{seg({'alg': 'none', 'typ': 'JWT'})}.{seg(claims)}."


def hs256_signed_with_public_key(server: ScriptedServer) -> str:
    """The algorithm-confusion attack: an HS256 MAC keyed with the issuer's public key."""
    secret = OctKey.import_key(json.dumps(ISSUER_KEY.as_dict(private=False)).encode())
    claims = {"iss": f"{server.url}/auth", "aud": "carecanvas", "nonce": "n-1"}
    return jwt.encode({"alg": "HS256"}, claims, secret, algorithms=["HS256"])


@pytest.mark.parametrize(
    ("make_token", "message"),
    [
        (lambda s: unsigned(s), "algorithm not allowed"),
        (lambda s: hs256_signed_with_public_key(s), "algorithm not allowed"),
        (lambda s: id_token(s, key=OTHER_KEY), "signature"),
        (lambda s: id_token(s, aud="someone-else"), "aud"),
        (lambda s: id_token(s, exp=int(time.time()) - 3600), "expired"),
        (lambda s: id_token(s, nonce="n-2"), "nonce"),
        (lambda s: id_token(s, iss="https://evil.example"), "iss"),
        (lambda s: id_token(s, aud=["carecanvas", "other"]), "azp"),
        (lambda s: "not-a-jwt", "well-formed"),
    ],
)
async def test_id_token_rejections(
    server: ScriptedServer, http: httpx.AsyncClient, make_token: Any, message: str
) -> None:
    auth = AuthServer(server)
    token = make_token(server)
    with pytest.raises(IdTokenError, match=message):
        await verify_id_token(token, config=auth.config(), client_id="carecanvas", nonce="n-1", http=http)


async def test_exchange_code_rejects_bad_id_token(server: ScriptedServer, http: httpx.AsyncClient) -> None:
    auth = AuthServer(server)
    reg = registration(server)
    auth.token_reply = Reply(
        body={"access_token": "a", "token_type": "Bearer", "id_token": id_token(server, nonce="stale")},
        content_type="application/json",
    )
    with pytest.raises(IdTokenError, match="nonce"):
        await exchange_code(
            registration=reg, config=auth.config(), code="c", pending=await pending_for(auth, reg), http=http
        )


# ---- SmartTokenSource with FhirClient ----------------------------------------------------------------------


async def test_token_source_refreshes_after_401(server: ScriptedServer, http: httpx.AsyncClient) -> None:
    auth = AuthServer(server)
    auth.token_reply = Reply(
        body={"access_token": "fresh", "token_type": "Bearer", "expires_in": 3600},
        content_type="application/json",
    )
    stored: list[TokenSet] = []

    async def remember(tokens: TokenSet) -> None:
        stored.append(tokens)

    def handle(request: Request) -> Reply:
        if request.path.startswith("/fhir/Patient"):
            if request.headers.get("authorization") == "Bearer fresh":
                return Reply(body={"resourceType": "Patient", "id": "pat-1"})
            return Reply(401)
        return auth(request)

    server.handle = handle
    source = SmartTokenSource(
        registration=registration(server),
        config=auth.config(),
        token_set=TokenSet(
            access_token="stale",
            expires_at=datetime.now(UTC) + timedelta(hours=1),
            scopes=granted("patient/Patient.r"),
            refresh_token="rt",
        ),
        http=http,
        on_refresh=remember,
    )
    async with FhirClient(f"{server.url}/fhir", auth=source) as client:
        assert (await client.read("Patient", "pat-1"))["id"] == "pat-1"
    assert [t.access_token for t in stored] == ["fresh"]
    assert source.token_set.refresh_token == "rt"


async def test_token_source_refreshes_before_expiry(server: ScriptedServer, http: httpx.AsyncClient) -> None:
    auth = AuthServer(server)
    source = SmartTokenSource(
        registration=registration(server),
        config=auth.config(),
        token_set=TokenSet(
            access_token="old",
            expires_at=datetime.now(UTC) + timedelta(seconds=10),
            scopes=granted(""),
            refresh_token="rt",
        ),
        http=http,
    )
    assert await source.access_token() == "at-1"
    assert len(auth.forms) == 1
    assert await source.access_token() == "at-1"
    assert len(auth.forms) == 1
