"""The sandbox SMART authorization server over real HTTP: discovery, launches, tokens, misbehaviour."""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from joserfc import jwt
from joserfc.errors import BadSignatureError
from joserfc.jwk import RSAKey
from joserfc.jws import extract_compact

from sandbox.auth.config import DEMO_CLIENT_ID, AuthServerConfig, ClientRegistration, Misbehaviour
from sandbox.auth.oauth import SmartAuthorizationServer
from sandbox.auth.scopes import is_allowed, narrow, parse_resource_scope
from sandbox.auth_server import create_auth_app
from sandbox.keys import generate_client_key, key_set, make_client_assertion, public_jwks, sign_jwt
from sandbox.run import UvicornThread, bind_socket

REDIRECT_URI = "http://127.0.0.1:8765/callback"
FHIR_BASE = "http://127.0.0.1:8766/fhir"
APP_LAUNCH_URL = "http://127.0.0.1:8765/launch"
EHR_SCOPE = (
    "launch openid fhirUser offline_access patient/Condition.rs patient/Patient.rs user/DocumentReference.cu"
)

FIXTURE_BUNDLE: dict[str, Any] = {
    "resourceType": "Bundle",
    "type": "collection",
    "entry": [
        {"resource": {"resourceType": "Patient", "id": "pat-1", "birthDate": "1951-03-02",
                      "name": [{"given": ["Ada"], "family": "Lovelace-Test"}]}},
        {"resource": {"resourceType": "Patient", "id": "pat-2", "birthDate": "1987-11-20",
                      "name": [{"text": "Bruno Díaz-Test"}]}},
        {"resource": {"resourceType": "Practitioner", "id": "prac-1",
                      "name": [{"prefix": ["Dr."], "given": ["Grace"], "family": "Hopper-Test"}]}},
        {"resource": {"resourceType": "Practitioner", "id": "prac-2", "name": [{"family": "Curie-Test"}]}},
        {"resource": {"resourceType": "Encounter", "id": "enc-1", "status": "in-progress",
                      "subject": {"reference": "Patient/pat-1"}}},
        {"resource": {"resourceType": "Encounter", "id": "enc-2", "status": "in-progress",
                      "subject": {"reference": "Patient/pat-2"}}},
    ],
}  # fmt: skip


@dataclass
class RunningAuth:
    base: str
    server: SmartAuthorizationServer
    http: httpx.Client

    @property
    def misbehave(self) -> Misbehaviour:
        return self.server.config.misbehave


@pytest.fixture(scope="module")
def backend_key() -> Any:
    return generate_client_key(alg="RS384")


@pytest.fixture(scope="module")
def backend_ec_key() -> Any:
    return generate_client_key(alg="ES384")


@pytest.fixture(scope="module")
def running(
    tmp_path_factory: pytest.TempPathFactory, backend_key: Any, backend_ec_key: Any
) -> Iterator[RunningAuth]:
    data_file = tmp_path_factory.mktemp("sandbox") / "bundle.json"
    data_file.write_text(json.dumps(FIXTURE_BUNDLE), encoding="utf-8")
    sock = bind_socket()
    issuer = f"http://127.0.0.1:{sock.getsockname()[1]}"
    config = AuthServerConfig(  # backend_key and backend_ec_key are made before binding: nothing leaks
        issuer=issuer,
        fhir_base=FHIR_BASE,
        data_file=data_file,
        app_launch_url=APP_LAUNCH_URL,
        portal_url="http://127.0.0.1:8765/portal",
        clients=[
            ClientRegistration(DEMO_CLIENT_ID, redirect_uris=[REDIRECT_URI]),
            ClientRegistration(
                "backend-rs", client_type="confidential-asymmetric", jwks=public_jwks(backend_key),
                scopes=["system/*.rs"],
            ),
            ClientRegistration(
                "backend-es", client_type="confidential-asymmetric", jwks=public_jwks(backend_ec_key),
                scopes=["system/*.rs"],
            ),
            ClientRegistration(
                "web-confidential", client_type="confidential-symmetric", secret="s3cret-value",
                redirect_uris=[REDIRECT_URI],
            ),
        ],
    )  # fmt: skip
    try:
        app = create_auth_app(config)
        thread = UvicornThread(app, sock)
        thread.start()
    except BaseException:
        sock.close()
        raise
    with httpx.Client(follow_redirects=False, timeout=10) as http:
        yield RunningAuth(base=issuer, server=app.state.server, http=http)
    thread.stop()


@pytest.fixture(autouse=True)
def well_behaved(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if "running" in request.fixturenames:
        running = request.getfixturevalue("running")
        running.misbehave.reset()
        running.server.config.launch_lifetime = 300


# --- helpers ------------------------------------------------------------------------------------------
def pkce_pair() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    return verifier, challenge


def authorize_params(*, challenge: str, **overrides: str | None) -> dict[str, str]:
    params: dict[str, str | None] = {
        "response_type": "code",
        "client_id": DEMO_CLIENT_ID,
        "redirect_uri": REDIRECT_URI,
        "scope": EHR_SCOPE,
        "state": secrets.token_urlsafe(16),
        "aud": FHIR_BASE,
        "code_challenge": challenge,
        "code_challenge_method": "S256",
        "nonce": secrets.token_urlsafe(16),
    }
    params.update(overrides)
    return {key: value for key, value in params.items() if value is not None}


def redirect_query(response: httpx.Response) -> dict[str, str]:
    assert response.status_code == 302, response.text
    location = response.headers["location"]
    assert location.startswith(REDIRECT_URI + "?")
    return {key: values[0] for key, values in parse_qs(urlsplit(location).query).items()}


def get_code(running: RunningAuth, params: dict[str, str]) -> str:
    query = redirect_query(running.http.get(f"{running.base}/authorize", params=params))
    assert query["state"] == params["state"]
    return query["code"]


def exchange(running: RunningAuth, code: str, verifier: str, **extra: str) -> httpx.Response:
    form = {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": REDIRECT_URI,
        "client_id": DEMO_CLIENT_ID,
        "code_verifier": verifier,
        **extra,
    }
    return running.http.post(f"{running.base}/token", data=form)


def ehr_launch_tokens(
    running: RunningAuth, *, scope: str = EHR_SCOPE, patient: str = "pat-1"
) -> dict[str, Any]:
    launch = running.server.create_launch(patient_id=patient, practitioner_id="prac-1")
    verifier, challenge = pkce_pair()
    params = authorize_params(challenge=challenge, launch=launch, scope=scope)
    response = exchange(running, get_code(running, params), verifier)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    body["_nonce"] = params["nonce"]
    return body


def jwks_of(running: RunningAuth) -> Any:
    return key_set(running.http.get(f"{running.base}/jwks.json").json())


def verified_claims(running: RunningAuth, token: str) -> dict[str, Any]:
    return dict(jwt.decode(token, jwks_of(running), algorithms=["RS256"]).claims)


def client_credentials(
    running: RunningAuth, assertion: str, scope: str = "system/Patient.rs"
) -> httpx.Response:
    return running.http.post(
        f"{running.base}/token",
        data={
            "grant_type": "client_credentials",
            "scope": scope,
            "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            "client_assertion": assertion,
        },
    )


# --- discovery ----------------------------------------------------------------------------------------
def test_smart_configuration_names_endpoints_and_capabilities(running: RunningAuth) -> None:
    response = running.http.get(f"{running.base}/.well-known/smart-configuration")
    assert response.status_code == 200
    document = response.json()
    assert document["issuer"] == running.base
    assert document["authorization_endpoint"] == f"{running.base}/authorize"
    assert document["token_endpoint"] == f"{running.base}/token"
    assert document["jwks_uri"] == f"{running.base}/jwks.json"
    assert document["code_challenge_methods_supported"] == ["S256"]
    assert set(document["grant_types_supported"]) == {
        "authorization_code",
        "refresh_token",
        "client_credentials",
    }
    assert set(document["token_endpoint_auth_methods_supported"]) == {
        "none",
        "client_secret_basic",
        "private_key_jwt",
    }
    assert document["token_endpoint_auth_signing_alg_values_supported"] == ["RS384", "ES384"]
    for capability in (
        "launch-ehr",
        "launch-standalone",
        "context-ehr-patient",
        "permission-v2",
        "authorize-post",
    ):
        assert capability in document["capabilities"]
    openid = running.http.get(f"{running.base}/.well-known/openid-configuration").json()
    assert openid["issuer"] == running.base
    assert openid["id_token_signing_alg_values_supported"] == ["RS256"]


def test_jwks_publishes_only_the_public_signing_key(running: RunningAuth) -> None:
    keys = running.http.get(f"{running.base}/jwks.json").json()["keys"]
    assert len(keys) == 1
    assert keys[0]["kty"] == "RSA"
    assert keys[0]["kid"] == running.server.config.signing_key.kid
    assert not {"d", "p", "q", "dp", "dq", "qi"} & set(keys[0])


# --- EHR launch ---------------------------------------------------------------------------------------
def test_ehr_launch_code_flow_returns_smart_token_response(running: RunningAuth) -> None:
    body = ehr_launch_tokens(running)
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == 3600
    assert set(body["scope"].split()) == set(EHR_SCOPE.split())
    assert body["patient"] == "pat-1"
    assert body["encounter"] == "enc-1"
    assert body["need_patient_banner"] is True
    assert body["refresh_token"]
    style = running.http.get(body["smart_style_url"])
    assert style.status_code == 200
    assert "color_background" in style.json()

    access = verified_claims(running, body["access_token"])
    assert access["iss"] == running.base
    assert access["aud"] == FHIR_BASE
    assert access["patient"] == "pat-1"
    assert access["fhirUser"] == f"{FHIR_BASE}/Practitioner/prac-1"
    assert access["client_id"] == DEMO_CLIENT_ID
    assert access["scope"] == body["scope"]
    assert access["exp"] - time.time() == pytest.approx(3600, abs=10)

    id_token = verified_claims(running, body["id_token"])
    assert id_token["iss"] == running.base
    assert id_token["aud"] == DEMO_CLIENT_ID
    assert id_token["nonce"] == body["_nonce"]
    assert id_token["fhirUser"] == f"{FHIR_BASE}/Practitioner/prac-1"
    assert id_token["sub"] == "Practitioner/prac-1"
    assert id_token["exp"] > time.time()


def test_token_response_is_not_cacheable(running: RunningAuth) -> None:
    launch = running.server.create_launch(patient_id="pat-2", practitioner_id="prac-2")
    verifier, challenge = pkce_pair()
    response = exchange(
        running, get_code(running, authorize_params(challenge=challenge, launch=launch)), verifier
    )
    assert response.headers["cache-control"] == "no-store"
    assert response.json()["patient"] == "pat-2"
    assert response.json()["encounter"] == "enc-2"


def test_user_level_scopes_give_no_patient_claim_but_keep_context(running: RunningAuth) -> None:
    body = ehr_launch_tokens(running, scope="launch openid fhirUser user/Condition.rs")
    access = verified_claims(running, body["access_token"])
    assert "patient" not in access
    assert body["patient"] == "pat-1"
    assert "refresh_token" not in body


def test_scopes_outside_the_registration_are_not_granted(running: RunningAuth) -> None:
    body = ehr_launch_tokens(running, scope="launch openid system/Patient.rs patient/Condition.rs")
    assert body["scope"].split() == ["launch", "openid", "patient/Condition.rs"]


def test_authorize_by_post_works_like_get(running: RunningAuth) -> None:
    launch = running.server.create_launch(patient_id="pat-1", practitioner_id="prac-1")
    verifier, challenge = pkce_pair()
    params = authorize_params(challenge=challenge, launch=launch)
    query = redirect_query(running.http.post(f"{running.base}/authorize", data=params))
    assert exchange(running, query["code"], verifier).status_code == 200


def test_wrong_pkce_verifier_is_invalid_grant(running: RunningAuth) -> None:
    launch = running.server.create_launch(patient_id="pat-1", practitioner_id="prac-1")
    _verifier, challenge = pkce_pair()
    code = get_code(running, authorize_params(challenge=challenge, launch=launch))
    other_verifier, _ = pkce_pair()
    response = exchange(running, code, other_verifier)
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_grant"


def test_missing_verifier_is_refused(running: RunningAuth) -> None:
    launch = running.server.create_launch(patient_id="pat-1", practitioner_id="prac-1")
    _verifier, challenge = pkce_pair()
    code = get_code(running, authorize_params(challenge=challenge, launch=launch))
    response = running.http.post(
        f"{running.base}/token",
        data={
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": REDIRECT_URI,
            "client_id": DEMO_CLIENT_ID,
        },
    )
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_request"


@pytest.mark.parametrize(
    ("overrides", "expected_error"),
    [
        ({"code_challenge_method": "plain"}, "invalid_request"),
        ({"code_challenge_method": None}, "invalid_request"),
        ({"code_challenge": None, "code_challenge_method": None}, "invalid_request"),
        ({"aud": "http://127.0.0.1:9999/other-fhir"}, "invalid_request"),
        ({"aud": None}, "invalid_request"),
        ({"aud": FHIR_BASE + "/"}, "invalid_request"),
        ({"launch": "no-such-launch"}, "invalid_request"),
        ({"scope": "openid patient/Condition.rs"}, "invalid_scope"),
        ({"scope": "system/Patient.rs"}, "invalid_scope"),
        ({"response_type": "token"}, "unsupported_response_type"),
    ],
    ids=["plain-pkce", "no-method", "no-pkce", "wrong-aud", "no-aud", "aud-trailing-slash", "unknown-launch",
         "launch-without-launch-scope", "no-allowed-scope", "implicit"],
)  # fmt: skip
def test_bad_authorize_requests_redirect_back_with_error_and_state(
    running: RunningAuth, overrides: dict[str, str | None], expected_error: str
) -> None:
    _verifier, challenge = pkce_pair()
    launch = running.server.create_launch(patient_id="pat-1", practitioner_id="prac-1")
    params = authorize_params(challenge=challenge, **{"launch": launch, **overrides})
    query = redirect_query(running.http.get(f"{running.base}/authorize", params=params))
    assert query["error"] == expected_error
    assert query["error_description"]
    assert query["state"] == params["state"]
    assert "code" not in query


def test_expired_launch_is_refused(running: RunningAuth) -> None:
    running.server.config.launch_lifetime = 0
    launch = running.server.create_launch(patient_id="pat-1", practitioner_id="prac-1")
    _verifier, challenge = pkce_pair()
    query = redirect_query(
        running.http.get(
            f"{running.base}/authorize", params=authorize_params(challenge=challenge, launch=launch)
        )
    )
    assert query["error"] == "invalid_request"
    assert "launch" in query["error_description"]


def test_launch_may_be_used_twice_within_its_lifetime(running: RunningAuth) -> None:
    launch = running.server.create_launch(patient_id="pat-1", practitioner_id="prac-1")
    for _ in range(2):
        verifier, challenge = pkce_pair()
        code = get_code(running, authorize_params(challenge=challenge, launch=launch))
        assert exchange(running, code, verifier).json()["patient"] == "pat-1"


@pytest.mark.parametrize(
    "overrides",
    [{"redirect_uri": "http://127.0.0.1:8765/evil"}, {"client_id": "nobody"}, {"redirect_uri": None}],
    ids=["unknown-redirect", "unknown-client", "no-redirect"],
)
def test_bad_client_or_redirect_shows_error_page_and_never_redirects(
    running: RunningAuth, overrides: dict[str, str | None]
) -> None:
    _verifier, challenge = pkce_pair()
    params = authorize_params(challenge=challenge, **overrides)
    response = running.http.get(f"{running.base}/authorize", params=params)
    assert response.status_code == 400
    assert "location" not in response.headers
    assert response.headers["content-type"].startswith("text/html")
    assert "refused" in response.text


def test_create_launch_refuses_unknown_people(running: RunningAuth) -> None:
    with pytest.raises(ValueError, match="unknown patient"):
        running.server.create_launch(patient_id="pat-404", practitioner_id="prac-1")
    with pytest.raises(ValueError, match="unknown practitioner"):
        running.server.create_launch(patient_id="pat-1", practitioner_id="prac-404")


# --- standalone launch ---------------------------------------------------------------------------------
def test_standalone_launch_with_hint_selects_that_patient(running: RunningAuth) -> None:
    verifier, challenge = pkce_pair()
    params = authorize_params(
        challenge=challenge, scope="launch/patient openid fhirUser patient/*.rs", login_hint="Patient/pat-2"
    )
    body = exchange(running, get_code(running, params), verifier).json()
    assert body["patient"] == "pat-2"
    assert body["need_patient_banner"] is False
    assert "encounter" not in body
    assert verified_claims(running, body["id_token"])["fhirUser"] == f"{FHIR_BASE}/Patient/pat-2"
    assert verified_claims(running, body["access_token"])["patient"] == "pat-2"


def test_standalone_launch_without_hint_shows_picker_that_posts_back(running: RunningAuth) -> None:
    verifier, challenge = pkce_pair()
    params = authorize_params(challenge=challenge, scope="launch/patient openid patient/*.rs")
    picker = running.http.get(f"{running.base}/authorize", params=params)
    assert picker.status_code == 200
    assert "Ada Lovelace-Test" in picker.text
    assert "Bruno Díaz-Test" in picker.text
    assert 'name="selected_patient" value="pat-2"' in picker.text
    chosen = {**params, "selected_patient": "pat-2"}
    query = redirect_query(running.http.post(f"{running.base}/authorize", data=chosen))
    assert exchange(running, query["code"], verifier).json()["patient"] == "pat-2"


def test_standalone_launch_refuses_unknown_patient(running: RunningAuth) -> None:
    _verifier, challenge = pkce_pair()
    params = authorize_params(challenge=challenge, scope="launch/patient patient/*.rs", login_hint="pat-404")
    assert (
        redirect_query(running.http.get(f"{running.base}/authorize", params=params))["error"]
        == "invalid_request"
    )


def test_login_without_patient_context_signs_in_a_practitioner(running: RunningAuth) -> None:
    verifier, challenge = pkce_pair()
    params = authorize_params(challenge=challenge, scope="openid fhirUser", login_hint="Practitioner/prac-2")
    body = exchange(running, get_code(running, params), verifier).json()
    assert "patient" not in body
    assert verified_claims(running, body["id_token"])["sub"] == "Practitioner/prac-2"


# --- code reuse and refresh --------------------------------------------------------------------------
def test_reused_code_is_refused_and_revokes_what_it_issued(running: RunningAuth) -> None:
    launch = running.server.create_launch(patient_id="pat-1", practitioner_id="prac-1")
    verifier, challenge = pkce_pair()
    code = get_code(running, authorize_params(challenge=challenge, launch=launch))
    first = exchange(running, code, verifier).json()
    introspect = f"{running.base}/introspect"
    assert running.http.post(introspect, data={"token": first["access_token"]}).json()["active"] is True
    assert running.http.post(introspect, data={"token": first["refresh_token"]}).json()["active"] is True

    replay = exchange(running, code, verifier)
    assert replay.status_code == 400
    assert replay.json()["error"] == "invalid_grant"
    assert running.http.post(introspect, data={"token": first["access_token"]}).json() == {"active": False}
    refreshed = running.http.post(
        f"{running.base}/token",
        data={
            "grant_type": "refresh_token",
            "refresh_token": first["refresh_token"],
            "client_id": DEMO_CLIENT_ID,
        },
    )
    assert refreshed.status_code == 400
    assert refreshed.json()["error"] == "invalid_grant"


def test_allow_code_reuse_switch_lets_a_code_be_exchanged_twice(running: RunningAuth) -> None:
    running.misbehave.allow_code_reuse = True
    launch = running.server.create_launch(patient_id="pat-1", practitioner_id="prac-1")
    verifier, challenge = pkce_pair()
    code = get_code(running, authorize_params(challenge=challenge, launch=launch))
    assert exchange(running, code, verifier).status_code == 200
    assert exchange(running, code, verifier).status_code == 200


def test_code_of_another_client_is_refused(running: RunningAuth) -> None:
    launch = running.server.create_launch(patient_id="pat-1", practitioner_id="prac-1")
    verifier, challenge = pkce_pair()
    code = get_code(
        running, authorize_params(challenge=challenge, launch=launch, client_id="web-confidential")
    )
    response = exchange(running, code, verifier)  # presented by the public demo client
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_grant"


def refresh(running: RunningAuth, token: str) -> httpx.Response:
    return running.http.post(
        f"{running.base}/token",
        data={"grant_type": "refresh_token", "refresh_token": token, "client_id": DEMO_CLIENT_ID},
    )


def test_refresh_without_rotation_keeps_the_refresh_token_valid(running: RunningAuth) -> None:
    first = ehr_launch_tokens(running)
    for _ in range(2):
        response = refresh(running, first["refresh_token"])
        assert response.status_code == 200, response.text
        body = response.json()
        assert "refresh_token" not in body
        assert "id_token" not in body
        assert body["patient"] == "pat-1"
        claims = verified_claims(running, body["access_token"])
        assert claims["patient"] == "pat-1"
        assert claims["jti"] != verified_claims(running, first["access_token"])["jti"]


def test_refresh_with_rotation_issues_a_new_token_and_retires_the_old(running: RunningAuth) -> None:
    running.misbehave.rotate_refresh_tokens = True
    first = ehr_launch_tokens(running)
    rotated = refresh(running, first["refresh_token"]).json()
    assert rotated["refresh_token"]
    assert rotated["refresh_token"] != first["refresh_token"]
    assert refresh(running, first["refresh_token"]).json()["error"] == "invalid_grant"
    assert refresh(running, rotated["refresh_token"]).status_code == 200


def test_unknown_refresh_token_is_invalid_grant(running: RunningAuth) -> None:
    response = refresh(running, "not-a-token")
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_grant"


def test_unsupported_grant_type_is_refused(running: RunningAuth) -> None:
    response = running.http.post(
        f"{running.base}/token", data={"grant_type": "password", "client_id": DEMO_CLIENT_ID}
    )
    assert response.status_code == 400
    assert response.json()["error"] == "unsupported_grant_type"


# --- confidential clients -----------------------------------------------------------------------------
def test_confidential_symmetric_client_authenticates_with_basic(running: RunningAuth) -> None:
    launch = running.server.create_launch(patient_id="pat-1", practitioner_id="prac-1")
    verifier, challenge = pkce_pair()
    params = authorize_params(challenge=challenge, launch=launch, client_id="web-confidential")
    code = get_code(running, params)
    form = {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": REDIRECT_URI,
        "code_verifier": verifier,
    }
    wrong = running.http.post(f"{running.base}/token", data=form, auth=("web-confidential", "wrong"))
    assert wrong.status_code == 401
    assert wrong.json()["error"] == "invalid_client"
    right = running.http.post(f"{running.base}/token", data=form, auth=("web-confidential", "s3cret-value"))
    assert right.status_code == 200, right.text
    assert verified_claims(running, right.json()["access_token"])["client_id"] == "web-confidential"


def test_backend_service_client_credentials_with_rs384_and_jti_replay(
    running: RunningAuth, backend_key: Any
) -> None:
    token_url = f"{running.base}/token"
    assertion = make_client_assertion(client_id="backend-rs", token_endpoint=token_url, key=backend_key)
    response = client_credentials(running, assertion)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["scope"] == "system/Patient.rs"
    assert not {"refresh_token", "id_token", "patient"} & set(body)
    claims = verified_claims(running, body["access_token"])
    assert claims["client_id"] == "backend-rs"
    assert claims["aud"] == FHIR_BASE
    assert not {"patient", "fhirUser"} & set(claims)

    replay = client_credentials(running, assertion)
    assert replay.status_code == 400
    assert replay.json() == {
        "error": "invalid_client",
        "error_description": "client_assertion jti was already used.",
    }


def test_backend_service_with_es384(running: RunningAuth, backend_ec_key: Any) -> None:
    assertion = make_client_assertion(
        client_id="backend-es", token_endpoint=f"{running.base}/token", key=backend_ec_key, alg="ES384"
    )
    assert client_credentials(running, assertion).status_code == 200


def _claims(running: RunningAuth, **overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    claims = {
        "iss": "backend-rs",
        "sub": "backend-rs",
        "aud": f"{running.base}/token",
        "exp": now + 120,
        "iat": now,
        "jti": secrets.token_urlsafe(8),
    }
    claims.update(overrides)
    return {key: value for key, value in claims.items() if value is not None}


@pytest.mark.parametrize(
    ("overrides", "description"),
    [
        ({"sub": "someone-else"}, "sub must equal iss"),
        ({"aud": "http://127.0.0.1:1/token"}, "aud must be the token endpoint"),
        ({"exp": int(time.time()) + 3600}, "more than 5 minutes"),
        ({"exp": int(time.time()) - 10}, "expired"),
        ({"jti": None}, "needs a jti"),
        ({"iss": "nobody", "sub": "nobody"}, "iss is no registered"),
    ],
    ids=["sub", "aud", "too-long", "expired", "no-jti", "unknown-iss"],
)
def test_bad_client_assertions_are_refused(
    running: RunningAuth, backend_key: Any, overrides: dict[str, Any], description: str
) -> None:
    assertion = sign_jwt(_claims(running, **overrides), key=backend_key, alg="RS384")
    response = client_credentials(running, assertion)
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_client"
    assert description in response.json()["error_description"]


def test_assertion_signed_by_an_unregistered_key_or_alg_is_refused(
    running: RunningAuth, backend_key: Any
) -> None:
    stranger = generate_client_key(alg="RS384", kid=backend_key.kid)
    forged = client_credentials(running, sign_jwt(_claims(running), key=stranger, alg="RS384"))
    assert forged.json()["error_description"] == "client_assertion signature does not verify."
    rs256_key = RSAKey.generate_key(2048, parameters={"kid": backend_key.kid})
    rs256 = client_credentials(running, sign_jwt(_claims(running), key=rs256_key, alg="RS256"))
    assert rs256.json()["error_description"] == "client_assertion alg must be RS384 or ES384."
    garbage = client_credentials(running, "not.a.jwt")
    assert garbage.json()["error"] == "invalid_client"


def test_public_client_cannot_use_client_credentials(running: RunningAuth) -> None:
    response = running.http.post(
        f"{running.base}/token",
        data={"grant_type": "client_credentials", "client_id": DEMO_CLIENT_ID, "scope": "system/Patient.rs"},
    )
    assert response.status_code in (400, 401)
    assert response.json()["error"] == "invalid_client"


def test_backend_scope_outside_registration_is_refused(running: RunningAuth, backend_key: Any) -> None:
    assertion = sign_jwt(_claims(running), key=backend_key, alg="RS384")
    response = client_credentials(running, assertion, scope="system/Patient.cruds")
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_scope"


# --- misbehaviour switches ----------------------------------------------------------------------------
def test_foreign_issuer_switch_changes_discovery_and_id_token(running: RunningAuth) -> None:
    running.misbehave.foreign_issuer = True
    discovery = running.http.get(f"{running.base}/.well-known/smart-configuration").json()
    assert discovery["issuer"] != running.base
    body = ehr_launch_tokens(running)
    assert verified_claims(running, body["id_token"])["iss"] == discovery["issuer"]


def test_foreign_token_endpoint_switch(running: RunningAuth) -> None:
    running.misbehave.foreign_token_endpoint = True
    discovery = running.http.get(f"{running.base}/.well-known/smart-configuration").json()
    assert not discovery["token_endpoint"].startswith(running.base)


def test_id_token_wrong_key_switch_breaks_the_signature(running: RunningAuth) -> None:
    running.misbehave.id_token_wrong_key = True
    body = ehr_launch_tokens(running)
    with pytest.raises(BadSignatureError):
        verified_claims(running, body["id_token"])
    verified_claims(running, body["access_token"])  # the access token is still good


def test_id_token_alg_none_switch(running: RunningAuth) -> None:
    running.misbehave.id_token_alg_none = True
    id_token = ehr_launch_tokens(running)["id_token"]
    assert extract_compact(id_token.encode()).headers()["alg"] == "none"
    assert id_token.endswith(".")


@pytest.mark.parametrize("switch", ["id_token_wrong_aud", "id_token_expired", "id_token_wrong_nonce"])
def test_id_token_claim_switches(running: RunningAuth, switch: str) -> None:
    setattr(running.misbehave, switch, True)
    body = ehr_launch_tokens(running)
    claims = verified_claims(running, body["id_token"])
    if switch == "id_token_wrong_aud":
        assert claims["aud"] != DEMO_CLIENT_ID
    elif switch == "id_token_expired":
        assert claims["exp"] < time.time()
    else:
        assert claims["nonce"] != body["_nonce"]


def test_grant_fewer_scopes_switch_narrows_the_grant(running: RunningAuth) -> None:
    running.misbehave.grant_fewer_scopes = {"patient/Condition.rs", "offline_access"}
    body = ehr_launch_tokens(running)
    granted = body["scope"].split()
    assert "patient/Condition.rs" not in granted
    assert "patient/Patient.rs" in granted
    assert "refresh_token" not in body
    assert verified_claims(running, body["access_token"])["scope"] == body["scope"]


def test_access_token_lifetime_switch(running: RunningAuth) -> None:
    running.misbehave.access_token_lifetime = 1
    body = ehr_launch_tokens(running)
    assert body["expires_in"] == 1
    claims = verified_claims(running, body["access_token"])
    assert claims["exp"] - claims["iat"] == 1


def test_misbehaviour_refuses_unknown_switches_and_bad_values() -> None:
    switches = Misbehaviour()
    with pytest.raises(AttributeError, match="unknown misbehaviour"):
        switches.id_token_wrong_kid = True
    with pytest.raises(ValueError, match="positive number"):
        switches.access_token_lifetime = 0
    seen: list[str] = []
    switches.on_change(seen.append)
    switches.foreign_issuer = True
    assert seen == ["foreign_issuer"]
    assert switches.active() == {"foreign_issuer": True}


# --- EHR page -----------------------------------------------------------------------------------------
def test_ehr_page_lists_patients_and_practitioners(running: RunningAuth) -> None:
    page = running.http.get(f"{running.base}/ehr")
    assert page.status_code == 200
    for text in ("Sandbox EHR", "Ada Lovelace-Test", "1951-03-02", "Bruno Díaz-Test", "Dr. Grace Hopper-Test",
                 "Launch CareCanvas", "Open patient portal", 'lang="en"'):  # fmt: skip
        assert text in page.text
    assert "<iframe" not in page.text
    assert running.http.get(f"{running.base}/").headers["location"] == f"{running.base}/ehr"


def test_ehr_page_launch_shows_app_in_iframe_with_a_working_launch(running: RunningAuth) -> None:
    page = running.http.post(
        f"{running.base}/ehr/launch", data={"patient": "pat-2", "practitioner": "prac-2"}
    )
    assert page.status_code == 200
    src = page.text.split('<iframe class="app-frame" title="CareCanvas" src="', 1)[1].split('"', 1)[0]
    src = src.replace("&amp;", "&")
    parts = urlsplit(src)
    assert f"{parts.scheme}://{parts.netloc}{parts.path}" == APP_LAUNCH_URL
    query = parse_qs(parts.query)
    assert query["iss"] == [FHIR_BASE]
    verifier, challenge = pkce_pair()
    code = get_code(running, authorize_params(challenge=challenge, launch=query["launch"][0]))
    body = exchange(running, code, verifier).json()
    assert (body["patient"], body["encounter"]) == ("pat-2", "enc-2")
    assert verified_claims(running, body["id_token"])["fhirUser"].endswith("/Practitioner/prac-2")


def test_ehr_page_refuses_unknown_patient(running: RunningAuth) -> None:
    page = running.http.post(
        f"{running.base}/ehr/launch", data={"patient": "pat-404", "practitioner": "prac-1"}
    )
    assert page.status_code == 400
    assert "<iframe" not in page.text


def test_ehr_page_without_app_launch_url_says_so(running: RunningAuth) -> None:
    config = running.server.config
    saved = config.app_launch_url
    config.app_launch_url = None
    try:
        page = running.http.post(
            f"{running.base}/ehr/launch", data={"patient": "pat-1", "practitioner": "prac-1"}
        )
    finally:
        config.app_launch_url = saved
    assert page.status_code == 409
    assert "no launch URL" in page.text


# --- scope rules (pure) -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("requested", "allowed", "expected"),
    [
        ("patient/Condition.rs", ["patient/*.*"], True),
        ("patient/Condition.read", ["patient/*.cruds"], True),
        ("patient/Condition.cruds", ["patient/*.rs"], False),
        ("user/Condition.rs", ["patient/*.*"], False),
        ("patient/Condition.rs?category=problem-list-item", ["patient/Condition.rs"], True),
        ("patient/Condition.rs", ["patient/Condition.rs?category=problem-list-item"], False),
        ("patient/Condition.sr", ["patient/*.*"], False),
        ("launch", ["launch", "openid"], True),
        ("launch/patient", ["launch"], False),
    ],
)
def test_scope_matching(requested: str, allowed: list[str], expected: bool) -> None:
    assert is_allowed(requested, allowed) is expected


def test_narrow_keeps_order_and_parse_rejects_junk() -> None:
    assert narrow(["openid", "x", "patient/A.rs"], ["openid", "patient/*.rs"]) == ["openid", "patient/A.rs"]
    assert parse_resource_scope("patient/Condition.xyz") is None
    assert parse_resource_scope("patient/Condition.write") is not None


def test_client_registration_validates_its_shape(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="client_type"):
        ClientRegistration("x", client_type="confidential")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="needs a secret"):
        ClientRegistration("x", client_type="confidential-symmetric")
    with pytest.raises(ValueError, match="inline jwks"):
        ClientRegistration("x", client_type="confidential-asymmetric")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        create_auth_app(AuthServerConfig(issuer="http://127.0.0.1:1", data_file=tmp_path / "missing.json"))
