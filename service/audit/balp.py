"""Map audit entries to IHE BALP (Basic Audit Log Patterns) AuditEvents (FHIR R4); export as NDJSON."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC
from typing import Any

from fhir.resources.R4B.auditevent import AuditEvent

from service.audit.log import AuditAction, AuditEntity, AuditEntry, EntityRole

BALP = "https://profiles.ihe.net/ITI/BALP/StructureDefinition/IHE.BasicAudit."
DCM = "http://dicom.nema.org/resources/ontology/DCM"
EVENT_TYPE = "http://terminology.hl7.org/CodeSystem/audit-event-type"
RESTFUL = "http://hl7.org/fhir/restful-interaction"
ACT_REASON = "http://terminology.hl7.org/CodeSystem/v3-ActReason"
OUTCOME_CODES = {"success": "0", "denied": "4", "failure": "8", "error": "12"}
OBJECT_ROLE = "http://terminology.hl7.org/CodeSystem/object-role"
ENTITY_TYPE = "http://terminology.hl7.org/CodeSystem/audit-entity-type"
LIFECYCLE = "http://terminology.hl7.org/CodeSystem/dicom-audit-lifecycle"
# CareCanvas's own activities (on its jobs and drafts, not on EHR resources), which BALP has no profile for.
CARECANVAS_EVENT = "urn:carecanvas:audit-event-type"
CARECANVAS_ACTION = "urn:carecanvas:audit-action"
# What an approval record says about the approved text: hashes and edited flags, never the text itself.
APPROVAL_DETAIL_KEYS = ("caption_sha256", "alt_text_sha256", "caption_edited", "alt_text_edited", "edited")


@dataclass(frozen=True)
class _Pattern:
    profile: str | None  # a BALP profile; None for CareCanvas's own activities
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


def _carecanvas(action: AuditAction, display: str, verb: str) -> _Pattern:
    return _Pattern(
        None, CARECANVAS_EVENT, "carecanvas", "CareCanvas activity", CARECANVAS_ACTION, action, display, verb
    )


_LOGIN = _Pattern("Login", DCM, "110114", "User Authentication", DCM, "110122", "Login", "E")
_LOGOUT = _Pattern("Logout", DCM, "110114", "User Authentication", DCM, "110123", "Logout", "E")
_EXPORT = _Pattern("Query", DCM, "110106", "Export", RESTFUL, "search", "search", "R")
_KEY_OPERATION = _rest("Update", "update", "U")

PATTERNS: dict[str, _Pattern] = {
    AuditAction.LAUNCH: _LOGIN,
    AuditAction.LOGIN: _LOGIN,
    AuditAction.LOGOUT: _LOGOUT,
    AuditAction.ACCESS_DENIED: _LOGIN,
    AuditAction.TOKEN_USE: _rest("PatientRead", "read", "R"),
    AuditAction.FHIR_READ: _rest("PatientRead", "read", "R"),
    AuditAction.FHIR_SEARCH: _rest("PatientQuery", "search", "E"),
    AuditAction.READ_CONDITIONS: _rest("PatientQuery", "search", "E"),
    # Asking for a picture executes CareCanvas's job (and creates its draft); the Condition is its source.
    AuditAction.GENERATE: _carecanvas(AuditAction.GENERATE, "Request generation", "E"),
    AuditAction.VIEW: _rest("PatientRead", "read", "R"),
    AuditAction.PORTAL_VIEW: _rest("PatientRead", "read", "R"),
    AuditAction.EDIT_CAPTION: _carecanvas(AuditAction.EDIT_CAPTION, "Edit caption", "U"),
    AuditAction.APPROVE: _carecanvas(AuditAction.APPROVE, "Approve draft", "U"),
    AuditAction.REJECT: _carecanvas(AuditAction.REJECT, "Reject draft", "U"),
    # The chart changes here: a new DocumentReference, the replaced one superseded, a withdrawn one.
    AuditAction.WRITE_BACK: _rest("PatientCreate", "create", "C"),
    AuditAction.SUPERSEDE: _rest("PatientUpdate", "update", "U"),
    AuditAction.RETRACT: _rest("PatientUpdate", "update", "U"),
    AuditAction.RESTORE: _rest("PatientUpdate", "update", "U"),
    AuditAction.GIVE_HANDOUT: _rest("PatientCreate", "create", "C"),
    AuditAction.AUDIT_SEARCH: _rest("Query", "search", "E"),
    AuditAction.AUDIT_EXPORT: _EXPORT,
    AuditAction.AUDIT_VERIFY: _rest("Read", "read", "R"),
}

# What happened to each role's entity in each kind of action (DICOM audit lifecycle codes).
_LIFECYCLE_BY_VERB = {
    "C": ("1", "Origination / Creation"),
    "U": ("3", "Amendment"),
    "E": ("1", "Origination / Creation"),
}
_ACCESS = ("6", "Access / Use")


def _pattern_for(entry: AuditEntry) -> _Pattern:
    pattern = PATTERNS.get(entry.action)
    if pattern is None:
        pattern = _KEY_OPERATION if entry.action.startswith("keys.") else _rest("Read", "read", "E")
    if pattern.profile and pattern.profile.startswith("Patient") and entry.patient is None:
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


def _user_agent(entry: AuditEntry, actor: str, pattern: _Pattern, fhir_base: str | None) -> dict[str, Any]:
    # The user authored a create/update; for reads and queries they received the information.
    code, display = (
        ("AUT", "author (originator)") if pattern.action in "CU" else ("IRCP", "information recipient")
    )
    user = _agent(
        "http://terminology.hl7.org/CodeSystem/v3-ParticipationType", code, display, actor, requestor=True
    )
    if "/" in actor and not actor.startswith("urn:"):
        user["who"] = {"reference": _absolute(actor, fhir_base)}
    if entry.actor_display:
        user["who"]["display"] = entry.actor_display
    if entry.role:
        user["role"] = [{"text": entry.role}]
    return user


def _agents(
    entry: AuditEntry, pattern: _Pattern, *, site: str, fhir_base: str | None
) -> list[dict[str, Any]]:
    agents = [_agent(DCM, "110153", "Source Role ID", site, requestor=False)]
    if fhir_base:
        destination = _agent(DCM, "110152", "Destination Role ID", fhir_base, requestor=False)
        destination["network"] = {"address": fhir_base, "type": "5"}
        agents.append(destination)
    if entry.actor:
        agents.append(_user_agent(entry, entry.actor, pattern, fhir_base))
    else:
        agents[0]["requestor"] = True
    return agents


def _entities_of(entry: AuditEntry) -> tuple[AuditEntity, ...]:
    # Records written before entities existed name their one resource.
    if entry.entities:
        return entry.entities
    return (AuditEntity(entry.resource),) if entry.resource else ()


def _what(entity: AuditEntity, fhir_base: str | None) -> dict[str, Any]:
    if entity.is_carecanvas:
        return {"identifier": {"system": "urn:ietf:rfc:3986", "value": entity.reference}}
    if "/" not in entity.reference:
        # A search over a resource type (no single resource): the type, never a made-up URL.
        return {"identifier": {"value": entity.reference}}
    return {"reference": _absolute(entity.reference, fhir_base)}


def _object_entity(
    entity: AuditEntity, entry: AuditEntry, pattern: _Pattern, fhir_base: str | None
) -> dict[str, Any]:
    acted_on = entity.role is EntityRole.TARGET
    lifecycle = _LIFECYCLE_BY_VERB.get(pattern.action, _ACCESS) if acted_on else _ACCESS
    item: dict[str, Any] = {
        "what": _what(entity, fhir_base),
        "type": {"system": ENTITY_TYPE, "code": "2", "display": "System Object"},
        "role": (
            {"system": OBJECT_ROLE, "code": "20", "display": "Job"}
            if entity.reference.startswith("urn:carecanvas:job:")
            else {"system": OBJECT_ROLE, "code": "4", "display": "Domain Resource"}
        ),
        "lifecycle": {"system": LIFECYCLE, "code": lifecycle[0], "display": lifecycle[1]},
        "description": entity.role.value,
    }
    if acted_on and entry.action == AuditAction.APPROVE:
        details = [
            {"type": key, "valueString": str(entry.detail[key]).lower()}
            for key in APPROVAL_DETAIL_KEYS
            if key in entry.detail
        ]
        if details:
            item["detail"] = details
    return item


def _patient_entity(patient: str, fhir_base: str | None) -> dict[str, Any]:
    reference = patient if patient.startswith("Patient/") else f"Patient/{patient}"
    return {
        "what": {"reference": _absolute(reference, fhir_base)},
        "type": {"system": ENTITY_TYPE, "code": "1", "display": "Person"},
        "role": {"system": OBJECT_ROLE, "code": "1", "display": "Patient"},
    }


def _entities(entry: AuditEntry, pattern: _Pattern, fhir_base: str | None) -> list[dict[str, Any]]:
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
    entities.extend(
        _object_entity(entity, entry, pattern, fhir_base)
        for entity in _entities_of(entry)
        if not entity.reference.startswith("Patient")
    )
    if entry.patient:
        entities.append(_patient_entity(entry.patient, fhir_base))
    return entities


def _source(site: str) -> dict[str, Any]:
    return {
        "site": site,
        "observer": {"identifier": {"value": f"{site}-audit"}},
        "type": [
            {
                "system": "http://terminology.hl7.org/CodeSystem/security-source-type",
                "code": "4",
                "display": "Application Server",
            }
        ],
    }


def to_audit_event(entry: AuditEntry, *, site: str, fhir_base: str | None) -> dict[str, Any]:
    """One BALP-shaped AuditEvent (R4 JSON), validated with fhir.resources R4B.

    ``fhir_base`` is the record's own EHR's FHIR base: EHR references are made absolute against it,
    CareCanvas's identifiers (``urn:carecanvas:…``) never are.
    """
    pattern = _pattern_for(entry)
    event: dict[str, Any] = {"resourceType": "AuditEvent", "id": f"carecanvas-audit-{entry.seq}"}
    if pattern.profile:
        event["meta"] = {"profile": [BALP + pattern.profile]}
    event |= {
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
        "agent": _agents(entry, pattern, site=site, fhir_base=fhir_base),
        "source": _source(site),
    }
    if entry.description:
        event["outcomeDesc"] = entry.description
    entities = _entities(entry, pattern, fhir_base)
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
