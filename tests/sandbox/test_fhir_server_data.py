"""The synthetic EHR data: the shapes the rest of CareCanvas relies on, readable by fhir.resources R4B."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import pytest
from fhir.resources.R4B import get_fhir_model_class

from sandbox.fhir_process import DEFAULT_DATA_FILE

BUNDLE = json.loads(DEFAULT_DATA_FILE.read_text(encoding="utf-8"))
RESOURCES: list[dict[str, Any]] = [entry["resource"] for entry in BUNDLE["entry"]]
CONDITIONS = [resource for resource in RESOURCES if resource["resourceType"] == "Condition"]


def of_type(resource_type: str) -> list[dict[str, Any]]:
    return [resource for resource in RESOURCES if resource["resourceType"] == resource_type]


def test_bundle_is_a_collection_with_unique_ids() -> None:
    assert BUNDLE["resourceType"] == "Bundle"
    assert BUNDLE["type"] == "collection"
    keys = Counter(f"{r['resourceType']}/{r['id']}" for r in RESOURCES)
    assert [key for key, count in keys.items() if count > 1] == []


@pytest.mark.parametrize("resource", RESOURCES, ids=lambda r: f"{r['resourceType']}/{r['id']}")
def test_every_resource_parses_with_fhir_resources_r4b(resource: dict[str, Any]) -> None:
    model = get_fhir_model_class(resource["resourceType"])
    assert model.model_validate(resource).id == resource["id"]


def test_people_places_and_encounters() -> None:
    patients = of_type("Patient")
    assert [p["id"] for p in patients] == [f"pat-{n}" for n in range(1, len(patients) + 1)]
    assert len(patients) >= 6
    assert len({p["gender"] for p in patients}) >= 2
    assert len({p["birthDate"][:3] for p in patients}) >= 4
    assert len({p["communication"][0]["language"]["coding"][0]["code"] for p in patients}) >= 4
    assert len(of_type("Practitioner")) >= 3
    assert [o["id"] for o in of_type("Organization")] == ["org-1"]
    encounter_subjects = {e["id"]: e["subject"]["reference"] for e in of_type("Encounter")}
    for n, patient in enumerate(patients, start=1):
        assert encounter_subjects[f"enc-{n}"] == f"Patient/{patient['id']}"


def test_conditions_cover_the_cases_the_service_handles() -> None:
    assert len(CONDITIONS) >= 25
    assert all(c["id"].startswith("cond-") for c in CONDITIONS)
    statuses = Counter(c["clinicalStatus"]["coding"][0]["code"] for c in CONDITIONS)
    assert statuses["active"] > statuses["resolved"] > 0
    categories = {c["category"][0]["coding"][0]["code"] for c in CONDITIONS}
    assert categories == {"problem-list-item", "encounter-diagnosis"}
    systems = {coding["system"] for c in CONDITIONS for coding in c.get("code", {}).get("coding", [])}
    assert {"http://snomed.info/sct", "http://hl7.org/fhir/sid/icd-10-cm"} <= systems
    codes = {coding["code"] for c in CONDITIONS for coding in c.get("code", {}).get("coding", [])}
    assert {"44054006", "E11.9", "38341003", "I10", "195967001", "J45.909"} <= codes
    text_only = [c for c in CONDITIONS if "code" in c and "text" in c["code"] and "coding" not in c["code"]]
    assert len(text_only) >= 2
    nameless = [
        c
        for c in CONDITIONS
        if "code" in c
        and "text" not in c["code"]
        and not any("display" in x for x in c["code"].get("coding", []))
    ]
    assert len(nameless) == 1
    assert len([c for c in CONDITIONS if "code" not in c]) == 1
    for condition in CONDITIONS:
        if condition not in nameless:
            assert all("display" in x for x in condition.get("code", {}).get("coding", []))


def test_portrait_stories() -> None:
    stories = of_type("QuestionnaireResponse")
    assert len({qr["subject"]["reference"] for qr in stories}) >= 2
    for story in stories:
        assert story["id"].startswith("qr-story-")
        assert story["status"] == "completed"
        answers = {item["linkId"]: item["answer"][0] for item in story["item"]}
        assert set(answers) == {"places", "colours", "symbols", "avoid", "likeness-consent", "story"}
        assert isinstance(answers["likeness-consent"]["valueBoolean"], bool)
        assert answers["story"]["valueString"]
