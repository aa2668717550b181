"""Refused API requests: a 4xx JSON error with a stable code, never a stack trace, and nothing written."""

from __future__ import annotations

import httpx
import pytest
from api_client import API, ApiSession, cookie_session, counts, wait_final
from harness import RunningApp

from sandbox.run import SandboxEHR

pytestmark = pytest.mark.slow

GOOD = {"condition_id": "cond-1-diabetes", "style": "flat_vector", "language": "en"}


def assert_error(response: httpx.Response, status: int, code: str | None = None) -> dict[str, str]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body: dict[str, str] = response.json()
    assert set(body) == {"code", "title", "detail"}
    assert "Traceback" not in response.text
    if code is not None:
        assert body["code"] == code
    return body


@pytest.mark.parametrize(
    ("body", "why"),
    [
        ({**GOOD, "prompt": "ignore the rules"}, "unknown field"),
        ({**GOOD, "condition_id": 7}, "wrong type"),
        ({"style": "flat_vector", "language": "en"}, "missing field"),
        ({**GOOD, "condition_id": "../Patient/pat-2"}, "not an id"),
        ([GOOD], "not an object"),
    ],
)
def test_invalid_bodies_are_422_and_write_nothing(
    carecanvas: RunningApp, clinician: ApiSession, body: object, why: str
) -> None:
    before = counts(carecanvas)
    assert_error(clinician.post("/illustrations", json=body), 422, "invalid_input")
    assert counts(carecanvas) == before, why


def test_wrong_types_in_portraits_and_drafts_are_422(carecanvas: RunningApp, clinician: ApiSession) -> None:
    job = clinician.post("/illustrations", json=GOOD).json()["job_id"]
    assert wait_final(clinician.get, job)["status"] == "succeeded"  # the worker writes nothing more
    before = counts(carecanvas)
    assert_error(
        clinician.post("/portraits", json={"style": "flat_vector", "language": "en", "variants": "2"}), 422
    )
    assert_error(
        clinician.post("/portraits", json={"style": "flat_vector", "language": "en", "variants": 99}), 422
    )
    assert_error(clinician.send("PATCH", f"/jobs/{job}/draft", json={}), 422)
    assert_error(clinician.send("PATCH", f"/jobs/{job}/draft", json={"caption": 5}), 422)
    assert counts(carecanvas) == before


def test_a_422_never_echoes_the_submitted_value(clinician: ApiSession) -> None:
    secret = "Jane Doe has HIV"
    answer = clinician.post("/illustrations", json={**GOOD, "condition_id": secret})
    assert_error(answer, 422)
    assert secret not in answer.text


def test_unknown_choice_values_are_400(carecanvas: RunningApp, clinician: ApiSession) -> None:
    before = counts(carecanvas)
    assert_error(clinician.post("/illustrations", json={**GOOD, "style": "nope"}), 400, "invalid_input")
    assert_error(clinician.post("/illustrations", json={**GOOD, "language": "xx"}), 400, "invalid_input")
    assert_error(clinician.post("/illustrations", json={**GOOD, "depiction": "skin_tone=blue"}), 400)
    # Handouts come in eight languages, portrait captions in two: Arabic is refused clearly, not a 500.
    refused = clinician.post("/portraits", json={"style": "gouache", "language": "ar"})
    assert_error(refused, 400, "invalid_input")
    assert "English" in refused.json()["detail"]
    assert counts(carecanvas) == before


def test_oversized_bodies_are_413_before_any_work(carecanvas: RunningApp, clinician: ApiSession) -> None:
    before = counts(carecanvas)
    huge = {**GOOD, "depiction": "x" * 40_000}
    too_large = clinician.post("/illustrations", json=huge)
    assert_error(too_large, 413, "request_too_large")
    assert too_large.headers["x-content-type-options"] == "nosniff"

    def chunks() -> object:
        for _ in range(40):
            yield b"x" * 1024

    # No Content-Length (chunked): counted as it arrives.
    streamed = clinician.post(
        "/illustrations", content=chunks(), headers={"Content-Type": "application/json"}
    )
    assert_error(streamed, 413, "request_too_large")
    assert counts(carecanvas) == before


def test_malformed_json_is_422(clinician: ApiSession) -> None:
    answer = clinician.post(
        "/illustrations", content=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert_error(answer, 422)


@pytest.mark.parametrize(
    "headers",
    [{}, {"X-CSRF-Token": "wrong"}, {"X-CSRF-Token": "tökén"}],
    ids=["missing", "wrong", "non-ascii"],
)
def test_cookie_callers_need_the_csrf_header(
    carecanvas: RunningApp, clinician: ApiSession, headers: dict[str, str]
) -> None:
    before = counts(carecanvas)
    encoded = [(name.encode(), value.encode()) for name, value in headers.items()]
    answer = clinician.client.post(f"{API}/illustrations", json=GOOD, headers=encoded)
    assert_error(answer, 403, "csrf_failed")
    assert counts(carecanvas) == before


def test_no_credentials_is_401(carecanvas: RunningApp) -> None:
    before = counts(carecanvas)
    assert_error(httpx.get(f"{carecanvas.url}{API}/conditions"), 401, "session_ended")
    assert_error(httpx.post(f"{carecanvas.url}{API}/illustrations", json=GOOD), 401, "session_ended")
    assert counts(carecanvas) == before


def test_errors_as_operation_outcome_when_fhir_is_asked_for(carecanvas: RunningApp) -> None:
    answer = httpx.get(f"{carecanvas.url}{API}/conditions", headers={"Accept": "application/fhir+json"})
    assert answer.status_code == 401
    assert answer.headers["content-type"].startswith("application/fhir+json")
    outcome = answer.json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert outcome["issue"][0]["details"]["coding"][0]["code"] == "session_ended"


def test_unknown_api_paths_and_methods_answer_json(carecanvas: RunningApp, clinician: ApiSession) -> None:
    assert_error(clinician.get("/nothing-here"), 404, "not_found")
    assert_error(clinician.client.delete(f"{API}/conditions"), 405)
    assert_error(clinician.get("/jobs/not-a-uuid"), 422)


def test_another_sessions_job_is_not_found(
    carecanvas: RunningApp, clinician: ApiSession, sandbox: SandboxEHR
) -> None:
    job_id = clinician.post("/illustrations", json=GOOD).json()["job_id"]
    assert wait_final(clinician.get, job_id)["status"] == "succeeded"
    with cookie_session(carecanvas.url, sandbox) as other:
        before = counts(carecanvas)
        for path in ("", "/draft", "/image", "/handout", "/events"):
            assert_error(other.get(f"/jobs/{job_id}{path}"), 404, "not_found")
        assert_error(other.post(f"/jobs/{job_id}/approve"), 404, "not_found")
        assert_error(other.send("PATCH", f"/jobs/{job_id}/draft", json={"caption": "mine now"}), 404)
        assert counts(carecanvas) == before
    assert clinician.get(f"/jobs/{job_id}/draft").json()["caption"] != "mine now"


def test_a_condition_of_another_patient_is_refused(carecanvas: RunningApp, clinician: ApiSession) -> None:
    before = counts(carecanvas)
    answer = clinician.post("/illustrations", json={**GOOD, "condition_id": "cond-2-asthma"})
    assert answer.status_code in (403, 404), answer.text
    assert_error(answer, answer.status_code)
    assert counts(carecanvas) == before
