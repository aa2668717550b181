"""SandboxEHR end to end: the real auth server thread plus the real Node FHIR server on loopback ports."""

from __future__ import annotations

import base64
import hashlib
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from sandbox.auth.config import DEMO_CLIENT_ID, ClientRegistration
from sandbox.run import SandboxEHR, callback_for

APP_LAUNCH_URL = "http://127.0.0.1:8790/launch"
REDIRECT_URI = callback_for(APP_LAUNCH_URL)


@pytest.fixture(scope="module")
def sandbox() -> Iterator[SandboxEHR]:
    with SandboxEHR(app_launch_url=APP_LAUNCH_URL) as running:
        yield running


@pytest.fixture(autouse=True)
def well_behaved(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if "sandbox" in request.fixturenames:
        request.getfixturevalue("sandbox").misbehave.reset()


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(follow_redirects=False, timeout=15) as client:
        yield client


def launch_and_exchange(sandbox: SandboxEHR, http: httpx.Client, *, patient: str = "pat-1") -> dict[str, str]:
    launch = sandbox.create_launch(patient, "prac-1")
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    discovery = http.get(f"{sandbox.fhir_base}/.well-known/smart-configuration").json()
    authorize = http.get(
        discovery["authorization_endpoint"],
        params={
            "response_type": "code",
            "client_id": DEMO_CLIENT_ID,
            "redirect_uri": REDIRECT_URI,
            "scope": "launch openid fhirUser patient/Condition.rs patient/Patient.rs",
            "state": "s" * 22,
            "aud": sandbox.fhir_base,
            "launch": launch,
            "code_challenge": challenge,
            "code_challenge_method": "S256",
            "nonce": "n" * 22,
        },
    )
    assert authorize.status_code == 302, authorize.text
    code = parse_qs(urlsplit(authorize.headers["location"]).query)["code"][0]
    token = http.post(
        discovery["token_endpoint"],
        data={
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": REDIRECT_URI,
            "client_id": DEMO_CLIENT_ID,
            "code_verifier": verifier,
        },
    )
    assert token.status_code == 200, token.text
    body: dict[str, str] = token.json()
    return body


def test_urls_point_at_running_loopback_servers(sandbox: SandboxEHR, http: httpx.Client) -> None:
    assert sandbox.fhir_base.startswith("http://127.0.0.1:")
    assert sandbox.fhir_base.endswith("/fhir")
    assert sandbox.auth_base.startswith("http://127.0.0.1:")
    assert sandbox.ehr_url == f"{sandbox.auth_base}/ehr"
    assert sandbox.fhir.base_url == sandbox.fhir_base
    page = http.get(sandbox.ehr_url)
    assert page.status_code == 200
    assert "Alice Chen" in page.text


def test_fhir_server_serves_the_auth_servers_smart_configuration(
    sandbox: SandboxEHR, http: httpx.Client
) -> None:
    at_fhir = http.get(f"{sandbox.fhir_base}/.well-known/smart-configuration").json()
    at_auth = http.get(f"{sandbox.auth_base}/.well-known/smart-configuration").json()
    assert at_fhir == at_auth
    assert at_fhir["issuer"] == sandbox.auth_base


def test_misbehaviour_reaches_the_fhir_servers_discovery_document(
    sandbox: SandboxEHR, http: httpx.Client
) -> None:
    sandbox.misbehave.foreign_issuer = True
    assert (
        http.get(f"{sandbox.fhir_base}/.well-known/smart-configuration").json()["issuer"] != sandbox.auth_base
    )
    sandbox.misbehave.reset()
    assert (
        http.get(f"{sandbox.fhir_base}/.well-known/smart-configuration").json()["issuer"] == sandbox.auth_base
    )


def test_ehr_launch_token_reads_the_patients_conditions(sandbox: SandboxEHR, http: httpx.Client) -> None:
    body = launch_and_exchange(sandbox, http, patient="pat-2")
    assert body["patient"] == "pat-2"
    headers = {"Authorization": f"Bearer {body['access_token']}"}
    patient = http.get(f"{sandbox.fhir_base}/Patient/pat-2", headers=headers)
    assert patient.status_code == 200, patient.text
    assert patient.json()["id"] == "pat-2"
    conditions = http.get(f"{sandbox.fhir_base}/Condition", params={"patient": "pat-2"}, headers=headers)
    assert conditions.status_code == 200, conditions.text
    assert conditions.json()["resourceType"] == "Bundle"


def test_minted_tokens_are_accepted_and_wrong_audience_is_not(
    sandbox: SandboxEHR, http: httpx.Client
) -> None:
    good = http.get(
        f"{sandbox.fhir_base}/Patient/pat-1", headers={"Authorization": f"Bearer {sandbox.mint_token()}"}
    )
    assert good.status_code == 200, good.text
    wrong = sandbox.mint_token(aud="http://127.0.0.1:1/fhir")
    refused = http.get(f"{sandbox.fhir_base}/Patient/pat-1", headers={"Authorization": f"Bearer {wrong}"})
    assert refused.status_code == 401
    assert http.get(f"{sandbox.fhir_base}/Patient/pat-1").status_code == 401


def test_short_lived_access_token_stops_working(sandbox: SandboxEHR, http: httpx.Client) -> None:
    sandbox.misbehave.access_token_lifetime = 1
    body = launch_and_exchange(sandbox, http)
    assert int(body["expires_in"]) == 1
    time.sleep(2.1)
    expired = http.get(
        f"{sandbox.fhir_base}/Patient/pat-1", headers={"Authorization": f"Bearer {body['access_token']}"}
    )
    assert expired.status_code == 401


def test_set_app_launch_url_and_register_client(sandbox: SandboxEHR, http: httpx.Client) -> None:
    sandbox.set_app_launch_url("http://127.0.0.1:8791/launch")
    try:
        assert "http://127.0.0.1:8791/callback" in sandbox.server.clients[DEMO_CLIENT_ID].redirect_uris
        page = http.post(
            f"{sandbox.auth_base}/ehr/launch", data={"patient": "pat-1", "practitioner": "prac-2"}
        )
        assert 'src="http://127.0.0.1:8791/launch?iss=' in page.text
    finally:
        sandbox.set_app_launch_url(APP_LAUNCH_URL)
    sandbox.register_client(
        ClientRegistration("second-app", redirect_uris=["http://127.0.0.1:8792/callback"])
    )
    response = http.get(
        f"{sandbox.auth_base}/authorize",
        params={"response_type": "code", "client_id": "second-app", "redirect_uri": "http://127.0.0.1:8792/callback",
                "scope": "openid", "state": "x" * 22, "aud": sandbox.fhir_base},
    )  # fmt: skip
    # The client is known now, so the missing PKCE comes back as an error redirect rather than an error page.
    assert response.status_code == 302
    assert "error=invalid_request" in response.headers["location"]


def test_fhir_profile_switches_at_run_time(sandbox: SandboxEHR) -> None:
    sandbox.fhir.set_profile("no-transactions")
    try:
        assert sandbox.fhir.get_profile() == "no-transactions"
    finally:
        sandbox.fhir.set_profile("generic")


def test_sandbox_properties_refuse_use_before_start() -> None:
    idle = SandboxEHR()
    with pytest.raises(RuntimeError, match="not running"):
        _ = idle.fhir_base
    with pytest.raises(RuntimeError, match="not running"):
        _ = idle.fhir


def test_module_entry_prints_urls_and_cleans_up_on_sigterm() -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "sandbox.run", "--app-launch-url", "http://127.0.0.1:8793/launch"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    try:
        assert process.stdout is not None
        printed: dict[str, str] = {}
        for line in iter(process.stdout.readline, ""):
            if line.startswith("Press"):
                break
            label, _, value = line.partition(":")
            printed[label.strip()] = value.strip()
        page = httpx.get(printed["EHR page"], timeout=10)
        assert page.status_code == 200
        assert "Launch CareCanvas" in page.text
        discovery = httpx.get(f"{printed['FHIR base']}/.well-known/smart-configuration", timeout=10).json()
        assert discovery["issuer"] == printed["Auth issuer"]
        smart_config_file = Path(printed["Discovery"])
        assert smart_config_file.exists()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0
        assert not smart_config_file.exists()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        for stream in (process.stdout, process.stderr):
            if stream is not None:
                stream.close()
