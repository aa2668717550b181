"""Pure builders for what we write back: DocumentReference, Device, Provenance, Binary."""

from __future__ import annotations

import base64
import copy
import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

US_CORE_DOCUMENT_REFERENCE = "http://hl7.org/fhir/us/core/StructureDefinition/us-core-documentreference"
AI_PROVENANCE = "http://hl7.org/fhir/uv/aitransparency/StructureDefinition/AI-Provenance"
US_CORE_PROVENANCE = "http://hl7.org/fhir/us/core/StructureDefinition/us-core-provenance"
AI_INPUT_PROMPT = "http://hl7.org/fhir/uv/aitransparency/StructureDefinition/AI-InputPrompt"
ARTIFACT_IDENTIFIER_SYSTEM = "urn:carecanvas:artifact"
MODEL_IDENTIFIER_SYSTEM = "urn:carecanvas:model"
DEFAULT_TYPE_TEXT = "Patient education illustration (AI-generated, clinician-reviewed)"

_AIAST = {
    "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue",
    "code": "AIAST",
    "display": "Artificial Intelligence asserted",
}
_FORMAT_SYSTEM = "http://ihe.net/fhir/ihe.formatcode.fhir/CodeSystem/formatcode"
_FORMAT_CODE = "urn:ihe:iti:xds:2017:mimeTypeSufficient"
_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
_LANGUAGE = re.compile(r"^[a-z]{2,3}(-[A-Za-z0-9]{2,8})*$")
_PDF = "application/pdf"
_PNG = "image/png"


def _check_id(name: str, value: str) -> str:
    if not isinstance(value, str) or not _ID.match(value):
        raise ValueError(f"{name} must be a FHIR id (1-64 of A-Z a-z 0-9 - .)")
    return value


def fhir_instant(value: datetime) -> str:
    """An aware datetime as a FHIR instant in UTC with second precision, e.g. 2026-06-02T15:04:05Z."""
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError("datetimes written to FHIR must be timezone-aware")
    return value.astimezone(UTC).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")


def sha1_base64(data: bytes) -> str:
    """The FHIR Attachment.hash form: base64 of the SHA-1 digest (a format requirement, not security)."""
    return base64.b64encode(hashlib.sha1(data, usedforsecurity=False).digest()).decode("ascii")


def _attachment(
    *, content_type: str, data: bytes, language: str, title: str, created: datetime, url: str | None
) -> dict[str, Any]:
    attachment: dict[str, Any] = {"contentType": content_type, "language": language}
    if url is None:
        attachment["data"] = base64.b64encode(data).decode("ascii")
    else:
        attachment["url"] = url
    attachment.update(
        {"size": len(data), "hash": sha1_base64(data), "title": title, "creation": fhir_instant(created)}
    )
    return attachment


@dataclass(frozen=True)
class DocumentReferenceInput:
    """What one DocumentReference is built from (validated by build_document_reference).

    `binary_urls` maps a content type ("application/pdf", "image/png") to the Binary URL that holds it;
    those attachments carry `url` instead of inline `data` (size and hash still describe the bytes).
    Exactly one of `condition_id` (education) or `source_ref` (a portrait's story) names the source.
    """

    identifier_value: str
    patient_id: str
    practitioner_id: str
    # The custodian (US Core): the registration's organization, or the clinician's PractitionerRole's.
    organization_id: str
    encounter_id: str | None
    condition_id: str | None
    description: str
    language: str
    pdf: bytes
    png: bytes | None
    alt_text: str
    created: datetime
    date: datetime
    replaces: str | None = None
    # The approving clinician's name (their Practitioner's), shown by EHRs and portals next to the reference.
    practitioner_display: str | None = None
    binary_urls: Mapping[str, str] | None = None
    identifier_system: str = ARTIFACT_IDENTIFIER_SYSTEM
    pdf_title: str | None = None
    type_text: str = DEFAULT_TYPE_TEXT
    period_start: datetime | None = None
    source_ref: str | None = None


_FORMAT = {"system": _FORMAT_SYSTEM, "code": _FORMAT_CODE, "display": "mimeType Sufficient"}
_EDUCATION_EVENT = {
    "coding": [
        {"system": "http://snomed.info/sct", "code": "311401005", "display": "Patient education (procedure)"}
    ]
}
_CLINICAL_NOTE = {
    "coding": [
        {
            "system": "http://hl7.org/fhir/us/core/CodeSystem/us-core-documentreference-category",
            "code": "clinical-note",
            "display": "Clinical Note",
        }
    ]
}


def build_document_reference(spec: DocumentReferenceInput) -> dict[str, Any]:
    """A US Core DocumentReference labelled AI-asserted: the PDF handout first, the PNG second if given."""
    related_ref = _checked_source(spec)
    content = _document_content(spec)
    context = _document_context(spec, related_ref)
    document = _document_header(spec)
    document["custodian"] = {
        "reference": f"Organization/{_check_id('organization_id', spec.organization_id)}"
    }
    if spec.replaces is not None:
        replaced = f"DocumentReference/{_check_id('replaces', spec.replaces)}"
        document["relatesTo"] = [{"code": "replaces", "target": {"reference": replaced}}]
    document["description"] = spec.description
    document["content"] = content
    document["context"] = context
    return document


def _checked_source(spec: DocumentReferenceInput) -> str:
    """Checks every input that needs no building; returns the source reference."""
    for name, value in (("patient_id", spec.patient_id), ("practitioner_id", spec.practitioner_id)):
        _check_id(name, value)
    related_ref = _source_reference(spec.condition_id, spec.source_ref)
    if not spec.identifier_value or not spec.identifier_value.strip():
        raise ValueError("identifier_value must not be empty")
    if not _LANGUAGE.match(spec.language):
        raise ValueError("language must be a BCP 47 tag such as 'en' or 'es-MX'")
    if not spec.pdf:
        raise ValueError("pdf must not be empty: the handout is the one format every EHR accepts")
    if not spec.alt_text.strip():
        raise ValueError("alt_text must not be empty")
    urls = dict(spec.binary_urls or {})
    if set(urls) - {_PDF, _PNG}:
        raise ValueError(f"binary_urls keys must be {_PDF!r} or {_PNG!r}")
    if _PNG in urls and spec.png is None:
        raise ValueError("binary_urls names an image/png Binary but no png was given")
    return related_ref


def _document_content(spec: DocumentReferenceInput) -> list[dict[str, Any]]:
    urls = dict(spec.binary_urls or {})
    parts = [(_PDF, spec.pdf, spec.pdf_title or spec.alt_text)]
    if spec.png is not None:
        parts.append((_PNG, spec.png, spec.alt_text))
    return [
        {
            "attachment": _attachment(
                content_type=content_type,
                data=data,
                language=spec.language,
                title=title,
                created=spec.created,
                url=urls.get(content_type),
            ),
            "format": dict(_FORMAT),
        }
        for content_type, data, title in parts
    ]


def _document_context(spec: DocumentReferenceInput, related_ref: str) -> dict[str, Any]:
    context: dict[str, Any] = {}
    if spec.encounter_id is not None:
        context["encounter"] = [{"reference": f"Encounter/{_check_id('encounter_id', spec.encounter_id)}"}]
    context["event"] = [copy.deepcopy(_EDUCATION_EVENT)]
    if spec.period_start is not None:
        context["period"] = {"start": fhir_instant(spec.period_start)}
    context["related"] = [{"reference": related_ref}]
    return context


def _document_header(spec: DocumentReferenceInput) -> dict[str, Any]:
    return {
        "resourceType": "DocumentReference",
        "meta": {"profile": [US_CORE_DOCUMENT_REFERENCE], "security": [dict(_AIAST)]},
        "identifier": [{"system": spec.identifier_system, "value": spec.identifier_value}],
        "status": "current",
        "docStatus": "final",
        "type": {
            "coding": [{"system": "http://loinc.org", "code": "34895-3", "display": "Education note"}],
            "text": spec.type_text,
        },
        "category": [copy.deepcopy(_CLINICAL_NOTE)],
        "subject": {"reference": f"Patient/{spec.patient_id}"},
        "date": fhir_instant(spec.date),
        "author": [_person_reference("Practitioner", spec.practitioner_id, spec.practitioner_display)],
    }


def _person_reference(kind: str, resource_id: str, display: str | None) -> dict[str, str]:
    reference = {"reference": f"{kind}/{resource_id}"}
    if display and display.strip():
        reference["display"] = display.strip()[:200]
    return reference


def build_model_device(
    *,
    device_id_value: str,
    model_name: str,
    model_version: str,
    identifier_system: str = MODEL_IDENTIFIER_SYSTEM,
) -> dict[str, Any]:
    """A Device for the generative model (the Provenance author), identified for conditional create."""
    if not device_id_value.strip() or not model_name.strip() or not model_version.strip():
        raise ValueError("device_id_value, model_name and model_version must not be empty")
    return {
        "resourceType": "Device",
        "identifier": [{"system": identifier_system, "value": device_id_value}],
        "status": "active",
        "deviceName": [{"name": model_name, "type": "model-name"}],
        "type": {
            "coding": [
                {
                    "system": "http://hl7.org/fhir/uv/aitransparency/CodeSystem/AIdeviceTypeCS",
                    "code": "Artificial-Intelligence",
                }
            ],
            "text": "Generative image model",
        },
        "version": [{"value": model_version}],
    }


def _reference(name: str, value: str, resource_type: str) -> str:
    """Accept "Type/id" or a transaction placeholder "urn:uuid:..."; anything else is a caller bug."""
    if value.startswith("urn:uuid:"):
        return value
    prefix, _, rest = value.partition("/")
    if prefix != resource_type or not _ID.match(rest):
        raise ValueError(f"{name} must be '{resource_type}/<id>' or 'urn:uuid:<uuid>'")
    return value


def _source_reference(condition_id: str | None, source_ref: str | None) -> str:
    """What the picture was made from: a Condition (education) or a QuestionnaireResponse (portrait story)."""
    if (condition_id is None) == (source_ref is None):
        raise ValueError("give exactly one of condition_id or source_ref")
    if condition_id is not None:
        return f"Condition/{_check_id('condition_id', condition_id)}"
    assert source_ref is not None  # noqa: S101 - narrowed by the check above
    prefix = source_ref.partition("/")[0]
    if prefix not in ("Condition", "QuestionnaireResponse"):
        raise ValueError("source_ref must be 'Condition/<id>' or 'QuestionnaireResponse/<id>'")
    return _reference("source_ref", source_ref, prefix)


def build_provenance(
    *,
    target_ref: str,
    device_ref: str,
    practitioner_id: str,
    organization_id: str,
    condition_id: str | None,
    prompt_markdown: str,
    started: datetime,
    ended: datetime,
    recorded: datetime,
    source_ref: str | None = None,
    practitioner_display: str | None = None,
) -> dict[str, Any]:
    """AI-Provenance: model Device as author, clinician as verifier, Condition as source, prompt contained."""
    _reference("target_ref", target_ref, "DocumentReference")
    _reference("device_ref", device_ref, "Device")
    _check_id("practitioner_id", practitioner_id)
    source = _source_reference(condition_id, source_ref)
    if ended < started:
        raise ValueError("ended must not be before started")
    return {
        "resourceType": "Provenance",
        "meta": {"profile": [AI_PROVENANCE, US_CORE_PROVENANCE]},
        "contained": [_input_prompt(prompt_markdown)],
        "target": [{"reference": target_ref}],
        "occurredPeriod": {"start": fhir_instant(started), "end": fhir_instant(ended)},
        "recorded": fhir_instant(recorded),
        "reason": [
            {"coding": [dict(_AIAST)]},
            {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActReason", "code": "TREAT"}]},
        ],
        "activity": {
            "coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-DataOperation", "code": "CREATE"}]
        },
        "agent": _provenance_agents(device_ref, practitioner_id, organization_id, practitioner_display),
        "entity": [
            {"role": "source", "what": {"reference": source}},
            {"role": "derivation", "what": {"reference": "#prompt1"}},
        ],
    }


def _input_prompt(prompt_markdown: str) -> dict[str, Any]:
    """The prompt as a contained AI-InputPrompt DocumentReference (`#prompt1`)."""
    return {
        "resourceType": "DocumentReference",
        "id": "prompt1",
        "meta": {"profile": [AI_INPUT_PROMPT]},
        "status": "current",
        "type": {
            "coding": [
                {
                    "system": "http://hl7.org/fhir/uv/aitransparency/CodeSystem/AIinputsCS",
                    "code": "AIInputPrompt",
                }
            ]
        },
        "content": [
            {
                "attachment": {
                    "contentType": "text/markdown",
                    "data": base64.b64encode(prompt_markdown.encode("utf-8")).decode("ascii"),
                }
            }
        ],
    }


def _participant(code: str) -> dict[str, Any]:
    return {
        "coding": [
            {"system": "http://terminology.hl7.org/CodeSystem/provenance-participant-type", "code": code}
        ]
    }


def _provenance_agents(
    device_ref: str, practitioner_id: str, organization_id: str, practitioner_display: str | None = None
) -> list[dict[str, Any]]:
    # US Core provenance-1: a Device or Practitioner agent acts on behalf of an Organization.
    on_behalf_of = {
        "onBehalfOf": {"reference": f"Organization/{_check_id('organization_id', organization_id)}"}
    }
    ai_role = {
        "coding": [
            {
                "system": "http://hl7.org/fhir/uv/aitransparency/CodeSystem/AIdeviceTypeCS",
                "code": "Artificial-Intelligence",
            }
        ]
    }
    return [
        {"type": _participant("author"), "role": [ai_role], "who": {"reference": device_ref}, **on_behalf_of},
        {
            "type": _participant("verifier"),
            "who": _person_reference("Practitioner", practitioner_id, practitioner_display),
            **on_behalf_of,
        },
    ]


def build_binary(*, content_type: str, data: bytes, patient_id: str) -> dict[str, Any]:
    """A Binary whose access follows the patient's (securityContext)."""
    if not content_type or "/" not in content_type:
        raise ValueError("content_type must be a MIME type such as 'image/png'")
    _check_id("patient_id", patient_id)
    return {
        "resourceType": "Binary",
        "contentType": content_type,
        "securityContext": {"reference": f"Patient/{patient_id}"},
        "data": base64.b64encode(data).decode("ascii"),
    }
