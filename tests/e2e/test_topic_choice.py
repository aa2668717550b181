"""On the generic fallback the clinician can choose one of the closest topics, over HTTP: the choice makes the
picture, the words and the handout's sections, is audited as the clinician's, and survives a new version;
an unknown topic (400 unknown_topic) or a topic for a condition with its own (422 topic_already_matched) is
refused with nothing queued."""

from __future__ import annotations

import html
import io
import re
from typing import Any

import httpx
import pytest
from harness import RunningApp, csrf_from, launch_session, wait_for_job
from pypdf import PdfReader
from sqlalchemy import text

from sandbox.run import SandboxEHR
from service.audit import AuditAction
from service.documents import load_document

pytestmark = pytest.mark.slow

FALLBACK_CONDITION = "cond-6-no-text"  # Daniel Begay's display-less 267036007 (shortness of breath)
MATCHED_CONDITION = "cond-1-diabetes"  # Maria Rivera's coded type 2 diabetes


def jobs(app: RunningApp) -> int:
    async def count() -> int:
        async with app.services.sessionmaker() as db:
            return int((await db.execute(text("SELECT count(*) FROM jobs"))).scalar_one())

    return app.call(count())


def generate_records(app: RunningApp) -> list[Any]:
    async def search() -> list[Any]:
        async with app.services.sessionmaker() as db:
            return await app.services.audit.search(db, action=AuditAction.GENERATE, limit=10_000)

    return app.call(search())


def draft_topic(app: RunningApp, job_id: str) -> tuple[str | None, bool]:
    async def load() -> tuple[str | None, bool]:
        async with app.services.sessionmaker() as db:
            document = await load_document(db, keyring=app.services.keyring, job_id=job_id)
            assert document is not None
            return document.content.topic_id, document.content.topic_chosen_by_clinician

    return app.call(load())


def post_generate(
    client: httpx.Client,
    csrf: str,
    condition_id: str,
    *topic_choices: str,
    other: str | None = None,
    language: str = "en",
) -> httpx.Response:
    form: dict[str, Any] = {
        "condition_id": condition_id,
        "style": "flat_vector",
        "language": language,
        "csrf_token": csrf,
        "topic_choice": list(topic_choices),
    }
    if other is not None:
        form["topic_other"] = other
    return client.post("/illustrations", data=form)


def topic_options(page: str, condition_id: str) -> list[tuple[str, bool, str]]:
    """(topic id, selected, label) of a condition's topic list, in order."""
    titles = r"(?: data-titles='[^']*')?"
    found = re.findall(
        rf'<option value="{condition_id}:([a-z0-9*-]*)"( selected)?{titles}>([^<]*)</option>', page
    )
    return [(topic, bool(selected), html.unescape(label)) for topic, selected, label in found]


def other_topic_options(page: str) -> list[tuple[str, str]]:
    """(topic id, label) of the one list of every topic ("Another topic")."""
    listed = page.split('name="topic_other"', 1)[1].split("</select>", 1)[0]
    return [
        (topic, html.unescape(label))
        for topic, label in re.findall(
            r'<option value="([a-z0-9-]+)" data-titles=\'[^\']*\'>([^<]*)</option>', listed
        )
    ]


def pdf_text(data: bytes) -> str:
    return " ".join(" ".join(page.extract_text() or "" for page in PdfReader(io.BytesIO(data)).pages).split())


def test_the_clinician_picks_a_closest_topic_and_it_makes_the_handout(
    sandbox: SandboxEHR, carecanvas: RunningApp
) -> None:
    library = carecanvas.services.prompts
    asthma = library.topic("asthma")
    with launch_session(carecanvas.url, sandbox, patient="pat-6", encounter="enc-6") as client:
        workspace = client.get("/app")
        csrf = csrf_from(workspace.text)
        # The fallback condition offers its closest topics, general handout first and selected, then
        # "Another topic" (the list of every topic).
        choices = topic_options(workspace.text, FALLBACK_CONDITION)
        assert choices[0] == ("", True, "General handout")
        assert {topic for topic, _, _ in choices[1:-1]} == {"asthma", "copd", "heart-failure"}
        assert choices[-1][0] == "*"
        assert dict((t, label) for t, _, label in choices)["asthma"] == asthma.text["en"].title
        assert {topic for topic, _ in other_topic_options(workspace.text)} == {t.id for t in library.topics}

        # Another condition's list on the page is ignored; the chosen condition's value counts.
        created = post_generate(
            client, csrf, FALLBACK_CONDITION, "cond-5-no-code:copd", f"{FALLBACK_CONDITION}:asthma"
        )
        assert created.status_code == 303, created.text
        job_id = created.headers["location"].rsplit("/", 1)[1]
        assert wait_for_job(client, job_id)["status"] == "succeeded"
        assert draft_topic(carecanvas, job_id) == ("asthma", True)
        review = client.get(f"/review/{job_id}")
        assert html.escape(asthma.text["en"].title, quote=False) in review.text
        handout = client.get(f"/api/v1/jobs/{job_id}/handout")
        assert handout.status_code == 200, handout.text
        words = pdf_text(handout.content)
        sections = library.sections("asthma", "en")
        generic = library.sections(library.fallback.id, "en")
        assert sections is not None
        assert generic is not None
        assert " ".join(sections.what_it_is.split()[:5]) in words
        assert " ".join(generic.what_it_is.split()[:5]) not in words
        [record] = [r for r in generate_records(carecanvas) if r.detail.get("job_id") == job_id]
        assert (record.detail["topic"], record.detail["topic_chosen_by"]) == ("asthma", "clinician")

        # "General handout" keeps the generic topic, audited as the match's.
        kept = post_generate(client, csrf, FALLBACK_CONDITION, f"{FALLBACK_CONDITION}:")
        assert kept.status_code == 303, kept.text
        generic_job = kept.headers["location"].rsplit("/", 1)[1]
        assert draft_topic(carecanvas, generic_job) == (library.fallback.id, False)
        [record] = [r for r in generate_records(carecanvas) if r.detail.get("job_id") == generic_job]
        assert (record.detail["topic"], record.detail["topic_chosen_by"]) == (library.fallback.id, "match")
        assert wait_for_job(client, generic_job)["status"] == "succeeded"

        # A new version of the saved handout keeps the topic the clinician chose.
        saved = client.post(
            f"/review/{job_id}/approve",
            data={
                "caption": "A picture about your breathing.",
                "alt_text": "A test drawing.",
                "csrf_token": csrf,
            },
        )
        assert saved.status_code == 200, saved.text
        again = client.post(f"/documents/{job_id}/regenerate", data={"csrf_token": csrf})
        assert again.status_code == 303, again.text
        new_job = again.headers["location"].rsplit("/", 1)[1]
        assert draft_topic(carecanvas, new_job) == ("asthma", True)
        assert wait_for_job(client, new_job)["status"] == "succeeded"


def test_an_unknown_topic_gets_a_clear_page_and_nothing_is_queued(
    sandbox: SandboxEHR, carecanvas: RunningApp
) -> None:
    with launch_session(carecanvas.url, sandbox, patient="pat-6", encounter="enc-6") as client:
        csrf = csrf_from(client.get("/app").text)
        before = (jobs(carecanvas), len(generate_records(carecanvas)))
        for topic in ("no-such-topic", carecanvas.services.prompts.fallback.id, "<script>"):
            refused = post_generate(client, csrf, FALLBACK_CONDITION, f"{FALLBACK_CONDITION}:{topic}")
            assert refused.status_code == 400, refused.text
            assert "Unknown handout topic" in refused.text
            assert "<script>" not in refused.text
        assert (jobs(carecanvas), len(generate_records(carecanvas))) == before


def test_a_topic_for_a_condition_with_its_own_topic_is_refused_and_nothing_is_queued(
    sandbox: SandboxEHR, carecanvas: RunningApp
) -> None:
    # Decided: refused, not allowed. A matched condition's topic is what the chart coded (or named); a
    # chosen topic would let the handout contradict it. Fix the coding instead.
    with launch_session(carecanvas.url, sandbox) as client:
        workspace = client.get("/app")
        assert 'name="topic_choice"' not in workspace.text  # Maria Rivera's conditions all match a topic
        csrf = csrf_from(workspace.text)
        before = (jobs(carecanvas), len(generate_records(carecanvas)))
        refused = post_generate(client, csrf, MATCHED_CONDITION, f"{MATCHED_CONDITION}:asthma")
        assert refused.status_code == 422, refused.text
        assert "This condition has its own topic" in refused.text
        assert (jobs(carecanvas), len(generate_records(carecanvas))) == before


def test_another_topic_from_the_list_of_every_topic_named_in_the_handouts_language(
    sandbox: SandboxEHR, carecanvas: RunningApp
) -> None:
    """Layla Haddad (prefers Arabic) has a condition with no code and no text: no closest topic, but the
    clinician may pick any topic; each topic is named in English and as her Arabic handout will name it."""
    library = carecanvas.services.prompts
    asthma = library.topic("asthma")
    with launch_session(carecanvas.url, sandbox, patient="pat-5", encounter="enc-5") as client:
        workspace = client.get("/app")
        csrf = csrf_from(workspace.text)
        assert [(t, label) for t, _, label in topic_options(workspace.text, "cond-5-no-code")] == [
            ("", "General handout"),
            ("*", "Another topic (choose it in “Another topic” below)"),
        ]
        every = dict(other_topic_options(workspace.text))
        assert every["asthma"] == f"{asthma.text['en'].title} — {asthma.text['ar'].title}"
        assert len(every) == len(library.topics)
        assert list(every.values()) == sorted(every.values(), key=str.casefold)  # by English title

        created = post_generate(
            client, csrf, "cond-5-no-code", "cond-5-no-code:*", other="asthma", language="ar"
        )
        assert created.status_code == 303, created.text
        job_id = created.headers["location"].rsplit("/", 1)[1]
        assert draft_topic(carecanvas, job_id) == ("asthma", True)
        assert wait_for_job(client, job_id)["status"] == "succeeded"
        assert html.escape(asthma.text["ar"].title, quote=False) in client.get(f"/review/{job_id}").text

        # "Another topic" with no topic picked in the list is refused, nothing queued.
        before = (jobs(carecanvas), len(generate_records(carecanvas)))
        refused = post_generate(client, csrf, "cond-5-no-code", "cond-5-no-code:*", other="")
        assert refused.status_code == 400, refused.text
        assert "Unknown handout topic" in refused.text
        assert (jobs(carecanvas), len(generate_records(carecanvas))) == before


def test_the_fallback_note_says_how_to_choose_a_topic_with_or_without_closest_ones(
    sandbox: SandboxEHR, carecanvas: RunningApp
) -> None:
    notes = {}
    for patient, condition in (("pat-6", FALLBACK_CONDITION), ("pat-5", "cond-5-no-code")):
        encounter = patient.replace("pat", "enc")
        with launch_session(carecanvas.url, sandbox, patient=patient, encounter=encounter) as client:
            page = client.get("/app").text
        found = re.search(rf'value="{condition}".*?data-testid="topic-fallback">(.*?)</p>', page, re.S)
        assert found is not None
        notes[condition] = " ".join(html.unescape(found.group(1)).split())
    assert "Closest topics:" in notes[FALLBACK_CONDITION]
    assert "“Another topic”" in notes[FALLBACK_CONDITION]
    assert "Closest topics:" not in notes["cond-5-no-code"]
    assert "If you know which topic fits, choose “Another topic” below" in notes["cond-5-no-code"]
