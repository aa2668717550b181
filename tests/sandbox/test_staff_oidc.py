"""The sandbox staff OpenID Provider over real HTTP: discovery, login page, code + PKCE, id_token."""

from __future__ import annotations

import base64
import hashlib
import re
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from joserfc import jwt
from joserfc.errors import BadSignatureError, UnsupportedAlgorithmError

from sandbox.auth.config import AuthServerConfig
from sandbox.auth_server import create_auth_app
from sandbox.keys import key_set
from sandbox.run import UvicornThread, bind_socket
from sandbox.staff_oidc import (
    COMPLIANCE_GROUP,
    STAFF_CLIENT_ID,
    STAFF_CONFIDENTIAL_CLIENT_ID,
    StaffOidcConfig,
    StaffOpenIDProvider,
    staff_clients,
)

REDIRECT_URI = "http://127.0.0.1:8765/compliance/callback"
SECRET = "staff-secret-for-tests"
OFFICER = "staff-olivia"
CLINICIAN = "staff-marcus"


@dataclass
class RunningStaff:
    issuer: str
    provider: StaffOpenIDProvider
    http: httpx.Client


@pytest.fixture(scope="module")
def staff() -> Iterator[RunningStaff]:
    sock = bind_socket()
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    config = StaffOidcConfig(issuer=f"{base}/staff", clients=staff_clients([REDIRECT_URI], secret=SECRET))
    app = create_auth_app(AuthServerConfig(issuer=base), staff=config)
    server = UvicornThread(app, sock)
    server.start()
    try:
        with httpx.Client(timeout=10, follow_redirects=False) as http:
            yield RunningStaff(config.issuer, app.state.staff, http)
    finally:
        server.stop()


@pytest.fixture(autouse=True)
def well_behaved(staff: RunningStaff) -> Iterator[None]:
    yield
    staff.provider.config.misbehave.reset()


def pkce() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    return verifier, challenge


def authorize_params(challenge: str, **overrides: str) -> dict[str, str]:
    params = {
        "response_type": "code",
        "client_id": STAFF_CLIENT_ID,
        "redirect_uri": REDIRECT_URI,
        "scope": "openid profile email groups",
        "state": "state-" + secrets.token_urlsafe(8),
        "nonce": "nonce-" + secrets.token_urlsafe(8),
        "code_challenge": challenge,
        "code_challenge_method": "S256",
    }
    params.update(overrides)
    return {key: value for key, value in params.items() if value}


def sign_in(staff: RunningStaff, user: str, params: dict[str, str]) -> httpx.Response:
    return staff.http.post(f"{staff.issuer}/authorize", data={**params, "selected_user": user})


def code_from(response: httpx.Response, state: str) -> str:
    assert response.status_code == 302, response.text
    location = response.headers["location"]
    assert location.startswith(REDIRECT_URI)
    query = parse_qs(urlsplit(location).query)
    assert query["state"] == [state]
    return query["code"][0]


def exchange(
    staff: RunningStaff, code: str, verifier: str, *, auth: tuple[str, str] | None = None, **extra: Any
) -> httpx.Response:
    form = {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": REDIRECT_URI,
        "code_verifier": verifier,
        "client_id": STAFF_CLIENT_ID,
    }
    fields = {key: value for key, value in {**form, **extra}.items() if value is not None}
    return staff.http.post(f"{staff.issuer}/token", data=fields, auth=auth or httpx.USE_CLIENT_DEFAULT)


def verified_claims(staff: RunningStaff, id_token: str) -> dict[str, Any]:
    jwks = staff.http.get(f"{staff.issuer}/jwks.json").json()
    return dict(jwt.decode(id_token, key_set(jwks), algorithms=["RS256"]).claims)


def test_discovery_names_the_issuer_and_its_endpoints(staff: RunningStaff) -> None:
    document = staff.http.get(f"{staff.issuer}/.well-known/openid-configuration").json()
    assert document["issuer"] == staff.issuer
    assert document["authorization_endpoint"] == f"{staff.issuer}/authorize"
    assert document["token_endpoint"] == f"{staff.issuer}/token"
    assert document["jwks_uri"] == f"{staff.issuer}/jwks.json"
    assert document["userinfo_endpoint"] == f"{staff.issuer}/userinfo"
    assert document["code_challenge_methods_supported"] == ["S256"]
    assert document["id_token_signing_alg_values_supported"] == ["RS256"]
    assert "groups" in document["claims_supported"]
    keys = staff.http.get(document["jwks_uri"]).json()["keys"]
    assert [key["kty"] for key in keys] == ["RSA"]
    assert all("d" not in key for key in keys)


def test_login_page_lists_the_staff_and_keeps_the_request(staff: RunningStaff) -> None:
    _, challenge = pkce()
    params = authorize_params(challenge)
    page = staff.http.get(f"{staff.issuer}/authorize", params=params)
    assert page.status_code == 200
    assert page.headers["cache-control"] == "no-store"
    assert "Olivia Okafor-Test" in page.text
    assert "Dr. Marcus Lee-Test" in page.text
    assert COMPLIANCE_GROUP in page.text
    hidden = dict(re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)">', page.text))
    assert hidden["code_challenge"] == challenge
    assert hidden["state"] == params["state"]


def test_officer_signs_in_with_pkce_and_gets_a_verified_id_token(staff: RunningStaff) -> None:
    verifier, challenge = pkce()
    params = authorize_params(challenge)
    code = code_from(sign_in(staff, OFFICER, params), params["state"])
    answer = exchange(staff, code, verifier)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["token_type"] == "Bearer"
    claims = verified_claims(staff, body["id_token"])
    assert claims["iss"] == staff.issuer
    assert claims["aud"] == STAFF_CLIENT_ID
    assert claims["sub"] == OFFICER
    assert claims["nonce"] == params["nonce"]
    assert claims["exp"] > claims["iat"]
    assert COMPLIANCE_GROUP in claims["groups"]
    userinfo = staff.http.get(
        f"{staff.issuer}/userinfo", headers={"Authorization": f"Bearer {body['access_token']}"}
    )
    assert userinfo.json() == {
        "sub": OFFICER,
        "name": "Olivia Okafor-Test",
        "email": "olivia.okafor@sandbox.invalid",
        "groups": [COMPLIANCE_GROUP, "staff"],
    }


def test_clinician_has_no_compliance_group(staff: RunningStaff) -> None:
    verifier, challenge = pkce()
    params = authorize_params(challenge)
    code = code_from(sign_in(staff, CLINICIAN, params), params["state"])
    claims = verified_claims(staff, exchange(staff, code, verifier).json()["id_token"])
    assert claims["sub"] == CLINICIAN
    assert COMPLIANCE_GROUP not in claims["groups"]


def test_scopes_limit_the_released_claims(staff: RunningStaff) -> None:
    verifier, challenge = pkce()
    params = authorize_params(challenge, scope="openid")
    code = code_from(sign_in(staff, OFFICER, params), params["state"])
    claims = verified_claims(staff, exchange(staff, code, verifier).json()["id_token"])
    assert "groups" not in claims
    assert "name" not in claims


def test_pkce_is_required_and_checked(staff: RunningStaff) -> None:
    _, challenge = pkce()
    refused = sign_in(
        staff, OFFICER, authorize_params(challenge, code_challenge="", code_challenge_method="")
    )
    assert refused.status_code == 302
    assert parse_qs(urlsplit(refused.headers["location"]).query)["error"] == ["invalid_request"]
    plain = sign_in(staff, OFFICER, authorize_params(challenge, code_challenge_method="plain"))
    assert parse_qs(urlsplit(plain.headers["location"]).query)["error"] == ["invalid_request"]
    params = authorize_params(challenge)
    code = code_from(sign_in(staff, OFFICER, params), params["state"])
    wrong = exchange(staff, code, secrets.token_urlsafe(48))
    assert wrong.status_code == 400
    assert wrong.json()["error"] == "invalid_grant"


def test_a_code_is_used_once(staff: RunningStaff) -> None:
    verifier, challenge = pkce()
    params = authorize_params(challenge)
    code = code_from(sign_in(staff, OFFICER, params), params["state"])
    assert exchange(staff, code, verifier).status_code == 200
    replay = exchange(staff, code, verifier)
    assert replay.status_code == 400
    assert replay.json()["error"] == "invalid_grant"


def test_openid_scope_is_required(staff: RunningStaff) -> None:
    _, challenge = pkce()
    refused = sign_in(staff, OFFICER, authorize_params(challenge, scope="profile"))
    assert parse_qs(urlsplit(refused.headers["location"]).query)["error"] == ["invalid_scope"]


def test_unknown_redirect_uri_is_never_redirected_to(staff: RunningStaff) -> None:
    _, challenge = pkce()
    refused = sign_in(staff, OFFICER, authorize_params(challenge, redirect_uri="https://evil.invalid/cb"))
    assert refused.status_code == 400
    assert "location" not in refused.headers
    assert "refused" in refused.text


def test_confidential_client_must_authenticate(staff: RunningStaff) -> None:
    verifier, challenge = pkce()
    params = authorize_params(challenge, client_id=STAFF_CONFIDENTIAL_CLIENT_ID)
    code = code_from(sign_in(staff, OFFICER, params), params["state"])
    anonymous = exchange(staff, code, verifier, client_id=STAFF_CONFIDENTIAL_CLIENT_ID)
    assert anonymous.status_code == 401
    answer = exchange(staff, code, verifier, client_id=None, auth=(STAFF_CONFIDENTIAL_CLIENT_ID, SECRET))
    assert answer.status_code == 200, answer.text
    assert verified_claims(staff, answer.json()["id_token"])["aud"] == STAFF_CONFIDENTIAL_CLIENT_ID


def test_userinfo_needs_a_live_access_token(staff: RunningStaff) -> None:
    refused = staff.http.get(f"{staff.issuer}/userinfo", headers={"Authorization": "Bearer nope"})
    assert refused.status_code == 401
    assert refused.json() == {"error": "invalid_token"}
    assert staff.http.get(f"{staff.issuer}/userinfo").status_code == 401


@pytest.mark.parametrize(
    ("switch", "check"),
    [
        ("id_token_wrong_nonce", lambda claims, params: claims["nonce"] != params["nonce"]),
        ("id_token_expired", lambda claims, params: claims["exp"] < claims["iat"] + 7200),
        ("id_token_wrong_aud", lambda claims, params: claims["aud"] != STAFF_CLIENT_ID),
        ("id_token_wrong_issuer", lambda claims, params: claims["iss"].startswith("https://foreign")),
    ],
)
def test_misbehaviour_switches_spoil_one_claim(staff: RunningStaff, switch: str, check: Any) -> None:
    setattr(staff.provider.config.misbehave, switch, True)
    verifier, challenge = pkce()
    params = authorize_params(challenge)
    code = code_from(sign_in(staff, OFFICER, params), params["state"])
    claims = verified_claims(staff, exchange(staff, code, verifier).json()["id_token"])
    assert check(claims, params)


def test_wrong_key_and_alg_none_do_not_verify(staff: RunningStaff) -> None:
    staff.provider.config.misbehave.id_token_wrong_key = True
    verifier, challenge = pkce()
    params = authorize_params(challenge)
    code = code_from(sign_in(staff, OFFICER, params), params["state"])
    with pytest.raises(BadSignatureError):
        verified_claims(staff, exchange(staff, code, verifier).json()["id_token"])
    staff.provider.config.misbehave.reset()
    staff.provider.config.misbehave.id_token_alg_none = True
    params = authorize_params(challenge)
    code = code_from(sign_in(staff, OFFICER, params), params["state"])
    id_token = exchange(staff, code, verifier).json()["id_token"]
    assert id_token.endswith(".")
    with pytest.raises(UnsupportedAlgorithmError):
        verified_claims(staff, id_token)
