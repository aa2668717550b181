"""The sandbox FHIR server over real HTTP: auth, scopes, compartments, paging, writes, profiles, admin."""

from __future__ import annotations

import base64
import copy
import json
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from sandbox.fhir_process import DEFAULT_DATA_FILE, SERVER_DIR, FhirServerError, FhirServerProcess

ISSUER = "http://127.0.0.1/test-auth"
FHIR_JSON = {"content-type": "application/fhir+json"}


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _int_b64(value: int) -> str:
    return _b64url(value.to_bytes((value.bit_length() + 7) // 8, "big"))


class Signer:
    """An RSA key that signs RS256 JWTs and publishes its public JWK."""

    def __init__(self, kid: str) -> None:
        self.kid = kid
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)

    def jwk(self) -> dict[str, str]:
        numbers = self.key.public_key().public_numbers()
        return {
            "kty": "RSA",
            "kid": self.kid,
            "alg": "RS256",
            "use": "sig",
            "n": _int_b64(numbers.n),
            "e": _int_b64(numbers.e),
        }

    def sign(self, claims: dict[str, Any]) -> str:
        header = {"alg": "RS256", "typ": "JWT", "kid": self.kid}
        signing_input = f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
        signature = self.key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        return f"{signing_input}.{_b64url(signature)}"


@pytest.fixture(scope="module")
def fhir_server_signer() -> Signer:
    return Signer("test-key-1")


@pytest.fixture(scope="module")
def fhir_server_jwks_url(fhir_server_signer: Signer) -> Iterator[str]:
    body = json.dumps({"keys": [fhir_server_signer.jwk()]}).encode()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/jwks.json"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def fhir_server_smart_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("smart") / "smart-configuration.json"
    path.write_text(
        json.dumps(
            {
                "issuer": ISSUER,
                "authorization_endpoint": "http://127.0.0.1/test-auth/authorize",
                "token_endpoint": "http://127.0.0.1/test-auth/token",
                "capabilities": ["launch-ehr"],
            }
        )
    )
    return path


@pytest.fixture(scope="module")
def fhir_server_process(
    fhir_server_jwks_url: str, fhir_server_smart_config: Path
) -> Iterator[FhirServerProcess]:
    with FhirServerProcess(
        jwks_url=fhir_server_jwks_url, issuer=ISSUER, smart_config_file=fhir_server_smart_config
    ) as server:
        yield server


_open_clients: list[httpx.Client] = []


@pytest.fixture
def fhir_server(fhir_server_process: FhirServerProcess) -> Iterator[FhirServerProcess]:
    fhir_server_process.set_profile("generic")
    fhir_server_process.reset()
    yield fhir_server_process
    while _open_clients:
        _open_clients.pop().close()


@pytest.fixture
def fhir_server_token(fhir_server_signer: Signer, fhir_server_process: FhirServerProcess):
    def make(scope: str = "user/*.*", *, patient: str | None = None, **overrides: Any) -> str:
        claims: dict[str, Any] = {
            "iss": ISSUER,
            "aud": fhir_server_process.base_url,
            "exp": int(time.time()) + 300,
            "scope": scope,
            "client_id": "carecanvas-test",
        }
        if patient is not None:
            claims["patient"] = patient
        claims.update(overrides)
        return fhir_server_signer.sign(claims)

    return make


def client(server: FhirServerProcess, token: str | None) -> httpx.Client:
    headers = {"accept": "application/fhir+json"}
    if token is not None:
        headers["authorization"] = f"Bearer {token}"
    http = httpx.Client(base_url=server.base_url, headers=headers, timeout=20.0)
    _open_clients.append(http)
    return http


def diagnostics(response: httpx.Response) -> str:
    body = response.json()
    assert body["resourceType"] == "OperationOutcome"
    assert response.headers["content-type"].startswith("application/fhir+json")
    return body["issue"][0]["diagnostics"]


def a_condition(patient: str = "pat-2", **extra: Any) -> dict[str, Any]:
    return {
        "resourceType": "Condition",
        "subject": {"reference": f"Patient/{patient}"},
        "code": {"text": "Test condition"},
        **extra,
    }


def a_document(
    patient: str, *, content_type: str = "application/pdf", data: bytes = b"%PDF-1.4"
) -> dict[str, Any]:
    return {
        "resourceType": "DocumentReference",
        "status": "current",
        "subject": {"reference": f"Patient/{patient}"},
        "content": [{"attachment": {"contentType": content_type, "data": base64.b64encode(data).decode()}}],
    }


# --- metadata and SMART configuration -----------------------------------------------------------------------


def test_metadata_is_public_and_offers_transactions(fhir_server: FhirServerProcess) -> None:
    response = client(fhir_server, None).get("/metadata")
    assert response.status_code == 200
    capability = response.json()
    assert capability["resourceType"] == "CapabilityStatement"
    assert {"code": "transaction"} in capability["rest"][0]["interaction"]
    oauth = capability["rest"][0]["security"]["extension"][0]["extension"]
    assert {"url": "token", "valueUri": "http://127.0.0.1/test-auth/token"} in oauth


def test_smart_configuration_is_served_verbatim(
    fhir_server: FhirServerProcess, fhir_server_smart_config: Path
) -> None:
    response = client(fhir_server, None).get("/.well-known/smart-configuration")
    assert response.status_code == 200
    assert response.text == fhir_server_smart_config.read_text()


# --- authentication -----------------------------------------------------------------------------------------


def test_read_without_token_is_401_with_challenge(fhir_server: FhirServerProcess) -> None:
    response = client(fhir_server, None).get("/Patient/pat-1")
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert "Bearer" in diagnostics(response)


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("wrong-key", "signature"),
        ("expired", "expired"),
        ("wrong-aud", "audience"),
        ("wrong-iss", "issuer"),
        ("garbage", "not a valid"),
    ],
)
def test_bad_tokens_are_401(
    fhir_server: FhirServerProcess, fhir_server_token, case: str, expected: str
) -> None:
    if case == "wrong-key":
        token = Signer("test-key-1").sign(
            {"iss": ISSUER, "aud": fhir_server.base_url, "exp": int(time.time()) + 60, "scope": "user/*.*"}
        )
    elif case == "expired":
        token = fhir_server_token(exp=int(time.time()) - 120)
    elif case == "wrong-aud":
        token = fhir_server_token(aud="http://127.0.0.1:1/fhir")
    elif case == "wrong-iss":
        token = fhir_server_token(iss="http://evil.example")
    else:
        token = "not.a.jwt"
    response = client(fhir_server, token).get("/Patient/pat-1")
    assert response.status_code == 401
    assert 'error="invalid_token"' in response.headers["www-authenticate"]
    assert expected in diagnostics(response)
    assert token not in response.text


# --- read and search ----------------------------------------------------------------------------------------


def test_read_patient(fhir_server: FhirServerProcess, fhir_server_token) -> None:
    response = client(fhir_server, fhir_server_token()).get("/Patient/pat-1")
    assert response.status_code == 200
    assert response.json()["id"] == "pat-1"
    assert response.headers["etag"].startswith('W/"')


def test_read_missing_is_404(fhir_server: FhirServerProcess, fhir_server_token) -> None:
    response = client(fhir_server, fhir_server_token()).get("/Condition/does-not-exist")
    assert response.status_code == 404
    diagnostics(response)


def _all_pages(http: httpx.Client, url: str, params: dict[str, str]) -> tuple[list[dict[str, Any]], int]:
    response = http.get(url, params=params)
    pages = 0
    found: list[dict[str, Any]] = []
    while True:
        assert response.status_code == 200, response.text
        bundle = response.json()
        pages += 1
        found += [entry["resource"] for entry in bundle.get("entry", [])]
        next_links = [link["url"] for link in bundle["link"] if link["relation"] == "next"]
        if not next_links:
            return found, pages
        assert next_links[0].startswith(http.base_url.__str__().rstrip("/"))
        response = http.get(next_links[0])


def test_search_pages_through_all_conditions_of_a_patient(
    fhir_server: FhirServerProcess, fhir_server_token
) -> None:
    data = json.loads(DEFAULT_DATA_FILE.read_text())
    expected = {
        entry["resource"]["id"]
        for entry in data["entry"]
        if entry["resource"]["resourceType"] == "Condition"
        and entry["resource"]["subject"]["reference"] == "Patient/pat-1"
    }
    assert len(expected) > 5
    http = client(fhir_server, fhir_server_token())
    found, pages = _all_pages(http, "/Condition", {"patient": "pat-1", "_count": "5"})
    assert sorted(resource["id"] for resource in found) == sorted(expected)
    assert pages == -(-len(expected) // 5)
    first = http.get("/Condition", params={"patient": "Patient/pat-1", "_count": "5"}).json()
    assert first["total"] == len(expected)
    assert first["link"][0]["relation"] == "self"


def test_search_filters(fhir_server: FhirServerProcess, fhir_server_token) -> None:
    http = client(fhir_server, fhir_server_token())
    active = http.get("/Condition", params={"subject": "Patient/pat-1", "clinical-status": "active"}).json()
    assert active["total"] > 0
    assert all(e["resource"]["clinicalStatus"]["coding"][0]["code"] == "active" for e in active["entry"])
    resolved = http.get("/Condition", params={"patient": "pat-1", "clinical-status": "resolved"}).json()
    assert (
        active["total"] + resolved["total"]
        == http.get("/Condition", params={"patient": "pat-1"}).json()["total"]
    )
    by_id = http.get("/Condition", params={"_id": "cond-2-asthma"}).json()
    assert [e["resource"]["id"] for e in by_id["entry"]] == ["cond-2-asthma"]
    category = http.get("/Condition", params={"patient": "pat-1", "category": "encounter-diagnosis"}).json()
    assert {e["resource"]["id"] for e in category["entry"]} == {"cond-1-uti", "cond-1-back-pain"}
    mrn = http.get("/Patient", params={"identifier": "urn:oid:2.16.840.1.113883.19.5|MRN-1003"}).json()
    assert [e["resource"]["id"] for e in mrn["entry"]] == ["pat-3"]


def test_search_default_and_maximum_page_size(fhir_server: FhirServerProcess, fhir_server_token) -> None:
    http = client(fhir_server, fhir_server_token())
    default = http.get("/Condition").json()
    assert len(default["entry"]) == 20
    assert default["total"] == 30
    big = http.get("/Condition", params={"_count": "1000"}).json()
    assert len(big["entry"]) == 30
    assert "_count=100" in big["link"][0]["url"]


def test_search_rejects_unknown_parameter_and_bad_page_token(
    fhir_server: FhirServerProcess, fhir_server_token
) -> None:
    http = client(fhir_server, fhir_server_token())
    unknown = http.get("/Condition", params={"colour": "blue"})
    assert unknown.status_code == 400
    assert "colour" in diagnostics(unknown)
    bad_token = http.get("/Condition", params={"_page_token": "forged"})
    assert bad_token.status_code == 400
    assert "_page_token" in diagnostics(bad_token)
    bad_count = http.get("/Condition", params={"_count": "two"})
    assert bad_count.status_code == 400


def test_provenance_target_search(fhir_server: FhirServerProcess, fhir_server_token) -> None:
    http = client(fhir_server, fhir_server_token())
    provenance = {
        "resourceType": "Provenance",
        "target": [{"reference": "Condition/cond-2-asthma"}],
        "recorded": "2026-11-21T10:00:00Z",
        "agent": [{"who": {"reference": "Practitioner/prac-1"}}],
    }
    assert http.post("/Provenance", json=provenance, headers=FHIR_JSON).status_code == 201
    found = http.get("/Provenance", params={"target": "Condition/cond-2-asthma"}).json()
    assert found["total"] == 1


# --- scopes and patient compartment -------------------------------------------------------------------------


def test_patient_token_is_limited_to_its_patient(fhir_server: FhirServerProcess, fhir_server_token) -> None:
    http = client(fhir_server, fhir_server_token("patient/*.read", patient="pat-2"))
    assert http.get("/Patient/pat-2").status_code == 200
    assert http.get("/Condition/cond-2-asthma").status_code == 200
    other = http.get("/Condition/cond-1-diabetes")
    assert other.status_code == 403
    assert http.get("/Patient/pat-1").status_code == 403
    everything = http.get("/Condition", params={"_count": "100"}).json()
    assert everything["total"] > 0
    assert {e["resource"]["subject"]["reference"] for e in everything["entry"]} == {"Patient/pat-2"}
    assert http.get("/Condition", params={"patient": "pat-1"}).json()["total"] == 0
    # Practitioners are not patient data: readable with patient/*.read.
    assert http.get("/Practitioner/prac-1").status_code == 200


def test_patient_token_writes_must_reference_its_patient(
    fhir_server: FhirServerProcess, fhir_server_token
) -> None:
    http = client(fhir_server, fhir_server_token("patient/Condition.cruds", patient="pat-2"))
    assert http.post("/Condition", json=a_condition("pat-2"), headers=FHIR_JSON).status_code == 201
    refused = http.post("/Condition", json=a_condition("pat-1"), headers=FHIR_JSON)
    assert refused.status_code == 403
    assert "patient" in diagnostics(refused)
    overwrite = http.put(
        "/Condition/cond-1-diabetes", json=a_condition("pat-2", id="cond-1-diabetes"), headers=FHIR_JSON
    )
    assert overwrite.status_code == 403


def test_patient_scope_without_patient_claim_is_403(
    fhir_server: FhirServerProcess, fhir_server_token
) -> None:
    response = client(fhir_server, fhir_server_token("patient/Condition.read")).get(
        "/Condition/cond-2-asthma"
    )
    assert response.status_code == 403
    assert "patient claim" in diagnostics(response)


@pytest.mark.parametrize(
    ("scope", "read_status", "search_status", "create_status"),
    [
        ("user/Condition.read", 200, 200, 403),
        ("user/Condition.write", 403, 403, 201),
        ("user/Condition.rs", 200, 200, 403),
        ("user/Condition.r", 200, 403, 403),
        ("user/Condition.s", 403, 200, 403),
        ("user/Condition.c", 403, 403, 201),
        ("user/Condition.cruds", 200, 200, 201),
        ("user/Patient.read openid fhirUser", 403, 403, 403),
        ("user/Condition.rs?category=problem-list-item", 403, 403, 403),
    ],
)
def test_v1_and_v2_scopes(
    fhir_server: FhirServerProcess,
    fhir_server_token,
    scope: str,
    read_status: int,
    search_status: int,
    create_status: int,
) -> None:
    http = client(fhir_server, fhir_server_token(scope))
    assert http.get("/Condition/cond-2-asthma").status_code == read_status
    assert http.get("/Condition", params={"patient": "pat-2"}).status_code == search_status
    created = http.post("/Condition", json=a_condition(), headers=FHIR_JSON)
    assert created.status_code == create_status
    if create_status == 403:
        assert "scope" in diagnostics(created)


# --- writes -------------------------------------------------------------------------------------------------


def test_create_assigns_id_and_location(fhir_server: FhirServerProcess, fhir_server_token) -> None:
    http = client(fhir_server, fhir_server_token())
    response = http.post("/Condition", json=a_condition(id="client-chosen"), headers=FHIR_JSON)
    assert response.status_code == 201
    created = response.json()
    assert created["id"] != "client-chosen"
    assert response.headers["location"].startswith(
        f"{fhir_server.base_url}/Condition/{created['id']}/_history/"
    )
    assert http.get(f"/Condition/{created['id']}").json()["code"]["text"] == "Test condition"


def test_update(fhir_server: FhirServerProcess, fhir_server_token) -> None:
    http = client(fhir_server, fhir_server_token())
    condition = http.get("/Condition/cond-2-asthma").json()
    condition["clinicalStatus"]["coding"][0]["code"] = "resolved"
    response = http.put("/Condition/cond-2-asthma", json=condition, headers=FHIR_JSON)
    assert response.status_code == 200
    assert http.get("/Condition/cond-2-asthma").json()["clinicalStatus"]["coding"][0]["code"] == "resolved"
    mismatch = http.put("/Condition/cond-1-gerd", json=condition, headers=FHIR_JSON)
    assert mismatch.status_code == 400


@pytest.mark.parametrize(
    ("resource", "expected"),
    [
        (
            {"resourceType": "Condition", "subject": {"reference": "Patient/pat-1"}, "colour": "blue"},
            "colour",
        ),
        ({"resourceType": "Condition"}, "subject"),
        (
            {
                "resourceType": "Condition",
                "subject": {"reference": "Patient/pat-1"},
                "onsetDateTime": "yesterday",
            },
            "onset",
        ),
    ],
)
def test_invalid_resource_is_400(
    fhir_server: FhirServerProcess, fhir_server_token, resource: dict, expected: str
) -> None:
    http = client(fhir_server, fhir_server_token())
    response = http.post("/Condition", json=resource, headers=FHIR_JSON)
    assert response.status_code == 400
    assert expected in diagnostics(response)
    assert http.get("/Condition", params={"_count": "0"}).json()["total"] == 30


def test_non_json_body_is_400(fhir_server: FhirServerProcess, fhir_server_token) -> None:
    response = client(fhir_server, fhir_server_token()).post(
        "/Condition", content=b"{not json", headers=FHIR_JSON
    )
    assert response.status_code == 400
    assert "JSON" in diagnostics(response)


def test_conditional_create(fhir_server: FhirServerProcess, fhir_server_token) -> None:
    http = client(fhir_server, fhir_server_token())
    document = a_document("pat-2")
    document["identifier"] = [{"system": "urn:carecanvas:doc", "value": "abc"}]
    condition_header = {**FHIR_JSON, "if-none-exist": "identifier=urn:carecanvas:doc|abc"}
    first = http.post("/DocumentReference", json=document, headers=condition_header)
    second = http.post("/DocumentReference", json=document, headers=condition_header)
    assert (first.status_code, second.status_code) == (201, 200)
    assert first.json()["id"] == second.json()["id"]
    found = http.get("/DocumentReference", params={"identifier": "urn:carecanvas:doc|abc"}).json()
    assert found["total"] == 1
    # Two matches: the server cannot tell which one is meant.
    http.post("/DocumentReference", json=document, headers=FHIR_JSON)
    ambiguous = http.post("/DocumentReference", json=document, headers=condition_header)
    assert ambiguous.status_code == 412
    diagnostics(ambiguous)


def _transaction(
    patient: str, *, bad_entry: bool = False, if_none_exist: str | None = None
) -> dict[str, Any]:
    document_url = "urn:uuid:6f1c0b52-8d49-4b4e-9a57-3a3b1f1d0c11"
    document = a_document(patient)
    document["identifier"] = [{"system": "urn:carecanvas:doc", "value": "tx-1"}]
    provenance = {
        "resourceType": "Provenance",
        "target": [{"reference": document_url}],
        "recorded": "2026-11-21T10:00:00Z",
        "agent": [{"who": {"reference": "Practitioner/prac-1"}}],
    }
    if bad_entry:
        provenance["recorded"] = "not a date"
    document_request: dict[str, Any] = {"method": "POST", "url": "DocumentReference"}
    if if_none_exist:
        document_request["ifNoneExist"] = if_none_exist
    return {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"fullUrl": document_url, "resource": document, "request": document_request},
            {
                "fullUrl": "urn:uuid:0b0d9a43-52f2-4a0c-8a38-1b7f7e0a4d22",
                "resource": provenance,
                "request": {"method": "POST", "url": "Provenance"},
            },
        ],
    }


def test_transaction_rewrites_urn_uuid_references(fhir_server: FhirServerProcess, fhir_server_token) -> None:
    http = client(fhir_server, fhir_server_token())
    response = http.post("", json=_transaction("pat-3"), headers=FHIR_JSON)
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["type"] == "transaction-response"
    statuses = [entry["response"]["status"] for entry in result["entry"]]
    assert statuses == ["201", "201"]
    document_id = result["entry"][0]["resource"]["id"]
    provenance = http.get("/Provenance", params={"target": f"DocumentReference/{document_id}"}).json()
    assert provenance["total"] == 1


def test_transaction_if_none_exist_reuses_the_existing_document(
    fhir_server: FhirServerProcess, fhir_server_token
) -> None:
    http = client(fhir_server, fhir_server_token())
    first = http.post(
        "", json=_transaction("pat-3", if_none_exist="identifier=urn:carecanvas:doc|tx-1"), headers=FHIR_JSON
    )
    second = http.post(
        "", json=_transaction("pat-3", if_none_exist="identifier=urn:carecanvas:doc|tx-1"), headers=FHIR_JSON
    )
    assert first.status_code == second.status_code == 200
    first_id = first.json()["entry"][0]["resource"]["id"]
    assert second.json()["entry"][0]["resource"]["id"] == first_id
    assert second.json()["entry"][0]["response"]["status"] == "200"
    assert (
        http.get("/DocumentReference", params={"identifier": "urn:carecanvas:doc|tx-1"}).json()["total"] == 1
    )
    # The second Provenance points at the existing document, not at a dangling urn:uuid.
    provenances = http.get("/Provenance", params={"target": f"DocumentReference/{first_id}"}).json()
    assert provenances["total"] == 2


def test_transaction_with_a_bad_entry_creates_nothing(
    fhir_server: FhirServerProcess, fhir_server_token
) -> None:
    http = client(fhir_server, fhir_server_token())
    response = http.post("", json=_transaction("pat-3", bad_entry=True), headers=FHIR_JSON)
    assert response.status_code == 400
    assert "recorded" in diagnostics(response)
    assert http.get("/DocumentReference", params={"patient": "pat-3"}).json()["total"] == 0
    assert http.get("/Provenance").json()["total"] == 0


def test_transaction_entry_needs_scope(fhir_server: FhirServerProcess, fhir_server_token) -> None:
    http = client(fhir_server, fhir_server_token("user/DocumentReference.cruds"))
    response = http.post("", json=_transaction("pat-3"), headers=FHIR_JSON)
    assert response.status_code == 403
    assert "Provenance" in diagnostics(response)
    assert client(fhir_server, fhir_server_token()).get("/DocumentReference").json()["total"] == 0


def test_transaction_read_entries_are_refused(fhir_server: FhirServerProcess, fhir_server_token) -> None:
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [{"request": {"method": "GET", "url": "Patient/pat-1"}}],
    }
    response = client(fhir_server, fhir_server_token()).post("", json=bundle, headers=FHIR_JSON)
    assert response.status_code == 400
    assert "POST" in diagnostics(response)


def test_request_body_limit_is_413(fhir_server: FhirServerProcess, fhir_server_token) -> None:
    huge = (
        b'{"resourceType": "Binary", "contentType": "text/plain", "data": "'
        + b"A" * (20 * 1024 * 1024)
        + b'"}'
    )
    response = client(fhir_server, fhir_server_token()).post("/Binary", content=huge, headers=FHIR_JSON)
    assert response.status_code == 413
    assert "Binary" in diagnostics(response)


# --- profiles -----------------------------------------------------------------------------------------------


def test_no_transactions_profile(fhir_server: FhirServerProcess, fhir_server_token) -> None:
    fhir_server.set_profile("no-transactions")
    http = client(fhir_server, fhir_server_token())
    interactions = http.get("/metadata").json()["rest"][0]["interaction"]
    assert {"code": "transaction"} not in interactions
    response = http.post("", json=_transaction("pat-3"), headers=FHIR_JSON)
    assert response.status_code == 501
    assert "one at a time" in diagnostics(response)
    assert http.get("/DocumentReference").json()["total"] == 0
    assert http.post("/DocumentReference", json=a_document("pat-3"), headers=FHIR_JSON).status_code == 201


def test_pdf_only_profile(fhir_server: FhirServerProcess, fhir_server_token) -> None:
    fhir_server.set_profile("pdf-only")
    http = client(fhir_server, fhir_server_token())
    document_extensions = next(
        resource["extension"]
        for resource in http.get("/metadata").json()["rest"][0]["resource"]
        if resource["type"] == "DocumentReference"
    )
    assert {e["valueCode"] for e in document_extensions} == {
        "application/pdf",
        "text/plain",
        "text/html",
        "application/xhtml+xml",
    }
    png = http.post(
        "/DocumentReference", json=a_document("pat-3", content_type="image/png"), headers=FHIR_JSON
    )
    assert png.status_code == 400
    assert "image/png" in diagnostics(png)
    assert http.post("/DocumentReference", json=a_document("pat-3"), headers=FHIR_JSON).status_code == 201
    mixed = a_document("pat-3")
    mixed["content"].append(copy.deepcopy(a_document("pat-3", content_type="image/png")["content"][0]))
    mixed_response = http.post(
        "",
        json={
            "resourceType": "Bundle",
            "type": "transaction",
            "entry": [{"resource": mixed, "request": {"method": "POST", "url": "DocumentReference"}}],
        },
        headers=FHIR_JSON,
    )
    assert mixed_response.status_code == 400
    assert http.get("/DocumentReference").json()["total"] == 1


def test_small_inline_profile(fhir_server: FhirServerProcess, fhir_server_token) -> None:
    fhir_server.set_profile("small-inline")
    http = client(fhir_server, fhir_server_token())
    big = b"\x89PNG" + b"\x00" * (64 * 1024)
    inline = http.post(
        "/DocumentReference", json=a_document("pat-3", content_type="image/png", data=big), headers=FHIR_JSON
    )
    assert inline.status_code == 413
    assert "Binary" in diagnostics(inline)
    small = http.post("/DocumentReference", json=a_document("pat-3", data=b"%PDF" * 100), headers=FHIR_JSON)
    assert small.status_code == 201
    binary = http.post(
        "/Binary",
        json={"resourceType": "Binary", "contentType": "image/png", "data": base64.b64encode(big).decode()},
        headers=FHIR_JSON,
    )
    assert binary.status_code == 201
    document = a_document("pat-3", content_type="image/png")
    del document["content"][0]["attachment"]["data"]
    document["content"][0]["attachment"]["url"] = f"Binary/{binary.json()['id']}"
    assert http.post("/DocumentReference", json=document, headers=FHIR_JSON).status_code == 201


def test_commit_then_503_profile(fhir_server: FhirServerProcess, fhir_server_token) -> None:
    fhir_server.set_profile("commit-then-503")
    http = client(fhir_server, fhir_server_token())
    document = a_document("pat-4")
    document["identifier"] = [{"system": "urn:carecanvas:doc", "value": "lost-answer"}]
    first = http.post("/DocumentReference", json=document, headers=FHIR_JSON)
    assert first.status_code == 503
    diagnostics(first)
    stored = http.get("/DocumentReference", params={"identifier": "urn:carecanvas:doc|lost-answer"}).json()
    assert stored["total"] == 1
    header = {**FHIR_JSON, "if-none-exist": "identifier=urn:carecanvas:doc|lost-answer"}
    retry = http.post("/DocumentReference", json=document, headers=header)
    assert retry.status_code == 200
    assert retry.json()["id"] == stored["entry"][0]["resource"]["id"]


def test_commit_then_503_applies_to_transactions(fhir_server: FhirServerProcess, fhir_server_token) -> None:
    fhir_server.set_profile("commit-then-503")
    http = client(fhir_server, fhir_server_token())
    assert http.post("", json=_transaction("pat-5"), headers=FHIR_JSON).status_code == 503
    assert http.get("/DocumentReference", params={"patient": "pat-5"}).json()["total"] == 1
    assert http.post("", json=_transaction("pat-5"), headers=FHIR_JSON).status_code == 200


def test_profile_can_be_chosen_at_start(fhir_server_jwks_url: str) -> None:
    with FhirServerProcess(jwks_url=fhir_server_jwks_url, issuer=ISSUER, profile="no-transactions") as server:
        assert server.get_profile() == "no-transactions"
        capability = httpx.get(f"{server.base_url}/metadata").json()
        assert {"code": "transaction"} not in capability["rest"][0]["interaction"]


def test_unknown_profile_is_refused(fhir_server: FhirServerProcess) -> None:
    response = httpx.put(f"{fhir_server.admin_url}/profile", json={"profile": "fast"})
    assert response.status_code == 400
    assert "generic" in response.json()["issue"][0]["diagnostics"]
    with pytest.raises(ValueError, match="allowed"):
        fhir_server.set_profile("fast")


# --- admin API and process lifecycle ---------------------------------------------------------------------


def test_requests_log_and_reset(fhir_server: FhirServerProcess, fhir_server_token) -> None:
    http = client(fhir_server, fhir_server_token())
    http.get("/Condition", params={"patient": "pat-1"})
    http.get("/Patient/nope")
    created = http.post("/Condition", json=a_condition(), headers=FHIR_JSON).json()
    log = fhir_server.requests()
    assert log == [
        {"method": "GET", "path": "/fhir/Condition", "status": 200},
        {"method": "GET", "path": "/fhir/Patient/nope", "status": 404},
        {"method": "POST", "path": "/fhir/Condition", "status": 201},
    ]
    fhir_server.reset()
    assert fhir_server.requests() == []
    assert http.get(f"/Condition/{created['id']}").status_code == 404


def test_process_stops_when_context_exits(fhir_server_jwks_url: str) -> None:
    with FhirServerProcess(jwks_url=fhir_server_jwks_url, issuer=ISSUER) as server:
        process = server.process
        assert process is not None
        assert httpx.get(f"{server.base_url}/metadata").status_code == 200
    assert process.poll() is not None
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{server.base_url}/metadata")


def test_server_exits_when_its_stdin_closes(fhir_server_jwks_url: str) -> None:
    server = FhirServerProcess(jwks_url=fhir_server_jwks_url, issuer=ISSUER).start()
    try:
        assert server.process is not None
        assert server.process.stdin is not None
        server.process.stdin.close()
        assert server.process.wait(10) == 0
    finally:
        server.stop()


def test_invalid_data_file_fails_start_with_the_reason(fhir_server_jwks_url: str, tmp_path: Path) -> None:
    data = tmp_path / "bad.json"
    data.write_text(
        json.dumps(
            {
                "resourceType": "Bundle",
                "type": "collection",
                "entry": [{"resource": {"resourceType": "Patient", "id": "p", "gender": 7}}],
            }
        )
    )
    with pytest.raises(FhirServerError, match="Patient/p"):
        FhirServerProcess(jwks_url=fhir_server_jwks_url, issuer=ISSUER, data_file=data).start()


def test_unknown_profile_at_construction() -> None:
    with pytest.raises(ValueError, match="allowed"):
        FhirServerProcess(jwks_url="http://127.0.0.1:1/jwks", issuer=ISSUER, profile="fast")


def test_unsupported_requests_are_operation_outcomes(
    fhir_server: FhirServerProcess, fhir_server_token
) -> None:
    http = client(fhir_server, fhir_server_token())
    malformed = http.get("/Patient/%E0%A4%A")
    assert malformed.status_code == 400
    assert "percent-encoding" in diagnostics(malformed)
    delete = http.delete("/Condition/cond-2-asthma")
    assert delete.status_code == 405
    assert "DELETE" in diagnostics(delete)
    unknown_type = http.get("/Spaceship/1")
    assert unknown_type.status_code == 404
    assert "Spaceship" in diagnostics(unknown_type)
    not_a_bundle = http.post("", json={"resourceType": "Bundle", "type": "collection"}, headers=FHIR_JSON)
    assert not_a_bundle.status_code == 400
    # The server is still up after all of that.
    assert http.get("/Patient/pat-1").status_code == 200


def test_server_refuses_to_start_without_jwks_url() -> None:
    result = subprocess.run(
        ["node", "--experimental-websocket", "server.mjs", "--issuer", ISSUER],
        cwd=SERVER_DIR,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert "--jwks-url" in result.stderr
    assert result.stdout == ""


def test_unreachable_key_set_is_401(fhir_server_signer: Signer) -> None:
    with FhirServerProcess(jwks_url="http://127.0.0.1:9/jwks.json", issuer=ISSUER) as server:
        token = fhir_server_signer.sign(
            {"iss": ISSUER, "aud": server.base_url, "exp": int(time.time()) + 60, "scope": "user/*.*"}
        )
        response = httpx.get(f"{server.base_url}/Patient/pat-1", headers={"authorization": f"Bearer {token}"})
        assert response.status_code == 401
        assert "key set could not be fetched" in diagnostics(response)


# The team's example resources, kept in the repository (docs/fhir-examples) so a clone anywhere can run this.
EXAMPLES_DIR = Path(__file__).resolve().parents[2] / "docs" / "fhir-examples"


def test_the_shapes_carecanvas_writes_are_accepted(fhir_server: FhirServerProcess, fhir_server_token) -> None:
    http = client(fhir_server, fhir_server_token())
    document = json.loads((EXAMPLES_DIR / "DocumentReference-education-illustration.json").read_text())
    created = http.post("/DocumentReference", json=document, headers=FHIR_JSON)
    assert created.status_code == 201, created.text
    provenance = json.loads((EXAMPLES_DIR / "Provenance-ai-generated.json").read_text())
    provenance["target"] = [{"reference": f"DocumentReference/{created.json()['id']}"}]
    assert http.post("/Provenance", json=provenance, headers=FHIR_JSON).status_code == 201
    fhir_server.set_profile("pdf-only")
    refused = http.post("/DocumentReference", json=document, headers=FHIR_JSON)
    assert refused.status_code == 400
    assert "content[1]" in diagnostics(refused)


@pytest.mark.parametrize(
    ("profile", "status", "content_type", "text"),
    [
        ("body-limit", 413, "text/html", "413 Request Entity Too Large"),
        ("body-limit-500", 500, "text/plain", "request entity too large"),
    ],
)
def test_body_limit_profiles_answer_like_a_front_proxy(
    fhir_server: FhirServerProcess, fhir_server_token, profile: str, status: int, content_type: str, text: str
) -> None:
    fhir_server.set_profile(profile, max_body_bytes=5000)
    http = client(fhir_server, fhir_server_token())
    big = http.post("/DocumentReference", json=a_document("pat-3", data=b"%PDF" * 2000), headers=FHIR_JSON)
    assert big.status_code == status
    assert big.headers["content-type"].startswith(content_type)
    assert text in big.text
    assert http.get("/DocumentReference").json()["total"] == 0  # the FHIR server never saw it
    assert http.post("/DocumentReference", json=a_document("pat-3"), headers=FHIR_JSON).status_code == 201
    assert httpx.get(f"{fhir_server.admin_url}/profile").json() == {
        "profile": profile,
        "max_body_bytes": 5000,
    }
    with pytest.raises(FhirServerError):
        fhir_server.set_profile(profile, max_body_bytes=0)


def test_broken_next_link_profile(fhir_server: FhirServerProcess, fhir_server_token) -> None:
    fhir_server.set_profile("broken-next-link")
    page = client(fhir_server, fhir_server_token()).get("/Condition", params={"patient": "pat-1"}).json()
    (next_link,) = [link["url"] for link in page["link"] if link["relation"] == "next"]
    assert next_link.startswith(fhir_server.base_url)
    assert "\x01" in next_link


def test_practitioner_roles_name_the_organization(fhir_server: FhirServerProcess, fhir_server_token) -> None:
    http = client(fhir_server, fhir_server_token("user/PractitionerRole.rs"))
    found = http.get("/PractitionerRole", params={"practitioner": "Practitioner/prac-1"}).json()
    assert [entry["resource"]["organization"] for entry in found["entry"]] == [
        {"reference": "Organization/org-1"}
    ]
    assert http.get("/PractitionerRole", params={"practitioner": "Practitioner/prac-3"}).json()["total"] == 0


def test_body_limit_can_be_chosen_at_start(fhir_server_jwks_url: str) -> None:
    with FhirServerProcess(
        jwks_url=fhir_server_jwks_url, issuer=ISSUER, profile="body-limit", max_body_bytes=2048
    ) as server:
        assert httpx.get(f"{server.admin_url}/profile").json() == {
            "profile": "body-limit",
            "max_body_bytes": 2048,
        }
        refused = httpx.post(f"{server.base_url}/Binary", content=b"x" * 4096, headers=FHIR_JSON)
        assert refused.status_code == 413
