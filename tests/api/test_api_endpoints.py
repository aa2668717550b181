"""Every /api/v1 operation over real HTTP against the sandbox EHR, with the session cookie + CSRF header."""

from __future__ import annotations

import io
import json

import httpx
import pytest
from api_client import API, ApiSession, audit_count, counts, wait_final
from harness import RunningApp
from PIL import Image

pytestmark = pytest.mark.slow


def test_openapi_document_declares_security_and_links(carecanvas: RunningApp) -> None:
    document = httpx.get(f"{carecanvas.url}{API}/openapi.json").json()
    schemes = document["components"]["securitySchemes"]
    assert schemes["sessionCookie"] == {**schemes["sessionCookie"], "type": "apiKey", "in": "cookie"}
    assert schemes["csrfHeader"]["in"] == "header"
    assert schemes["ehrBearer"] == {**schemes["ehrBearer"], "type": "http", "scheme": "bearer"}
    created = document["paths"][f"{API}/illustrations"]["post"]
    assert created["responses"]["201"]["links"]["Approve"]["operationId"] == "approve"
    assert {"csrfHeader": [], "sessionCookie": []} in created["security"]
    assert set(document["paths"]) >= {
        f"{API}/conditions",
        f"{API}/illustrations",
        f"{API}/portraits",
        f"{API}/jobs/{{job_id}}",
        f"{API}/jobs/{{job_id}}/events",
        f"{API}/jobs/{{job_id}}/draft",
        f"{API}/jobs/{{job_id}}/approve",
        f"{API}/documents/{{job_id}}/regenerate",
        f"{API}/documents/{{job_id}}/withdraw",
        f"{API}/documents",
    }
    # The page routes stay out of the API's document.
    assert not [path for path in document["paths"] if not path.startswith(API)]


def test_docs_page_works_offline_under_the_strict_csp(carecanvas: RunningApp) -> None:
    page = httpx.get(f"{carecanvas.url}{API}/docs")
    assert page.status_code == 200
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert "<script" not in page.text
    assert "https://" not in page.text
    assert f"{API}/jobs/{{job_id}}/approve" in page.text


def test_conditions_of_the_launched_patient_are_listed_and_audited(
    carecanvas: RunningApp, clinician: ApiSession
) -> None:
    before = audit_count(carecanvas)
    answer = clinician.get("/conditions")
    assert answer.status_code == 200, answer.text
    ids = {item["id"] for item in answer.json()["conditions"]}
    assert "cond-1-diabetes" in ids
    assert "cond-1-uti" not in ids  # resolved
    assert all(item["text"] and item["text"] != "None" for item in answer.json()["conditions"])
    assert audit_count(carecanvas) > before


def test_illustration_draft_edit_approve_regenerate_withdraw(
    carecanvas: RunningApp, clinician: ApiSession
) -> None:
    created = clinician.post(
        "/illustrations", json={"condition_id": "cond-1-diabetes", "style": "flat_vector", "language": "en"}
    )
    assert created.status_code == 201, created.text
    job_id = created.json()["job_id"]

    with clinician.client.stream("GET", f"{API}/jobs/{job_id}/events") as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line[5:]) for line in stream.iter_lines() if line.startswith("data:")]
    assert events
    assert events[-1]["status"] == "succeeded"
    assert wait_final(clinician.get, job_id)["status"] == "succeeded"

    draft = clinician.get(f"/jobs/{job_id}/draft").json()
    assert draft["status"] == "draft"
    assert draft["caption"]
    assert draft["alt_text"]
    assert isinstance(draft["reading_grade"], float)
    image = clinician.client.get(draft["image_url"])
    assert image.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(image.content)).size == (64, 64)
    preview = clinician.client.get(draft["preview_url"])
    assert preview.headers["content-type"] == "image/png"
    handout = clinician.client.get(draft["handout_url"])
    assert handout.headers["content-type"] == "application/pdf"
    assert handout.content.startswith(b"%PDF")

    edited = clinician.send("PATCH", f"/jobs/{job_id}/draft", json={"caption": "Sugar and you."})
    assert edited.status_code == 200, edited.text
    assert edited.json()["caption"] == "Sugar and you."
    assert clinician.get(f"/jobs/{job_id}/draft").json()["caption"] == "Sugar and you."

    first = clinician.post(f"/jobs/{job_id}/approve")
    assert first.status_code == 200, first.text
    assert first.json()["already_written"] is False
    second = clinician.post(f"/jobs/{job_id}/approve", json={})
    assert second.status_code == 200
    assert second.json()["fhir_document_id"] == first.json()["fhir_document_id"]
    assert second.json()["already_written"] is True
    too_late = clinician.send("PATCH", f"/jobs/{job_id}/draft", json={"alt_text": "changed"})
    assert too_late.status_code == 409
    assert too_late.json()["code"] == "not_ready"

    listed = clinician.get("/documents").json()
    mine = [d for d in listed["documents"] if d["fhir_document_id"] == first.json()["fhir_document_id"]]
    assert mine
    assert mine[0]["job_id"] == job_id
    assert mine[0]["status"] == "current"

    regenerated = clinician.post(f"/documents/{job_id}/regenerate", json={"style": "flat_vector"})
    assert regenerated.status_code == 201, regenerated.text
    assert wait_final(clinician.get, regenerated.json()["job_id"])["status"] == "succeeded"

    withdrawn = clinician.post(f"/documents/{job_id}/withdraw")
    assert withdrawn.status_code == 200, withdrawn.text
    assert withdrawn.json() == {
        "job_id": job_id,
        "fhir_document_id": first.json()["fhir_document_id"],
        "already_withdrawn": False,
    }
    again = clinician.post(f"/documents/{job_id}/withdraw")
    assert again.json()["already_withdrawn"] is True


def test_portrait_job_from_the_patients_story(carecanvas: RunningApp, clinician: ApiSession) -> None:
    created = clinician.post("/portraits", json={"style": "watercolour", "language": "en", "variants": 2})
    assert created.status_code == 201, created.text
    job_ids = created.json()["job_ids"]
    assert len(job_ids) == 2
    for job_id in job_ids:
        assert wait_final(clinician.get, job_id)["status"] == "succeeded"
    assert clinician.get(f"/jobs/{job_ids[0]}/draft").status_code == 200


def test_approve_before_the_image_is_ready_is_409_and_writes_nothing(
    carecanvas: RunningApp, clinician: ApiSession
) -> None:
    # A job cancelled before the worker finished it (the worker is fast: try until one is caught queued).
    for _ in range(10):
        created = clinician.post(
            "/illustrations", json={"condition_id": "cond-1-gerd", "style": "flat_vector", "language": "en"}
        )
        job_id = created.json()["job_id"]
        carecanvas.call(carecanvas.services.queue.request_cancel(job_id))
        if wait_final(clinician.get, job_id)["status"] == "cancelled":
            break
    else:
        pytest.fail("no job could be cancelled before it finished")
    before = counts(carecanvas)
    refused = clinician.post(f"/jobs/{job_id}/approve")
    assert refused.status_code == 409
    assert refused.json()["code"] == "not_ready"
    assert counts(carecanvas) == before
    assert clinician.get(f"/jobs/{job_id}/image").status_code == 404


JARGON = (
    "Hyperglycaemia secondary to insulin resistance necessitates pharmacological intervention, glycaemic "
    "monitoring and comprehensive dietary modification administered by multidisciplinary practitioners."
)


def test_a_caption_above_the_reading_target_needs_a_reason_through_the_api_too(
    carecanvas: RunningApp, clinician: ApiSession
) -> None:
    created = clinician.post(
        "/illustrations", json={"condition_id": "cond-1-diabetes", "style": "flat_vector", "language": "en"}
    )
    job_id = created.json()["job_id"]
    assert wait_final(clinician.get, job_id)["status"] == "succeeded"
    before = counts(carecanvas)
    refused = clinician.post(f"/jobs/{job_id}/approve", json={"caption": JARGON})
    assert refused.status_code == 422, refused.text
    assert refused.json()["code"] == "above_reading_target"
    assert counts(carecanvas) == before  # nothing written to the EHR
    assert clinician.get(f"/jobs/{job_id}/draft").json()["status"] == "draft"
    unknown = clinician.post(f"/jobs/{job_id}/approve", json={"caption": JARGON, "above_target_reason": "x"})
    assert unknown.status_code == 422
    approved = clinician.post(
        f"/jobs/{job_id}/approve", json={"caption": JARGON, "above_target_reason": "read-together"}
    )
    assert approved.status_code == 200, approved.text

    async def last_approval() -> object:
        async with carecanvas.services.sessionmaker() as db:
            return max(await carecanvas.services.audit.search(db, action="approve"), key=lambda e: e.seq)

    record = carecanvas.call(last_approval())
    assert record.detail["above_target_reason"] == "read-together"  # type: ignore[attr-defined]
