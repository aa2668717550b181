"""The JSON API takes the same topic override as the workspace: GET /conditions names each condition's topic
and, on the generic fallback, the closest topics; POST /illustrations with `topic_override` uses one of them
for the words and the handout; an unknown topic is 400 unknown_topic, a topic for a condition with its own
is 422 topic_already_matched, and nothing is written then."""

from __future__ import annotations

import io
from collections.abc import Iterator

import httpx
import pytest
from api_client import ApiSession, counts, wait_final
from harness import RunningApp, csrf_from, launch_session
from pypdf import PdfReader

from sandbox.run import SandboxEHR

pytestmark = pytest.mark.slow

FALLBACK = {"condition_id": "cond-6-no-text", "style": "flat_vector", "language": "en"}
MATCHED = {"condition_id": "cond-1-diabetes", "style": "flat_vector", "language": "en"}


def assert_error(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert response.json()["code"] == code


@pytest.fixture(scope="module")
def begay(carecanvas: RunningApp, sandbox: SandboxEHR) -> Iterator[ApiSession]:
    """A launched clinician session for Daniel Begay, whose display-less condition matches no topic."""
    with launch_session(carecanvas.url, sandbox, patient="pat-6", encounter="enc-6") as client:
        yield ApiSession(client=client, csrf=csrf_from(client.get("/app").text))


def test_conditions_name_their_topic_and_the_closest_topics_on_the_fallback(
    begay: ApiSession, clinician: ApiSession
) -> None:
    listed = {item["id"]: item for item in begay.get("/conditions").json()["conditions"]}
    fallback = listed["cond-6-no-text"]
    assert fallback["topic_fallback"] is True
    assert {topic["id"] for topic in fallback["closest_topics"]} == {"asthma", "copd", "heart-failure"}
    assert all(topic["title"] for topic in fallback["closest_topics"])
    matched = {item["id"]: item for item in clinician.get("/conditions").json()["conditions"]}
    assert (matched["cond-1-diabetes"]["topic"], matched["cond-1-diabetes"]["topic_fallback"]) == (
        "type-2-diabetes",
        False,
    )
    assert matched["cond-1-diabetes"]["closest_topics"] == []


def test_a_topic_override_makes_the_words_and_the_handout(carecanvas: RunningApp, begay: ApiSession) -> None:
    library = carecanvas.services.prompts
    created = begay.post("/illustrations", json={**FALLBACK, "topic_override": "copd"})
    assert created.status_code == 201, created.text
    job_id = created.json()["job_id"]
    assert wait_final(begay.get, job_id)["status"] == "succeeded"
    draft = begay.get(f"/jobs/{job_id}/draft").json()
    assert draft["caption"] == library.topic("copd").text["en"].caption
    handout = begay.get(f"/jobs/{job_id}/handout")
    assert handout.status_code == 200
    words = " ".join(
        " ".join(p.extract_text() or "" for p in PdfReader(io.BytesIO(handout.content)).pages).split()
    )
    sections = library.sections("copd", "en")
    assert sections is not None
    assert " ".join(sections.what_it_is.split()[:5]) in words


def test_an_unknown_topic_override_is_400_and_writes_nothing(
    carecanvas: RunningApp, begay: ApiSession
) -> None:
    before = counts(carecanvas)
    for topic in ("no-such-topic", carecanvas.services.prompts.fallback.id):
        assert_error(
            begay.post("/illustrations", json={**FALLBACK, "topic_override": topic}), 400, "unknown_topic"
        )
    assert_error(begay.post("/illustrations", json={**FALLBACK, "topic_override": 7}), 422, "invalid_input")
    assert_error(begay.post("/illustrations", json={**FALLBACK, "topic_override": ""}), 422, "invalid_input")
    assert counts(carecanvas) == before


def test_a_topic_override_for_a_condition_with_its_own_topic_is_422_and_writes_nothing(
    carecanvas: RunningApp, clinician: ApiSession
) -> None:
    before = counts(carecanvas)
    refused = clinician.post("/illustrations", json={**MATCHED, "topic_override": "asthma"})
    assert_error(refused, 422, "topic_already_matched")
    assert "general handout" in refused.json()["detail"]
    assert counts(carecanvas) == before


def test_every_topic_is_listed_with_its_titles_and_any_of_them_may_be_chosen(
    carecanvas: RunningApp, begay: ApiSession
) -> None:
    """Decided: any topic, not only the closest three (the clinician may know better than a name match);
    GET /topics lists them all, each with the title its handout carries per language."""
    library = carecanvas.services.prompts
    listed = begay.get("/topics").json()["topics"]
    assert {topic["id"] for topic in listed} == {topic.id for topic in library.topics}
    assert library.fallback.id not in {topic["id"] for topic in listed}
    diabetes = next(topic for topic in listed if topic["id"] == "type-2-diabetes")
    assert diabetes["titles"]["zh-Hans"] == library.topic("type-2-diabetes").text["zh-Hans"].title
    assert set(diabetes["titles"]) == set(library.languages)
    closest = begay.get("/conditions").json()["conditions"]
    asthma = next(
        t for c in closest if c["id"] == "cond-6-no-text" for t in c["closest_topics"] if t["id"] == "asthma"
    )
    assert asthma["titles"]["ar"] == library.topic("asthma").text["ar"].title

    # A topic far from the closest three is taken all the same.
    created = begay.post("/illustrations", json={**FALLBACK, "topic_override": "type-2-diabetes"})
    assert created.status_code == 201, created.text
    job_id = created.json()["job_id"]
    assert wait_final(begay.get, job_id)["status"] == "succeeded"
    assert (
        begay.get(f"/jobs/{job_id}/draft").json()["title"]
        == library.topic("type-2-diabetes").text["en"].title
    )
