"""Write-back builders reproduce the shared example shapes, and everything they build validates."""

from __future__ import annotations

import base64
import copy
import hashlib
import json
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from fhir_adapters import (
    DocumentReferenceInput,
    ResourceValidationError,
    build_binary,
    build_document_reference,
    build_model_device,
    build_provenance,
    validate_resource,
)

EXAMPLES = Path(__file__).resolve().parents[2] / "docs" / "fhir-examples"
PDF = b"%PDF-1.7\n"
PNG = b"\x89PNG\r\n\x1a\n"


def example(name: str) -> dict[str, Any]:
    return json.loads((EXAMPLES / name).read_text())


def document(**overrides: Any) -> dict[str, Any]:
    ex = example("DocumentReference-education-illustration.json")
    values: dict[str, Any] = {
        "identifier_value": "3f2c9d1e-illustration-v1",
        "patient_id": "123",
        "practitioner_id": "456",
        "organization_id": "org-1",
        "encounter_id": "789",
        "condition_id": "cond-123",
        "description": ex["description"],
        "language": "en",
        "pdf": PDF,
        "png": PNG,
        "alt_text": "Drawing: insulin 'keys' unlocking a cell so sugar can enter.",
        "pdf_title": ex["content"][0]["attachment"]["title"],
        "created": datetime(2026, 6, 2, 14, 58, 10, tzinfo=UTC),
        "date": datetime(2026, 6, 2, 15, 4, 5, tzinfo=UTC),
        "period_start": datetime(2026, 6, 2, 14, 30, tzinfo=UTC),
    }
    values.update(overrides)
    return build_document_reference(DocumentReferenceInput(**values))


def provenance(**overrides: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "target_ref": "DocumentReference/edu-img-1",
        "device_ref": "Device/carecanvas-model-1",
        "practitioner_id": "456",
        "organization_id": "org-1",
        "condition_id": "cond-123",
        "prompt_markdown": "---\nmodel: ...\n---",
        "started": datetime(2026, 6, 2, 14, 57, 40, tzinfo=UTC),
        "ended": datetime(2026, 6, 2, 15, 3, 55, tzinfo=UTC),
        "recorded": datetime(2026, 6, 2, 15, 4, 5, tzinfo=UTC),
    }
    values.update(overrides)
    return build_provenance(**values)


@pytest.mark.parametrize("name", sorted(p.name for p in EXAMPLES.glob("*.json")))
def test_shared_examples_validate(name: str) -> None:
    validate_resource(example(name))


def test_document_reference_matches_the_shared_example() -> None:
    expected = example("DocumentReference-education-illustration.json")
    built = document()
    # Our PNG format coding carries the display too; everything else is identical.
    expected["content"][1]["format"]["display"] = "mimeType Sufficient"
    assert built == expected
    validate_resource(built)


def test_attachment_size_and_hash_describe_the_bytes() -> None:
    pdf = b"%PDF-1.7 some handout bytes"
    built = document(pdf=pdf, png=None, pdf_title=None)
    attachment = built["content"][0]["attachment"]
    assert len(built["content"]) == 1
    assert base64.b64decode(attachment["data"]) == pdf
    assert attachment["size"] == len(pdf)
    assert attachment["hash"] == base64.b64encode(hashlib.sha1(pdf, usedforsecurity=False).digest()).decode()
    assert attachment["title"] == "Drawing: insulin 'keys' unlocking a cell so sugar can enter."
    validate_resource(built)


def test_optional_parts() -> None:
    built = document(encounter_id=None, period_start=None, replaces="old-doc-1", language="es")
    assert built["custodian"] == {"reference": "Organization/org-1"}  # US Core: never optional here
    assert "encounter" not in built["context"]
    assert "period" not in built["context"]
    assert built["relatesTo"] == [
        {"code": "replaces", "target": {"reference": "DocumentReference/old-doc-1"}}
    ]
    assert {c["attachment"]["language"] for c in built["content"]} == {"es"}
    validate_resource(built)


def test_binary_urls_replace_inline_data() -> None:
    built = document(binary_urls={"image/png": "Binary/b1"})
    png = built["content"][1]["attachment"]
    assert png["url"] == "Binary/b1"
    assert "data" not in png
    assert png["size"] == len(PNG)
    assert "data" in built["content"][0]["attachment"]
    validate_resource(built)


def test_times_are_normalised_to_utc() -> None:
    eastern = timezone(timedelta(hours=-5))
    built = document(date=datetime(2026, 6, 2, 10, 4, 5, 999, tzinfo=eastern))
    assert built["date"] == "2026-06-02T15:04:05Z"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"patient_id": "123/../x"}, "patient_id"),
        ({"condition_id": ""}, "condition_id"),
        ({"language": "English"}, "language"),
        ({"pdf": b""}, "pdf"),
        ({"alt_text": "  "}, "alt_text"),
        ({"date": datetime(2026, 1, 1)}, "timezone-aware"),
        ({"binary_urls": {"text/plain": "Binary/x"}}, "binary_urls"),
        ({"png": None, "binary_urls": {"image/png": "Binary/x"}}, "no png"),
        ({"identifier_value": ""}, "identifier_value"),
    ],
)
def test_document_reference_input_errors(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        document(**overrides)


def test_provenance_matches_the_shared_example() -> None:
    built = provenance()
    assert built == example("Provenance-ai-generated.json")
    assert (
        base64.b64decode(built["contained"][0]["content"][0]["attachment"]["data"]) == b"---\nmodel: ...\n---"
    )
    validate_resource(built)


def test_provenance_variants_and_errors() -> None:
    placeholder = provenance(target_ref="urn:uuid:1b4e28ba-2fa1-11d2-883f-0016d3cca427")
    assert all(agent["onBehalfOf"] == {"reference": "Organization/org-1"} for agent in placeholder["agent"])
    validate_resource(placeholder)
    with pytest.raises(ValueError, match="organization_id"):
        provenance(organization_id="")
    with pytest.raises(ValueError, match="target_ref"):
        provenance(target_ref="Patient/1")
    with pytest.raises(ValueError, match="device_ref"):
        provenance(device_ref="Device/")
    with pytest.raises(ValueError, match="ended"):
        provenance(ended=datetime(2026, 6, 2, 14, 0, tzinfo=UTC))


def test_device_and_binary() -> None:
    device = build_model_device(device_id_value="tiny-sd@1", model_name="tiny-sd", model_version="1")
    assert device["identifier"] == [{"system": "urn:carecanvas:model", "value": "tiny-sd@1"}]
    assert device["deviceName"] == [{"name": "tiny-sd", "type": "model-name"}]
    validate_resource(device)
    binary = build_binary(content_type="image/png", data=PNG, patient_id="pat-1")
    assert binary["securityContext"] == {"reference": "Patient/pat-1"}
    assert base64.b64decode(binary["data"]) == PNG
    validate_resource(binary)
    with pytest.raises(ValueError, match="MIME"):
        build_binary(content_type="png", data=PNG, patient_id="pat-1")
    with pytest.raises(ValueError, match="must not be empty"):
        build_model_device(device_id_value=" ", model_name="m", model_version="1")


def test_validation_names_the_field_not_the_value() -> None:
    broken = copy.deepcopy(document())
    broken["content"][0]["attachment"]["size"] = "secret-value"
    with pytest.raises(ResourceValidationError) as caught:
        validate_resource(broken)
    assert "DocumentReference.content[0].attachment.size" in str(caught.value)
    assert "secret-value" not in str(caught.value)


def test_validation_errors() -> None:
    with pytest.raises(ResourceValidationError, match="no resourceType"):
        validate_resource({})
    with pytest.raises(ResourceValidationError, match="not an R4 resource type"):
        validate_resource({"resourceType": "Spaceship"})
    with pytest.raises(ResourceValidationError, match=r"DocumentReference\.content: missing"):
        validate_resource({"resourceType": "DocumentReference", "status": "current"})
    unknown = document()
    unknown["colour"] = "blue"
    with pytest.raises(ResourceValidationError, match=r"DocumentReference\.colour: extra_forbidden"):
        validate_resource(unknown)


def test_portraits_cite_the_story_as_their_source() -> None:
    story = "QuestionnaireResponse/qr-story-1"
    built = provenance(condition_id=None, source_ref=story)
    assert [e["what"]["reference"] for e in built["entity"] if e["role"] == "source"] == [story]
    validate_resource(built)


@pytest.mark.parametrize(
    ("condition_id", "source_ref"),
    [
        (None, None),
        ("cond-1", "QuestionnaireResponse/qr-1"),
        (None, "Patient/pat-1"),
        (None, "Condition/bad id"),
    ],
)
def test_exactly_one_valid_source_is_required(condition_id: str | None, source_ref: str | None) -> None:
    with pytest.raises(ValueError, match=r"source_ref|condition_id"):
        provenance(condition_id=condition_id, source_ref=source_ref)
