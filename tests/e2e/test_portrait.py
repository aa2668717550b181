"""Portraits over real HTTP: the story from the sandbox EHR, batched variants, review; a second model."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from harness import RunningApp, csrf_from, free_port, launch_session, running_app, wait_for_job

from sandbox.run import SandboxEHR
from service.audit import AuditAction, EntityRole
from service.cli import demo_settings
from service.documents import DraftContent, load_document
from service.ehrs import origin_of
from service.generation.tiny import build_tiny_pipeline

SECOND_MODEL = "tiny-portrait-seed-3"
JOB_LINK = re.compile(r'href="/review/([0-9a-f\-]{36})"')


@pytest.fixture(scope="module")
def portrait_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def portrait_sandbox(portrait_port: int) -> Iterator[SandboxEHR]:
    app_url = f"http://127.0.0.1:{portrait_port}"
    with SandboxEHR(app_launch_url=f"{app_url}/launch", redirect_uris=[f"{app_url}/callback"]) as ehr:
        yield ehr


@pytest.fixture(scope="module")
def portrait_app(
    portrait_sandbox: SandboxEHR, portrait_port: int, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningApp]:
    """The embedded app switched to a second tiny model (other weights) purely by configuration."""
    folder: Path = tmp_path_factory.mktemp("portrait")
    second = build_tiny_pipeline(folder / "models" / SECOND_MODEL, seed=3)
    settings = demo_settings(
        data_dir=folder / "data",
        fhir_base=portrait_sandbox.fhir_base,
        auth_base=portrait_sandbox.auth_base,
        ehr_origin=origin_of(portrait_sandbox.ehr_url),
        port=portrait_port,
    ).model_copy(
        update={
            "models": [
                {
                    "name": SECOND_MODEL,
                    "path": str(second),
                    "pipeline_class": "StableDiffusionPipeline",
                    "default_width": 64,
                    "default_height": 64,
                    "default_steps": 2,
                    "default_guidance": 1.0,
                    "is_test_model": True,
                }
            ],
            "default_model": SECOND_MODEL,
            "worker_batch_wait_ms": 200,
        }
    )
    with running_app(settings, port=portrait_port) as app:
        yield app


def load_content(app: RunningApp, job_id: str) -> DraftContent:
    async def read() -> DraftContent:
        async with app.services.sessionmaker() as db:
            document = await load_document(db, keyring=app.services.keyring, job_id=job_id)
        assert document is not None
        return document.content

    return app.call(read())


def audit_entries(app: RunningApp, action: str) -> list:
    async def read() -> list:
        async with app.services.sessionmaker() as db:
            return await app.services.audit.search(db, action=action, limit=1000)

    return app.call(read())


def test_portrait_variants_from_the_story_with_consent(portrait_app: RunningApp, portrait_sandbox) -> None:
    generated_before = len(audit_entries(portrait_app, AuditAction.GENERATE))
    with launch_session(portrait_app.url, portrait_sandbox, patient="pat-1", encounter="enc-1") as client:
        workspace = client.get("/app")
        assert 'href="/portraits"' in workspace.text
        page = client.get("/portraits")
        assert page.status_code == 200
        assert "a hummingbird" in page.text
        assert "hospitals" in page.text  # the reviewer sees what the patient asked to leave out
        assert "agreed that the portrait may show a likeness" in page.text
        started = client.post(
            "/portraits",
            data={
                "csrf_token": csrf_from(page.text),
                "style": "watercolour",
                "language": "en",
                "variants": "4",
                "skin_tone": "brown",
                "age_group": "older_adult",
            },
        )
        assert started.status_code == 303, started.text
        job_ids = started.headers["location"].split("jobs=", 1)[1].split(",")
        assert len(job_ids) == 4
        for job_id in job_ids:
            assert wait_for_job(client, job_id)["status"] == "succeeded"
        variants = client.get(started.headers["location"])
        assert JOB_LINK.findall(variants.text) == job_ids
        assert "All variants are done" in variants.text
        review = client.get(f"/review/{job_ids[0]}")
        assert review.status_code == 200
        assert "Your portrait" in review.text
        image = client.get(f"/artifacts/{job_ids[1]}/png")
        assert image.content.startswith(b"\x89PNG")
    contents = [load_content(portrait_app, job_id) for job_id in job_ids]
    assert {content.model for content in contents} == {SECOND_MODEL}  # the configured default model
    assert len({content.seed for content in contents}) == 4
    assert [content.variant for content in contents] == [1, 2, 3, 4]
    first = contents[0]
    assert (first.kind, first.story_id, first.symbolic) == ("portrait", "qr-story-1", False)
    assert "hummingbird" in first.prompt
    assert "hospital" not in first.prompt.lower()
    assert "needle" not in first.prompt.lower()
    assert "hospitals" in first.negative_prompt
    for identifier in ("Maria", "Rivera", "pat-1", "qr-story-1"):  # no identifiers in the prompt
        assert identifier not in first.prompt
    # All four variants were claimed together: one bucket, one pipeline call.
    views = [portrait_app.call(portrait_app.services.queue.get(job_id)) for job_id in job_ids]
    assert len({view.bucket for view in views}) == 1
    assert len({view.started_at for view in views}) == 1
    generated = audit_entries(portrait_app, AuditAction.GENERATE)
    assert len(generated) == generated_before + 1
    # The request is for our jobs; the story is its source, never a created resource.
    assert [(e.reference, e.role) for e in generated[0].entities] == [
        *((f"urn:carecanvas:job:{job_id}", EntityRole.TARGET) for job_id in job_ids),
        ("QuestionnaireResponse/qr-story-1", EntityRole.SOURCE),
    ]
    assert generated[0].detail["job_ids"] == job_ids


def test_without_likeness_consent_the_portrait_is_symbolic(
    portrait_app: RunningApp, portrait_sandbox
) -> None:
    with launch_session(portrait_app.url, portrait_sandbox, patient="pat-4", encounter="enc-4") as client:
        page = client.get("/portraits")
        assert "did not agree to a likeness" in page.text
        started = client.post(
            "/portraits",
            data={
                "csrf_token": csrf_from(page.text),
                "style": "watercolour",
                "language": "es",
                "variants": "2",
            },
        )
        assert started.status_code == 303
        job_ids = started.headers["location"].split("jobs=", 1)[1].split(",")
        content = load_content(portrait_app, job_ids[0])
        assert content.symbolic is True
        assert content.title == "Su retrato"
        assert "recognisable person" in content.negative_prompt
        assert "dark storms" in content.negative_prompt
        assert "storm" not in content.prompt.lower()


def test_bad_portrait_requests_are_refused(portrait_app: RunningApp, portrait_sandbox) -> None:
    with launch_session(portrait_app.url, portrait_sandbox, patient="pat-1", encounter="enc-1") as client:
        page = client.get("/portraits")
        token = csrf_from(page.text)
        base = {"csrf_token": token, "style": "watercolour", "language": "en", "variants": "2"}
        cases = [
            ({**base, "variants": "9"}, 400, "variants must be between 1 and 8"),
            ({**base, "variants": "0"}, 400, "variants must be between 1 and 8"),
            ({**base, "skin_tone": "green"}, 400, "Depiction.skin_tone"),
            ({**base, "style": "graffiti"}, 400, "Unknown style"),
            ({**base, "language": "fr"}, 400, "Unknown language"),
            ({**base, "csrf_token": "forged"}, 403, "This form has expired"),
        ]
        for data, status, message in cases:
            answer = client.post("/portraits", data=data)
            assert answer.status_code == status, (data, answer.status_code)
            assert message in answer.text
        assert client.get("/portraits/variants", params={"jobs": "not-a-job"}).status_code == 400
        unknown = "00000000-0000-0000-0000-000000000000"
        assert client.get("/portraits/variants", params={"jobs": unknown}).status_code == 404


def test_a_patient_without_a_story_gets_a_plain_message(portrait_app: RunningApp, portrait_sandbox) -> None:
    with launch_session(portrait_app.url, portrait_sandbox, patient="pat-2", encounter="enc-2") as client:
        page = client.get("/portraits")
        assert page.status_code == 200
        assert 'data-testid="no-story"' in page.text
        answer = client.post(
            "/portraits",
            data={"csrf_token": csrf_from(client.get("/app").text), "style": "watercolour", "language": "en"},
        )
        assert answer.status_code == 404
        assert "No portrait story" in answer.text


def test_variants_of_another_session_are_not_shown(portrait_app: RunningApp, portrait_sandbox) -> None:
    with launch_session(portrait_app.url, portrait_sandbox, patient="pat-1", encounter="enc-1") as owner:
        page = owner.get("/portraits")
        started = owner.post(
            "/portraits",
            data={
                "csrf_token": csrf_from(page.text),
                "style": "watercolour",
                "language": "en",
                "variants": "1",
            },
        )
        location = started.headers["location"]
        with launch_session(portrait_app.url, portrait_sandbox, patient="pat-1", encounter="enc-1") as other:
            assert other.get(location).status_code == 404


def test_an_approved_portrait_is_written_back_with_the_story_as_its_source(
    portrait_app: RunningApp, portrait_sandbox
) -> None:
    with launch_session(portrait_app.url, portrait_sandbox, patient="pat-1", encounter="enc-1") as client:
        page = client.get("/portraits")
        csrf = csrf_from(page.text)
        started = client.post(
            "/portraits", data={"csrf_token": csrf, "style": "watercolour", "language": "en", "variants": "2"}
        )
        job_id = started.headers["location"].split("jobs=", 1)[1].split(",")[0]
        assert wait_for_job(client, job_id)["status"] == "succeeded"
        approved = client.post(
            f"/review/{job_id}/approve",
            data={
                "caption": "Your garden, with a hummingbird.",
                "alt_text": "A garden picture.",
                "csrf_token": csrf,
            },
        )
        assert approved.status_code == 200, approved.text
    token = portrait_sandbox.mint_token(
        scope="user/*.read", fhirUser=f"{portrait_sandbox.fhir_base}/Practitioner/prac-1"
    )
    headers = {"Authorization": f"Bearer {token}"}
    bundle = httpx.get(
        f"{portrait_sandbox.fhir_base}/DocumentReference",
        params={"identifier": f"urn:carecanvas:artifact|{job_id}-illustration-v1"},
        headers=headers,
        timeout=30,
    ).json()
    [entry] = bundle["entry"]
    document = entry["resource"]
    assert document["context"]["related"] == [{"reference": "QuestionnaireResponse/qr-story-1"}]
    provenance = httpx.get(
        f"{portrait_sandbox.fhir_base}/Provenance",
        params={"target": f"DocumentReference/{document['id']}"},
        headers=headers,
        timeout=30,
    ).json()["entry"][0]["resource"]
    sources = [item["what"]["reference"] for item in provenance["entity"] if item["role"] == "source"]
    assert sources == ["QuestionnaireResponse/qr-story-1"]
