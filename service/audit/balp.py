"""Map audit entries to IHE BALP (Basic Audit Log Patterns) AuditEvents (FHIR R4); export as NDJSON."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC
from typing import Any

from fhir.resources.R4B.auditevent import AuditEvent

from service.audit.log import AuditAction, AuditEntry

BALP = "https://profiles.ihe.net/ITI/BALP/StructureDefinition/IHE.BasicAudit."
DCM = "http://dicom.nema.org/resources/ontology/DCM"
EVENT_TYPE = "http://terminology.hl7.org/CodeSystem/audit-event-type"
RESTFUL = "http://hl7.org/fhir/restful-interaction"
ACT_REASON = "http://terminology.hl7.org/CodeSystem/v3-ActReason"
OUTCOME_CODES = {"success": "0", "denied": "4", "failure": "8", "error": "12"}


@dataclass(frozen=True)
class _Pattern:
    profile: str
    type_system: str
    type_code: str
    type_display: str
    subtype_system: str
    subtype_code: str
    subtype_display: str
    action: str  # C R U D E


def _rest(profile: str, interaction: str, action: str) -> _Pattern:
    return _Pattern(
        profile, EVENT_TYPE, "rest", "Restful Operation", RESTFUL, interaction, interaction, action
    )


_LOGIN = _Pattern("Login", DCM, "110114", "User Authentication", DCM, "110122", "Login", "E")
_LOGOUT = _Pattern("Logout", DCM, "110114", "User Authentication", DCM, "110123", "Logout", "E")
_EXPORT = _Pattern("Query", DCM, "110106", "Export", RESTFUL, "search", "search", "R")

PATTERNS: dict[str, _Pattern] = {
    AuditAction.LAUNCH: _LOGIN,
    AuditAction.LOGIN: _LOGIN,
    AuditAction.LOGOUT: _LOGOUT,
    AuditAction.TOKEN_USE: _rest("PatientRead", "read", "R"),
    AuditAction.FHIR_READ: _rest("PatientRead", "read", "R"),
    AuditAction.FHIR_SEARCH: _rest("PatientQuery", "search", "E"),
    AuditAction.GENERATE: _rest("PatientCreate", "create", "C"),
    AuditAction.VIEW: _rest("PatientRead", "read", "R"),
    AuditAction.PORTAL_VIEW: _rest("PatientRead", "read", "R"),
    AuditAction.APPROVE: _rest("PatientUpdate", "update", "U"),
    AuditAction.REJECT: _rest("PatientUpdate", "update", "U"),
    AuditAction.RETRACT: _rest("PatientUpdate", "update", "U"),
    AuditAction.WRITE_BACK: _rest("PatientCreate", "create", "C"),
    AuditAction.AUDIT_SEARCH: _rest("Query", "search", "E"),
    AuditAction.AUDIT_EXPORT: _EXPORT,
    AuditAction.AUDIT_VERIFY: _rest("Read", "read", "R"),
    AuditAction.KEY_ROTATE: _rest("Update", "update", "U"),
}


def _pattern_for(entry: AuditEntry) -> _Pattern:
    pattern = PATTERNS.get(entry.action, _rest("Read", "read", "E"))
    if pattern.profile.startswith("Patient") and entry.patient is None:
        # BALP's Patient* profiles require a patient entity; without one use the generic pattern.
        pattern = _rest(pattern.profile.removeprefix("Patient"), pattern.subtype_code, pattern.action)
    return pattern


def _absolute(reference: str, fhir_base: str | None) -> str:
    if "://" in reference or fhir_base is None:
        return reference
    return f"{fhir_base.rstrip('/')}/{reference.lstrip('/')}"


def _agent(code_system: str, code: str, display: str, identifier: str, *, requestor: bool) -> dict[str, Any]:
    return {
        "type": {"coding": [{"system": code_system, "code": code, "display": display}]},
        "who": {"identifier": {"value": identifier}},
        "requestor": requestor,
    }


def to_audit_event(entry: AuditEntry, *, site: str, fhir_base: str | None) -> dict[str, Any]:
    """One BALP-shaped AuditEvent (R4 JSON), validated with fhir.resources R4B."""
    pattern = _pattern_for(entry)
    agents = [
        _agent(DCM, "110153", "Source Role ID", site, requestor=False),
    ]
    if fhir_base:
        destination = _agent(DCM, "110152", "Destination Role ID", fhir_base, requestor=False)
        destination["network"] = {"address": fhir_base, "type": "5"}
        agents.append(destination)
    if entry.actor:
        # The user authored a create/update; for reads and queries they received the information.
        code, display = (
            ("AUT", "author (originator)") if pattern.action in "CU" else ("IRCP", "information recipient")
        )
        user = _agent(
            "http://terminology.hl7.org/CodeSystem/v3-ParticipationType",
            code,
            display,
            entry.actor,
            requestor=True,
        )
        if "/" in entry.actor and not entry.actor.startswith("urn:"):
            user["who"] = {"reference": _absolute(entry.actor, fhir_base)}
        agents.append(user)
    else:
        agents[0]["requestor"] = True
    entities: list[dict[str, Any]] = []
    if entry.request_id:
        entities.append(
            {
                "what": {"identifier": {"value": entry.request_id}},
                "type": {
                    "system": "https://profiles.ihe.net/ITI/BALP/CodeSystem/BasicAuditEntityType",
                    "code": "XrequestId",
                },
            }
        )
    if entry.resource and entry.resource_type != "Patient":
        entities.append(
            {
                "what": {"reference": _absolute(entry.resource, fhir_base)},
                "type": {
                    "system": "http://terminology.hl7.org/CodeSystem/audit-entity-type",
                    "code": "2",
                    "display": "System Object",
                },
                "role": {
                    "system": "http://terminology.hl7.org/CodeSystem/object-role",
                    "code": "4",
                    "display": "Domain Resource",
                },
            }
        )
    if entry.patient:
        patient_reference = (
            entry.patient if entry.patient.startswith("Patient/") else f"Patient/{entry.patient}"
        )
        entities.append(
            {
                "what": {"reference": _absolute(patient_reference, fhir_base)},
                "type": {
                    "system": "http://terminology.hl7.org/CodeSystem/audit-entity-type",
                    "code": "1",
                    "display": "Person",
                },
                "role": {
                    "system": "http://terminology.hl7.org/CodeSystem/object-role",
                    "code": "1",
                    "display": "Patient",
                },
            }
        )
    event: dict[str, Any] = {
        "resourceType": "AuditEvent",
        "id": f"carecanvas-audit-{entry.seq}",
        "meta": {"profile": [BALP + pattern.profile]},
        "type": {"system": pattern.type_system, "code": pattern.type_code, "display": pattern.type_display},
        "subtype": [
            {
                "system": pattern.subtype_system,
                "code": pattern.subtype_code,
                "display": pattern.subtype_display,
            }
        ],
        "action": pattern.action,
        "recorded": entry.recorded_at.astimezone(UTC)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z"),
        "outcome": OUTCOME_CODES.get(entry.outcome, "8"),
        "purposeOfEvent": [{"coding": [{"system": ACT_REASON, "code": "TREAT"}]}],
        "agent": agents,
        "source": {
            "site": site,
            "observer": {"identifier": {"value": f"{site}-audit"}},
            "type": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/security-source-type",
                    "code": "4",
                    "display": "Application Server",
                }
            ],
        },
    }
    if entities:
        event["entity"] = entities
    AuditEvent.model_validate(event)  # raises if the mapping ever produces an invalid resource
    return event


def export_ndjson(entries: Iterable[AuditEntry], *, site: str, fhir_base: str | None = None) -> str:
    """Newline-delimited JSON of BALP AuditEvents, one line per entry."""
    return "".join(
        json.dumps(to_audit_event(entry, site=site, fhir_base=fhir_base), separators=(",", ":")) + "\n"
        for entry in entries
    )
