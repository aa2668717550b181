"""Bearer mode: an EHR-embedded front end calls the API with the EHR's own access token (introspected)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest
from api_client import ApiSession, bearer, bearer_token, counts, wait_final
from harness import RunningApp
from sqlalchemy import text

from sandbox.run import SandboxEHR
from service.api.auth import BearerVerifier, token_digest

pytestmark = pytest.mark.slow

GOOD = {"condition_id": "cond-1-hypertension", "style": "flat_vector", "language": "en"}


def token_uses(app: RunningApp) -> int:
    async def read() -> int:
        async with app.services.sessionmaker() as db:
            query = text("SELECT count(*) FROM audit_records WHERE action = 'token.use'")
            return int((await db.execute(query)).scalar_one())

    result: int = app.call(read())
    return result


@pytest.fixture
def api(carecanvas: RunningApp, ehr_token: str) -> Iterator[httpx.Client]:
    with bearer(carecanvas.url, ehr_token) as client:
        yield client


def test_launch_job_approve_document_entirely_through_the_api(
    carecanvas: RunningApp, api: httpx.Client
) -> None:
    conditions = api.get("/conditions")
    assert conditions.status_code == 200, conditions.text
    assert "cond-1-hypertension" in {item["id"] for item in conditions.json()["conditions"]}
    # No CSRF token: a bearer token is not something a browser attaches by itself.
    created = api.post("/illustrations", json=GOOD)
    assert created.status_code == 201, created.text
    job_id = created.json()["job_id"]
    assert wait_final(api.get, job_id)["status"] == "succeeded"
    draft = api.get(f"/jobs/{job_id}/draft").json()
    assert api.get(draft["image_url"].removeprefix("/api/v1")).content.startswith(b"\x89PNG")
    approved = api.post(
        f"/jobs/{job_id}/approve", json={"alt_text": "A drawing of a heart and blood vessels."}
    )
    assert approved.status_code == 200, approved.text
    again = api.post(f"/jobs/{job_id}/approve")
    assert again.json()["fhir_document_id"] == approved.json()["fhir_document_id"]
    assert again.json()["already_written"] is True
    documents = api.get("/documents").json()["documents"]
    assert approved.json()["fhir_document_id"] in {d["fhir_document_id"] for d in documents}


def test_introspection_is_cached_by_token_hash_and_audited_once(
    carecanvas: RunningApp, sandbox: SandboxEHR
) -> None:
    token = bearer_token(sandbox, carecanvas.url, patient="pat-1")
    before = token_uses(carecanvas)
    with bearer(carecanvas.url, token) as api:
        assert api.get("/conditions").status_code == 200
        assert api.get("/conditions").status_code == 200
    assert token_uses(carecanvas) == before + 1  # the second call was answered from the cache
    verifier: BearerVerifier = carecanvas.app.state.api_bearer
    keys = list(verifier._tokens)
    assert any(token_digest(token) in key for key in keys)
    assert not any(token in key for key in keys)


def test_a_token_for_another_patient_never_sees_the_job(
    carecanvas: RunningApp, sandbox: SandboxEHR, api: httpx.Client
) -> None:
    job_id = api.post("/illustrations", json=GOOD).json()["job_id"]
    assert wait_final(api.get, job_id)["status"] == "succeeded"
    other = bearer_token(sandbox, carecanvas.url, patient="pat-2")
    with bearer(carecanvas.url, other) as stranger:
        before = counts(carecanvas)
        for path in ("", "/draft", "/image"):
            answer = stranger.get(f"/jobs/{job_id}{path}")
            assert answer.status_code == 404
            assert answer.json()["code"] == "not_found"
        assert stranger.post(f"/jobs/{job_id}/approve").status_code == 404
        # ...and cannot start a picture from pat-1's condition either.
        refused = stranger.post("/illustrations", json=GOOD)
        assert refused.status_code in (403, 404), refused.text
        assert counts(carecanvas) == before


def test_the_cookie_session_and_a_bearer_token_do_not_share_jobs(
    carecanvas: RunningApp, clinician: ApiSession, api: httpx.Client
) -> None:
    job_id = clinician.post("/illustrations", json=GOOD).json()["job_id"]
    assert api.get(f"/jobs/{job_id}").status_code == 404


def refused(app: RunningApp, client: httpx.Client, status: int = 401) -> None:
    before = counts(app)
    for answer in (client.get("/conditions"), client.post("/illustrations", json=GOOD)):
        assert answer.status_code == status, answer.text
        assert answer.json()["code"] == "unauthenticated"
        assert "Traceback" not in answer.text
    assert counts(app) == before


def test_a_token_the_ehr_never_issued_is_refused(carecanvas: RunningApp, sandbox: SandboxEHR) -> None:
    # Signed by the sandbox's key but never issued: introspection says inactive.
    forged = sandbox.mint_token(patient="pat-1")
    with bearer(carecanvas.url, forged) as client:
        refused(carecanvas, client)
    with bearer(carecanvas.url, "garbage") as client:
        refused(carecanvas, client)


def test_an_expired_token_is_refused(carecanvas: RunningApp, sandbox: SandboxEHR) -> None:
    sandbox.misbehave.access_token_lifetime = 1
    try:
        token = bearer_token(sandbox, carecanvas.url, patient="pat-1")
    finally:
        sandbox.misbehave.access_token_lifetime = None
    time.sleep(1.5)
    with bearer(carecanvas.url, token) as client:
        refused(carecanvas, client)


def test_a_token_without_a_patient_is_refused(carecanvas: RunningApp, sandbox: SandboxEHR) -> None:
    token = bearer_token(
        sandbox, carecanvas.url, patient="pat-1", scope="launch openid fhirUser user/Condition.rs"
    )
    with bearer(carecanvas.url, token) as client:
        refused(carecanvas, client, status=403)


def test_an_unknown_ehr_name_or_scheme_is_refused(carecanvas: RunningApp, ehr_token: str) -> None:
    with bearer(carecanvas.url, ehr_token, **{"X-EHR": "elsewhere"}) as client:
        refused(carecanvas, client)
    with httpx.Client(
        base_url=f"{carecanvas.url}/api/v1", headers={"Authorization": f"Basic {ehr_token}"}
    ) as client:
        refused(carecanvas, client)


def test_a_named_ehr_is_accepted(carecanvas: RunningApp, ehr_token: str) -> None:
    with bearer(carecanvas.url, ehr_token, **{"X-EHR": "sandbox"}) as client:
        assert client.get("/conditions").status_code == 200
