"""The whole slice over real HTTP: launch → workspace → generate → review → approve → write-back → audit."""

from __future__ import annotations

import base64
import hashlib
import io
import re

import httpx
import pytest
from harness import CONDITION, RunningApp, csrf_from, launch_session, wait_for_job
from PIL import Image

from sandbox.run import SandboxEHR
from service.workflows.approve import IDENTIFIER_SYSTEM, artifact_identifier

pytestmark = pytest.mark.slow


def fhir_get(sandbox: SandboxEHR, path: str, params: dict[str, str] | None = None) -> dict:
    token = sandbox.mint_token(
        scope="system/*.read user/*.read", fhirUser=f"{sandbox.fhir_base}/Practitioner/prac-1"
    )
    response = httpx.get(
        f"{sandbox.fhir_base}/{path}", params=params, headers={"Authorization": f"Bearer {token}"}, timeout=30
    )
    response.raise_for_status()
    return response.json()


def test_launch_generate_approve_write_back(sandbox: SandboxEHR, carecanvas: RunningApp) -> None:
    with launch_session(carecanvas.url, sandbox) as client:
        workspace = client.get("/app")
        assert workspace.status_code == 200
        assert 'data-testid="patient-name"' in workspace.text  # need_patient_banner honoured
        assert 'data-testid="encounter"' in workspace.text  # the Encounter from the launch was read
        condition_ids = CONDITION.findall(workspace.text)
        assert condition_ids, "the workspace lists the active conditions"
        assert "None" not in re.findall(r"<label[^>]*>([^<]*)", workspace.text)
        csrf = csrf_from(workspace.text)

        created = client.post(
            "/illustrations",
            data={
                "condition_id": condition_ids[0],
                "style": "flat_vector",
                "language": "en",
                "csrf_token": csrf,
            },
        )
        assert created.status_code == 303, created.text
        job_id = created.headers["location"].rsplit("/", 1)[1]
        assert wait_for_job(client, job_id)["status"] == "succeeded"

        review = client.get(f"/review/{job_id}")
        assert review.status_code == 200
        assert 'data-testid="test-model-notice"' in review.text
        assert 'data-testid="patient-name"' in review.text  # the banner follows the clinician to the review
        # The worker stored a cheap latent preview while it ran (latent resolution: 64 px / 8).
        preview = client.get(f"/artifacts/{job_id}/preview")
        assert preview.headers["content-type"] == "image/png"
        assert Image.open(io.BytesIO(preview.content)).size == (8, 8)
        assert client.get(f"/artifacts/{job_id}/exe").status_code == 404
        image = client.get(f"/artifacts/{job_id}/png")
        assert image.headers["content-type"] == "image/png"
        assert image.content.startswith(b"\x89PNG")

        form = {
            "caption": "A picture about your health.",
            "alt_text": "Drawing for the test.",
            "csrf_token": csrf,
        }
        first = client.post(f"/review/{job_id}/approve", data=form)
        assert first.status_code == 200, first.text
        second = client.post(f"/review/{job_id}/approve", data=form)
        assert second.status_code == 200
        assert "already saved" in second.text

        bundle = fhir_get(
            sandbox, "DocumentReference", {"identifier": f"{IDENTIFIER_SYSTEM}|{artifact_identifier(job_id)}"}
        )
        documents = [entry["resource"] for entry in bundle.get("entry", [])]
        assert len(documents) == 1, "two approvals leave one document"
        document = documents[0]
        assert document["docStatus"] == "final"
        assert document["subject"]["reference"] == "Patient/pat-1"
        assert document["author"][0]["reference"] == "Practitioner/prac-1"
        assert document["context"]["related"][0]["reference"] == f"Condition/{condition_ids[0]}"
        assert document["context"]["encounter"][0]["reference"] == "Encounter/enc-1"
        assert {
            "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue",
            "code": "AIAST",
        }.items() <= (document["meta"]["security"][0].items())
        pdf, png = (content["attachment"] for content in document["content"])
        assert pdf["contentType"] == "application/pdf"
        assert png["contentType"] == "image/png"
        assert png["title"] == "Drawing for the test."
        for attachment in (pdf, png):
            data = base64.b64decode(attachment["data"])
            assert attachment["size"] == len(data)
            assert attachment["hash"] == base64.b64encode(hashlib.sha1(data).digest()).decode()  # noqa: S324
        assert base64.b64decode(pdf["data"]).startswith(b"%PDF")

        provenances = fhir_get(sandbox, "Provenance", {"target": f"DocumentReference/{document['id']}"})
        [provenance] = [entry["resource"] for entry in provenances["entry"]]
        roles = {
            agent["type"]["coding"][0]["code"]: agent["who"]["reference"] for agent in provenance["agent"]
        }
        assert roles["verifier"] == "Practitioner/prac-1"
        assert roles["author"].startswith("Device/")
        device = fhir_get(sandbox, roles["author"])
        assert device["resourceType"] == "Device"
        assert any(
            entry["role"] == "source" and entry["what"]["reference"] == f"Condition/{condition_ids[0]}"
            for entry in provenance["entity"]
        )

        async def verify() -> object:
            async with carecanvas.services.sessionmaker() as db:
                return await carecanvas.services.audit.verify(db)

        result = carecanvas.call(verify())
        assert result.ok, result
        assert result.count >= 6  # launch, reads, generate, views, approve, write-back
