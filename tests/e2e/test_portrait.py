"""Portraits over real HTTP: the story from the sandbox EHR, batched variants, review; a second model."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fhir.resources.R4B.questionnaire import Questionnaire
from fhir.resources.R4B.questionnaireresponse import QuestionnaireResponse
from harness import RunningApp, csrf_from, free_port, launch_session, running_app, wait_for_job

from sandbox.run import SandboxEHR
from service.audit import AuditAction, EntityRole, canonical_actor
from service.cli import demo_settings
from service.documents import DraftContent, load_document
from service.ehrs import origin_of
from service.generation.readability import caption_grade
from service.generation.tiny import build_tiny_pipeline
from service.workflows.intake import questionnaire
from service.workflows.portrait import SEED_FAMILY_STRIDE
from service.workflows.reviewer import notes_for

SECOND_MODEL = "tiny-portrait-seed-3"
REVIEWER = "Practitioner/prac-3"
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
            "portrait_reviewers": {REVIEWER: "artist"},
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
        approval = {
            "caption": "Your garden, with a hummingbird.",
            "alt_text": "A garden picture.",
            "csrf_token": csrf,
        }
        # Reviewers are configured: no reviewer approved it yet, so nothing is written (issue 13).
        refused = client.post(f"/review/{job_id}/approve", data=approval)
        assert refused.status_code == 409
        assert "Send it to the reviewer first" in refused.text
        jobs = started.headers["location"].split("jobs=", 1)[1]
        sent = client.post(f"/portraits/{job_id}/send", data={"csrf_token": csrf, "jobs": jobs})
        assert sent.status_code == 303
        with launch_session(
            portrait_app.url, portrait_sandbox, patient="pat-2", practitioner="prac-3", encounter="enc-2"
        ) as reviewer:
            token = csrf_from(reviewer.get(f"/reviewer/{job_id}").text)
            assert reviewer.post(f"/reviewer/{job_id}/approve", data={"csrf_token": token}).status_code == 303
        approved = client.post(f"/review/{job_id}/approve", data=approval)
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


# --- likeness, words, styles, variants, intake, reviewer (issue 13) ---------------------------------------


def start(client: httpx.Client, **fields: str) -> httpx.Response:
    page = client.get("/portraits")
    data = {"csrf_token": csrf_from(page.text), "style": "watercolour", "language": "en", "variants": "1"}
    return client.post("/portraits", data={**data, **fields})


def jobs_of(answer: httpx.Response) -> list[str]:
    assert answer.status_code == 303, answer.text
    return answer.headers["location"].split("jobs=", 1)[1].split(",")


def fhir_headers(sandbox: SandboxEHR) -> dict[str, str]:
    token = sandbox.mint_token(scope="user/*.cruds", fhirUser=f"{sandbox.fhir_base}/Practitioner/prac-1")
    return {"Authorization": f"Bearer {token}"}


def note_kinds(app: RunningApp, job_id: str) -> list[tuple[str, str]]:
    async def read() -> list[tuple[str, str]]:
        async with app.services.sessionmaker() as db:
            notes = await notes_for(db, keyring=app.services.keyring, job_id=job_id)
        return [(note.kind.value, note.text) for note in notes]

    return app.call(read())


def test_likeness_given_refused_and_missing_set_the_form_and_the_prompt(
    portrait_app: RunningApp, portrait_sandbox: SandboxEHR
) -> None:
    # Consent given (Maria Rivera): people offered and chosen; choosing none needs a note, kept and audited.
    with launch_session(portrait_app.url, portrait_sandbox, patient="pat-1", encounter="enc-1") as client:
        page = client.get("/portraits").text
        assert 'data-likeness="given"' in page
        assert re.search(r'<option value="yes" selected>', page)
        assert 'data-testid="people-details" hidden' not in page
        refused = start(client, show_people="no")
        assert refused.status_code == 403
        assert "write a note" in refused.text
        changes_before = len(audit_entries(portrait_app, AuditAction.LIKENESS_CHANGE))
        [job_id] = jobs_of(start(client, show_people="no", likeness_note="She asked today for no people."))
        assert load_content(portrait_app, job_id).symbolic is True
        assert note_kinds(portrait_app, job_id) == [("likeness", "She asked today for no people.")]
        changes = audit_entries(portrait_app, AuditAction.LIKENESS_CHANGE)
        assert len(changes) == changes_before + 1
        assert changes[0].detail == {"story_says": "given", "people": False, "with_note": True}
        assert "She asked" not in str(changes[0].detail)  # the note stays encrypted with the draft
    # Consent refused (Otto Schmidt): no people, no depiction selects shown; asking for people needs a note.
    with launch_session(portrait_app.url, portrait_sandbox, patient="pat-4", encounter="enc-4") as client:
        page = client.get("/portraits").text
        assert 'data-likeness="refused"' in page
        assert re.search(r'<option value="no" selected>', page)
        assert 'data-testid="people-details" hidden' in page
        generated_before = len(audit_entries(portrait_app, AuditAction.GENERATE))
        answer = start(client, show_people="yes", skin_tone="light")
        assert answer.status_code == 403
        assert "write a note" in answer.text
        assert len(audit_entries(portrait_app, AuditAction.GENERATE)) == generated_before  # nothing queued
        [job_id] = jobs_of(start(client, show_people="no"))
        content = load_content(portrait_app, job_id)
        assert content.symbolic is True
        assert "recognisable person" in (content.negative_prompt or "")
    # No answer at all (a story without the likeness question, written to the sandbox): treated as refused.
    story = {
        "resourceType": "QuestionnaireResponse",
        "status": "completed",
        "subject": {"reference": "Patient/pat-6"},
        "authored": "2026-11-20T10:00:00Z",
        "item": [{"linkId": "places", "answer": [{"valueString": "the mesa at sunset"}]}],
    }
    created = httpx.post(
        f"{portrait_sandbox.fhir_base}/QuestionnaireResponse",
        json=story,
        headers=fhir_headers(portrait_sandbox),
        timeout=30,
    )
    assert created.status_code == 201, created.text
    with launch_session(portrait_app.url, portrait_sandbox, patient="pat-6", encounter="enc-6") as client:
        page = client.get("/portraits").text
        assert 'data-likeness="missing"' in page
        assert "does not say" in page
        assert re.search(r'<option value="no" selected>', page)
        [job_id] = jobs_of(start(client))  # the field left out: as the story says
        assert load_content(portrait_app, job_id).symbolic is True
        assert start(client, show_people="yes").status_code == 403


def test_caption_speaks_to_the_patient_at_grade_six_and_alt_text_is_apart(
    portrait_app: RunningApp, portrait_sandbox: SandboxEHR
) -> None:
    with launch_session(portrait_app.url, portrait_sandbox, patient="pat-1", encounter="enc-1") as client:
        [en] = jobs_of(start(client))
        [es] = jobs_of(start(client, language="es", style="gouache"))
    english, spanish = load_content(portrait_app, en), load_content(portrait_app, es)
    caption = english.caption
    assert caption.startswith("This picture was made from your story.")
    assert "your grandmother's garden in Oaxaca" in caption
    assert not re.search(r"\b(my|I|me|our)\b", caption)  # one voice: to the patient, never as them
    assert caption_grade(caption, "en") <= 6
    assert english.caption_grade == caption_grade(caption, "en")
    assert english.alt_text != caption
    assert english.alt_text.startswith("A watercolour picture of")
    assert "One person is in the scene." in english.alt_text  # she agreed to a likeness
    assert not re.search(r"\b(your|my)\b", english.alt_text)  # it describes the picture
    assert "hospital" not in (caption + english.alt_text).lower()
    assert spanish.caption.startswith("Esta imagen se hizo con su historia.")
    assert caption_grade(spanish.caption, "es") <= 6
    assert spanish.alt_text.startswith("Una imagen en gouache")


def test_portrait_styles_are_a_set_of_their_own(
    portrait_app: RunningApp, portrait_sandbox: SandboxEHR
) -> None:
    with launch_session(portrait_app.url, portrait_sandbox, patient="pat-1", encounter="enc-1") as client:
        page = client.get("/portraits").text
        offered = re.findall(
            r'<option value="([a-z_]+)">', page.split('id="style"', 1)[1].split("</select>", 1)[0]
        )
        assert offered == [s.name for s in portrait_app.services.prompts.portrait_styles]
        assert {"watercolour", "gouache", "paper_cut", "soft_pastel"} <= set(offered)
        assert not {"anatomical_cutaway", "isometric_infographic", "flat_vector"} & set(offered)
        refused = start(client, style="anatomical_cutaway")
        assert refused.status_code == 400
        assert "Unknown style" in refused.text


def test_variants_grid_live_progress_and_more_like_this(
    portrait_app: RunningApp, portrait_sandbox: SandboxEHR
) -> None:
    with launch_session(portrait_app.url, portrait_sandbox, patient="pat-1", encounter="enc-1") as client:
        client.get("/app")
        answer = start(client, variants="3")
        job_ids = jobs_of(answer)
        page = client.get(answer.headers["location"]).text
        assert "http-equiv" not in page  # no self-refresh
        assert 'data-testid="variant-grid"' in page
        assert 'width="256"' in page
        assert 'data-testid="patient-name">Maria Rivera' in page  # the banner
        seeds = [load_content(portrait_app, job_id).seed for job_id in job_ids]
        for seed in seeds:
            assert f"seed {seed}" in page
        # One stream for all variants, until each is final, with the steps the worker reports.
        events = []
        with client.stream("GET", "/portraits/variants/events", params={"jobs": ",".join(job_ids)}) as stream:
            for line in stream.iter_lines():
                if line.startswith("data:"):
                    events.append(json.loads(line[5:]))
                    finals = {e["job_id"] for e in events if e["status"] == "succeeded"}
                    if finals == set(job_ids):
                        break
        assert {e["job_id"] for e in events} == set(job_ids)
        assert all(e["total"] >= e["step"] >= 0 for e in events)
        running = [e for e in events if e["status"] == "running" and e["total"]]
        assert all(e["total"] == 2 for e in running), events  # the model's real step count
        grid = client.get(answer.headers["location"]).text
        assert grid.count("More like this one") == 3
        more = client.post(f"/portraits/{job_ids[1]}/more", data={"csrf_token": csrf_from(grid)})
        family = jobs_of(more)
        assert len(family) == 3
        assert [load_content(portrait_app, j).seed for j in family] == [
            seeds[1] + k * SEED_FAMILY_STRIDE for k in (1, 2, 3)
        ]
        assert {load_content(portrait_app, j).prompt for j in family} == {
            load_content(portrait_app, job_ids[1]).prompt
        }
        other = "00000000-0000-0000-0000-000000000000"
        assert (
            client.post(f"/portraits/{other}/more", data={"csrf_token": csrf_from(grid)}).status_code == 404
        )


def test_a_story_is_gathered_written_back_and_used(
    portrait_app: RunningApp, portrait_sandbox: SandboxEHR
) -> None:
    with launch_session(portrait_app.url, portrait_sandbox, patient="pat-3", encounter="enc-3") as client:
        client.get("/app")
        page = client.get("/portraits").text
        assert (
            'data-testid="gather-story" href="/portraits/story"' in page or 'href="/portraits/story"' in page
        )
        form = client.get("/portraits/story")
        assert form.status_code == 200
        assert 'data-testid="patient-name">Linh Nguyen' in form.text
        fields = {
            "csrf_token": csrf_from(form.text),
            "places": "the river in Hue, my mother's kitchen",
            "colours": "jade green; gold",
            "symbols": "a lotus",
            "avoid": "needles",
            "story": "I grew up by the river. I like to cook with my mother.",
        }
        missing = client.post("/portraits/story", data=fields)  # no likeness answer
        assert missing.status_code == 400
        assert "whether the picture may show them" in missing.text
        assert "my mother&#39;s kitchen" in missing.text  # what was typed is kept
        assert (
            client.post("/portraits/story", data={**fields, "likeness_consent": "maybe"}).status_code == 400
        )
        saved = client.post("/portraits/story", data={**fields, "likeness_consent": "no"})
        assert saved.status_code == 303
        assert saved.headers["location"] == "/portraits?story=saved"
        page = client.get(saved.headers["location"]).text
        assert 'data-testid="story-saved"' in page
        assert "a lotus" in page
        assert 'data-likeness="refused"' in page
        [job_id] = jobs_of(start(client))
    content = load_content(portrait_app, job_id)
    assert "lotus" in content.prompt
    assert content.symbolic is True
    assert "needles" in (content.negative_prompt or "")
    bundle = httpx.get(
        f"{portrait_sandbox.fhir_base}/QuestionnaireResponse",
        params={"patient": "pat-3"},
        headers=fhir_headers(portrait_sandbox),
        timeout=30,
    ).json()
    [entry] = bundle["entry"]
    response = QuestionnaireResponse.model_validate(entry["resource"])
    shipped = Questionnaire.model_validate(questionnaire())
    assert response.questionnaire == f"{shipped.url}|{shipped.version}"
    assert response.status == "completed"
    assert response.subject.reference == "Patient/pat-3"
    assert response.author.reference == "Practitioner/prac-1"
    answers = {item.linkId: item.answer for item in response.item}
    assert [a.valueString for a in answers["places"]] == ["the river in Hue", "my mother's kitchen"]
    assert [a.valueString for a in answers["colours"]] == ["jade green", "gold"]
    assert answers["likeness-consent"][0].valueBoolean is False
    assert set(answers) <= {item["linkId"] for item in questionnaire()["item"]}
    assert content.story_id == entry["resource"]["id"]
    [written] = [e for e in audit_entries(portrait_app, AuditAction.STORY_WRITE) if e.patient == "pat-3"]
    assert [e.reference for e in written.entities] == [
        f"QuestionnaireResponse/{content.story_id}",
        "Patient/pat-3",
    ]


def test_reviewer_queue_notes_send_back_and_approve(
    portrait_app: RunningApp, portrait_sandbox: SandboxEHR
) -> None:
    with launch_session(portrait_app.url, portrait_sandbox, patient="pat-1", encounter="enc-1") as clinician:
        clinician.get("/app")
        answer = start(clinician)
        [job_id] = jobs_of(answer)
        assert wait_for_job(clinician, job_id)["status"] == "succeeded"
        grid = clinician.get(answer.headers["location"]).text
        jobs = answer.headers["location"].split("jobs=", 1)[1]
        sent = clinician.post(
            f"/portraits/{job_id}/send",
            data={"csrf_token": csrf_from(grid), "jobs": jobs, "note": "Warmer light, please."},
        )
        assert sent.status_code == 303
        assert 'data-review="waiting"' in clinician.get(answer.headers["location"]).text
        assert clinician.get("/reviewer").status_code == 403  # prac-1 is not on the reviewer list
        with launch_session(
            portrait_app.url, portrait_sandbox, patient="pat-2", practitioner="prac-3", encounter="enc-2"
        ) as reviewer:
            queue = reviewer.get("/reviewer")
            assert queue.status_code == 200
            assert f'data-job-id="{job_id}" data-status="waiting"' in queue.text
            assert "Maria Rivera" in queue.text  # across patients: the reviewer launched for another one
            draft = reviewer.get(f"/reviewer/{job_id}")
            assert "This picture was made from your story." in draft.text
            assert "Warmer light, please." in draft.text
            assert reviewer.get(f"/reviewer/{job_id}/image").content.startswith(b"\x89PNG")
            token = csrf_from(draft.text)
            bare = reviewer.post(f"/reviewer/{job_id}/send-back", data={"csrf_token": token})
            assert bare.status_code == 403
            assert "write a note" in bare.text
            back = reviewer.post(
                f"/reviewer/{job_id}/send-back", data={"csrf_token": token, "note": "Add the sea at dawn."}
            )
            assert back.status_code == 303
            assert reviewer.post(f"/reviewer/{job_id}/approve", data={"csrf_token": token}).status_code == 403
            page = clinician.get(answer.headers["location"]).text
            assert 'data-review="sent_back"' in page
            assert "Add the sea at dawn." in page
            assert "Sent back by Practitioner/prac-3 (artist)" in page
            resent = clinician.post(
                f"/portraits/{job_id}/send",
                data={"csrf_token": csrf_from(page), "jobs": jobs, "note": "Sea added."},
            )
            assert resent.status_code == 303
            approved = reviewer.post(
                f"/reviewer/{job_id}/approve", data={"csrf_token": token, "note": "Lovely."}
            )
            assert approved.status_code == 303
            assert (
                f'data-job-id="{job_id}" data-status="approved"'
                in reviewer.get("/reviewer?show=approved").text
            )
        assert "Approved by Practitioner/prac-3 (artist)" in clinician.get(answer.headers["location"]).text
        # The clinician saves it to the chart: the Provenance names the reviewer, with their role.
        written = clinician.post(
            f"/review/{job_id}/approve",
            data={"caption": "Your garden.", "alt_text": "A garden picture.", "csrf_token": csrf_from(grid)},
        )
        assert written.status_code == 200, written.text
    headers = fhir_headers(portrait_sandbox)
    [entry] = httpx.get(
        f"{portrait_sandbox.fhir_base}/DocumentReference",
        params={"identifier": f"urn:carecanvas:artifact|{job_id}-illustration-v1"},
        headers=headers,
        timeout=30,
    ).json()["entry"]
    provenance = httpx.get(
        f"{portrait_sandbox.fhir_base}/Provenance",
        params={"target": f"DocumentReference/{entry['resource']['id']}"},
        headers=headers,
        timeout=30,
    ).json()["entry"][0]["resource"]
    reviewers = [a for a in provenance["agent"] if a["who"]["reference"] == REVIEWER]
    assert [a["role"] for a in reviewers] == [[{"text": "portrait reviewer (artist)"}]]
    assert reviewers[0]["type"]["coding"][0]["code"] == "verifier"
    assert [kind for kind, _ in note_kinds(portrait_app, job_id)] == ["sent", "send_back", "sent", "approve"]
    for action in (AuditAction.PORTRAIT_SEND_BACK, AuditAction.PORTRAIT_APPROVE):
        [entry] = [e for e in audit_entries(portrait_app, action) if e.detail.get("job_id") == job_id]
        assert canonical_actor(entry.actor) == REVIEWER
        assert entry.patient == "pat-1"
        assert entry.detail["reviewer_role"] == "artist"
