"""BALP AuditEvent mapping validates with fhir.resources R4B and carries the right pattern."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
from fhir.resources.R4B.auditevent import AuditEvent

from service.audit import (
    AuditAction,
    AuditEntity,
    AuditEntry,
    CareCanvasObject,
    EntityRole,
    canonical_actor,
    carecanvas_ref,
)
from service.audit.balp import export_ndjson, to_audit_event

EXAMPLE = (
    Path(__file__).resolve().parents[2] / "docs" / "fhir-examples" / "AuditEvent-BALP-PatientCreate.json"
)
BASE = "https://fhir.ehr.example.org/r4"


def entry(
    action,
    *,
    patient="pat-1",
    actor="Practitioner/456",
    resource="DocumentReference/edu-img-1",
    outcome="success",
    seq=1,
):
    return AuditEntry(
        seq=seq,
        recorded_at=datetime(2026, 6, 2, 15, 4, 5, 412000, tzinfo=UTC),
        action=action,
        outcome=outcome,
        actor=actor,
        patient=patient,
        ehr="sandbox",
        resource=resource,
        resource_type=None,
        request_id="7d1e4c2a",
        detail={},
        hash="0" * 64,
    )


@pytest.mark.parametrize(
    ("action", "profile", "code", "verb"),
    [
        (AuditAction.WRITE_BACK, "PatientCreate", "create", "C"),
        (AuditAction.FHIR_READ, "PatientRead", "read", "R"),
        (AuditAction.FHIR_SEARCH, "PatientQuery", "search", "E"),
        (AuditAction.PORTAL_VIEW, "PatientRead", "read", "R"),
        (AuditAction.SUPERSEDE, "PatientUpdate", "update", "U"),
        (AuditAction.RETRACT, "PatientUpdate", "update", "U"),
        (AuditAction.READ_CONDITIONS, "PatientQuery", "search", "E"),
        (AuditAction.LOGIN, "Login", "110122", "E"),
        (AuditAction.LAUNCH, "Login", "110122", "E"),
        (AuditAction.AUDIT_EXPORT, "Query", "search", "R"),
        (AuditAction.AUDIT_SEARCH, "Query", "search", "E"),
        ("custom.thing", "Read", "read", "E"),
    ],
)
def test_mapping_validates(action, profile, code, verb):
    event = to_audit_event(entry(action), site="carecanvas", fhir_base=BASE)
    AuditEvent.model_validate(event)
    assert event["meta"]["profile"] == [
        f"https://profiles.ihe.net/ITI/BALP/StructureDefinition/IHE.BasicAudit.{profile}"
    ]
    assert event["subtype"][0]["code"] == code
    assert event["action"] == verb


def test_write_back_matches_the_shared_example_shape():
    example = json.loads(EXAMPLE.read_text())
    event = to_audit_event(entry(AuditAction.WRITE_BACK), site="carecanvas", fhir_base=BASE)
    for key in ("meta", "type", "subtype", "action", "recorded", "outcome", "purposeOfEvent"):
        assert event[key] == example[key], key
    references = [e["what"].get("reference") for e in event["entity"]]
    assert f"{BASE}/Patient/pat-1" in references
    assert f"{BASE}/DocumentReference/edu-img-1" in references
    assert event["entity"][0]["type"]["code"] == "XrequestId"
    assert event["agent"][-1]["who"] == {"reference": f"{BASE}/Practitioner/456"}
    assert event["agent"][-1]["requestor"] is True
    assert event["agent"][-1]["type"] == example["agent"][2]["type"]


def test_patient_profile_falls_back_without_patient_and_outcomes_map():
    event = to_audit_event(
        entry(AuditAction.FHIR_READ, patient=None, actor=None, outcome="denied"),
        site="carecanvas",
        fhir_base=None,
    )
    assert event["meta"]["profile"][0].endswith(".Read")
    assert event["outcome"] == "4"
    assert event["agent"][0]["requestor"] is True


def test_export_ndjson_one_line_per_entry():
    text = export_ndjson([entry("view", seq=1), entry("approve", seq=2)], site="carecanvas", fhir_base=BASE)
    lines = text.splitlines()
    assert len(lines) == 2
    assert text.endswith("\n")
    assert [json.loads(line)["id"] for line in lines] == ["carecanvas-audit-1", "carecanvas-audit-2"]


def vocabulary_entry(action, entities, *, detail=None):
    return AuditEntry(
        seq=7,
        recorded_at=datetime(2026, 6, 2, 15, 4, 5, tzinfo=UTC),
        action=action,
        outcome="success",
        actor="Practitioner/prac-2",
        patient="pat-1",
        ehr="sandbox",
        resource=entities[0].reference,
        resource_type=None,
        request_id="req-1",
        detail=detail or {},
        hash="0" * 64,
        entities=tuple(entities),
        description="Practitioner/prac-2 asked for an education picture about Condition/cond-1",
        actor_display="Dr Test",
        role="clinician",
    )


def test_a_generation_request_executes_our_job_with_the_condition_as_its_source():
    job = carecanvas_ref(CareCanvasObject.JOB, "3f1c")
    event = to_audit_event(
        vocabulary_entry(
            AuditAction.GENERATE,
            [AuditEntity(job), AuditEntity("Condition/cond-1", EntityRole.SOURCE)],
        ),
        site="carecanvas",
        fhir_base=BASE,
    )
    assert "meta" not in event  # no BALP Patient* pattern: nothing in the EHR is created
    assert (event["action"], event["subtype"][0]["code"]) == ("E", "generate")
    [job_entity, condition] = [e for e in event["entity"] if e["type"]["code"] == "2"]
    assert job_entity["what"] == {"identifier": {"system": "urn:ietf:rfc:3986", "value": job}}
    assert job_entity["role"]["code"] == "20"
    assert condition["what"] == {"reference": f"{BASE}/Condition/cond-1"}
    assert (condition["description"], condition["lifecycle"]["code"]) == ("source", "6")
    assert event["outcomeDesc"].startswith("Practitioner/prac-2 asked")
    [user] = [agent for agent in event["agent"] if agent["requestor"]]
    assert user["who"] == {"reference": f"{BASE}/Practitioner/prac-2", "display": "Dr Test"}
    assert user["role"] == [{"text": "clinician"}]


def test_an_approval_names_the_draft_and_the_hashes_of_what_was_approved():
    draft = carecanvas_ref(CareCanvasObject.DRAFT, "d-1")
    detail = {"caption_sha256": "ab" * 32, "alt_text_sha256": "cd" * 32, "edited": True}
    event = to_audit_event(
        vocabulary_entry(AuditAction.APPROVE, [AuditEntity(draft)], detail=detail),
        site="carecanvas",
        fhir_base=BASE,
    )
    assert event["action"] == "U"
    [target] = [e for e in event["entity"] if e["type"]["code"] == "2"]
    assert target["what"]["identifier"]["value"] == draft
    assert {d["type"]: d["valueString"] for d in target["detail"]} == {
        "caption_sha256": "ab" * 32,
        "alt_text_sha256": "cd" * 32,
        "edited": "true",
    }


def test_canonical_actor_strips_the_ehr_address():
    assert canonical_actor("http://127.0.0.1:1/fhir/Practitioner/prac-2") == "Practitioner/prac-2"
    assert canonical_actor("/Practitioner/prac-2") == "Practitioner/prac-2"
    assert canonical_actor("Patient/pat-1/_history/3") == "Patient/pat-1"
    assert canonical_actor("staff:officer@example.org") == "staff:officer@example.org"
    assert canonical_actor(None) is None
