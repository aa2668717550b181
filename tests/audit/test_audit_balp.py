"""BALP AuditEvent mapping validates with fhir.resources R4B and carries the right pattern."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
from fhir.resources.R4B.auditevent import AuditEvent

from service.audit import AuditAction, AuditEntry
from service.audit.balp import export_ndjson, to_audit_event

EXAMPLE = Path("/work/shared/fhir-examples/AuditEvent-BALP-PatientCreate.json")
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
        (AuditAction.APPROVE, "PatientUpdate", "update", "U"),
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
