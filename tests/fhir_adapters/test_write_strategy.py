"""write_document_set and mark_entered_in_error against a small real FHIR server on loopback."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from fhir_test_servers import MiniFhir, ScriptedServer

from fhir_adapters import (
    AttachmentPolicy,
    DocumentReferenceInput,
    FatalFhirError,
    FhirClient,
    ResourceValidationError,
    TemporaryFhirError,
    apply_attachment_policy,
    attachment_policy_from_capabilities,
    build_document_reference,
    build_model_device,
    build_provenance,
    mark_entered_in_error,
    write_document_set,
)

SYSTEM = "urn:carecanvas:artifact"
NOW = datetime(2026, 6, 2, 15, 4, 5, tzinfo=UTC)


def document_set(
    value: str = "job-1-v1", png: bytes | None = b"\x89PNG\r\n\x1a\n" + b"x" * 100
) -> dict[str, Any]:
    document = build_document_reference(
        DocumentReferenceInput(
            identifier_value=value,
            patient_id="pat-1",
            practitioner_id="prac-1",
            organization_id="org-1",
            encounter_id="enc-1",
            condition_id="cond-1",
            description="How insulin helps",
            language="en",
            pdf=b"%PDF-1.7\n" + b"p" * 50,
            png=png,
            alt_text="Insulin keys unlocking a cell.",
            created=NOW,
            date=NOW,
        )
    )
    device = build_model_device(device_id_value="tiny@1", model_name="tiny", model_version="1")
    provenance = build_provenance(
        target_ref="urn:uuid:00000000-0000-4000-8000-000000000001",
        device_ref="urn:uuid:00000000-0000-4000-8000-000000000002",
        practitioner_id="prac-1",
        organization_id="org-1",
        condition_id="cond-1",
        prompt_markdown="prompt",
        started=NOW,
        ended=NOW,
        recorded=NOW,
    )
    return {"document": document, "device": device, "provenance": provenance}


@pytest.fixture(params=[True, False], ids=["transaction", "single-requests"])
def fhir(request: pytest.FixtureRequest, server: ScriptedServer) -> Iterator[tuple[MiniFhir, ScriptedServer]]:
    mini = MiniFhir(transactions=request.param)
    server.handle = mini
    return mini, server


def client_for(server: ScriptedServer) -> FhirClient:
    return FhirClient(f"{server.url}/fhir", auth=None, backoff_seconds=0.01)


def assert_one_complete_set(mini: MiniFhir, written_id: str) -> None:
    documents = mini.resources("DocumentReference")
    assert [d["id"] for d in documents] == [written_id]
    provenances = mini.resources("Provenance")
    assert len(provenances) == 1
    assert provenances[0]["target"] == [{"reference": f"DocumentReference/{written_id}"}]
    devices = mini.resources("Device")
    assert len(devices) == 1
    assert provenances[0]["agent"][0]["who"] == {"reference": f"Device/{devices[0]['id']}"}


async def test_writes_one_complete_set(fhir: tuple[MiniFhir, ScriptedServer]) -> None:
    mini, server = fhir
    async with client_for(server) as client:
        written = await write_document_set(
            client, **document_set(), identifier_system=SYSTEM, identifier_value="job-1-v1"
        )
    assert written.created
    assert written.strategy == ("transaction" if mini.transactions else "single-requests")
    assert written.version_id == "1"
    assert_one_complete_set(mini, written.document_id)
    methods = [(r.method, r.path.split("?")[0]) for r in server.requests]
    if mini.transactions:
        assert ("POST", "/fhir") in methods
    else:
        posts = [path for method, path in methods if method == "POST"]
        assert posts == ["/fhir/Device", "/fhir/DocumentReference", "/fhir/Provenance"]


async def test_second_call_writes_nothing_new(fhir: tuple[MiniFhir, ScriptedServer]) -> None:
    mini, server = fhir
    async with client_for(server) as client:
        first = await write_document_set(
            client, **document_set(), identifier_system=SYSTEM, identifier_value="job-1-v1"
        )
        second = await write_document_set(
            client, **document_set(), identifier_system=SYSTEM, identifier_value="job-1-v1"
        )
    assert second.document_id == first.document_id
    assert not second.created
    assert second.strategy == "already-written"
    assert_one_complete_set(mini, first.document_id)


async def test_commit_then_503_leaves_one_document(fhir: tuple[MiniFhir, ScriptedServer]) -> None:
    mini, server = fhir
    mini.fail_after_commit = {"transaction"} if mini.transactions else {"DocumentReference"}
    async with client_for(server) as client:
        written = await write_document_set(
            client, **document_set(), identifier_system=SYSTEM, identifier_value="job-1-v1"
        )
    assert not mini.fail_after_commit, "the fault was triggered"
    assert_one_complete_set(mini, written.document_id)


async def test_provenance_commit_then_503_is_retried_conditionally(server: ScriptedServer) -> None:
    mini = MiniFhir(transactions=False)
    mini.fail_after_commit = {"Provenance"}
    server.handle = mini
    async with client_for(server) as client:
        written = await write_document_set(
            client, **document_set(), identifier_system=SYSTEM, identifier_value="job-1-v1"
        )
    assert_one_complete_set(mini, written.document_id)
    retried = [r for r in server.requests if r.method == "POST" and r.path == "/fhir/Provenance"]
    assert [r.headers["if-none-exist"] for r in retried] == [
        f"target=DocumentReference/{written.document_id}"
    ] * 2


async def test_invalid_resources_are_never_sent(fhir: tuple[MiniFhir, ScriptedServer]) -> None:
    _mini, server = fhir
    parts = document_set()
    parts["provenance"]["recorded"] = "yesterday"
    async with client_for(server) as client:
        with pytest.raises(ResourceValidationError, match=r"Provenance\.recorded"):
            await write_document_set(client, **parts, identifier_system=SYSTEM, identifier_value="job-1-v1")
    assert server.requests == []


async def test_identifier_must_match_the_document(server: ScriptedServer) -> None:
    async with client_for(server) as client:
        with pytest.raises(ValueError, match="identifier"):
            await write_document_set(
                client, **document_set(), identifier_system=SYSTEM, identifier_value="other"
            )
    assert server.requests == []


async def test_attachment_policy_drops_images_and_moves_large_ones_to_binary(
    fhir: tuple[MiniFhir, ScriptedServer],
) -> None:
    mini, server = fhir
    parts = document_set(png=b"\x89PNG" + b"i" * 5000)
    no_images, uploads = apply_attachment_policy(
        parts["document"],
        policy=AttachmentPolicy(accept_images=False, max_inline_bytes=10_000),
        patient_id="pat-1",
    )
    assert [c["attachment"]["contentType"] for c in no_images["content"]] == ["application/pdf"]
    assert uploads == ()

    document, uploads = apply_attachment_policy(
        parts["document"],
        policy=AttachmentPolicy(accept_images=True, max_inline_bytes=1000),
        patient_id="pat-1",
    )
    assert [u.content_index for u in uploads] == [1]
    assert document["content"][1]["attachment"]["url"] == uploads[0].placeholder_url
    assert document["content"][1]["attachment"]["size"] == 5004
    assert "data" in document["content"][0]["attachment"]
    parts["document"] = document
    async with client_for(server) as client:
        written = await write_document_set(
            client, **parts, binaries=uploads, identifier_system=SYSTEM, identifier_value="job-1-v1"
        )
    [binary] = mini.resources("Binary")
    assert base64.b64decode(binary["data"]) == b"\x89PNG" + b"i" * 5000
    assert binary["securityContext"] == {"reference": "Patient/pat-1"}
    [stored] = mini.resources("DocumentReference")
    assert stored["id"] == written.document_id
    assert stored["content"][1]["attachment"]["url"] == f"Binary/{binary['id']}"


async def test_server_refusing_images_fails_without_a_document(server: ScriptedServer) -> None:
    mini = MiniFhir(transactions=False)
    mini.reject_content_types = {"image/png"}
    server.handle = mini
    async with client_for(server) as client:
        with pytest.raises(FatalFhirError) as caught:
            await write_document_set(
                client, **document_set(), identifier_system=SYSTEM, identifier_value="job-1-v1"
            )
    assert caught.value.status == 422
    assert caught.value.diagnostics == "content type not accepted"
    assert mini.resources("DocumentReference") == []


async def test_transaction_failure_that_did_not_commit_is_reported(server: ScriptedServer) -> None:
    mini = MiniFhir(transactions=True)
    calls = {"n": 0}

    def handle(request: Any) -> Any:
        if request.method == "POST" and request.path == "/fhir":
            calls["n"] += 1
            from fhir_test_servers import Reply

            return Reply(503)
        return mini(request)

    server.handle = handle
    async with client_for(server) as client:
        with pytest.raises(TemporaryFhirError):
            await write_document_set(
                client, **document_set(), identifier_system=SYSTEM, identifier_value="job-1-v1"
            )
    assert calls["n"] == 1  # not all entries are conditional, so the transaction itself is not resent
    assert mini.resources("DocumentReference") == []


async def test_mark_entered_in_error(server: ScriptedServer) -> None:
    mini = MiniFhir(transactions=False)
    server.handle = mini
    async with client_for(server) as client:
        written = await write_document_set(
            client, **document_set(), identifier_system=SYSTEM, identifier_value="job-1-v1"
        )
        result = await mark_entered_in_error(client, written.document_id)
        assert result is not None
        assert result.version_id == "2"
        assert await mark_entered_in_error(client, written.document_id) is None
    stored = mini.store["DocumentReference"][written.document_id]
    assert stored["status"] == "entered-in-error"
    put = next(r for r in server.requests if r.method == "PUT")
    assert put.headers["if-match"] == 'W/"1"'


def capability_with(*extensions: dict[str, Any]) -> dict[str, Any]:
    return {
        "resourceType": "CapabilityStatement",
        "rest": [
            {"mode": "server", "resource": [{"type": "DocumentReference", "extension": list(extensions)}]}
        ],
    }


def test_attachment_policy_from_capabilities_only_narrows() -> None:
    from fhir_adapters.write import ACCEPTED_CONTENT_TYPE_EXTENSION, MAX_INLINE_BYTES_EXTENSION

    default = AttachmentPolicy(accept_images=True, max_inline_bytes=100_000)
    pdf_only = capability_with({"url": ACCEPTED_CONTENT_TYPE_EXTENSION, "valueCode": "application/pdf"})
    assert attachment_policy_from_capabilities(pdf_only, default=default) == AttachmentPolicy(False, 100_000)
    small = capability_with(
        {"url": ACCEPTED_CONTENT_TYPE_EXTENSION, "valueCode": "*/*"},
        {"url": MAX_INLINE_BYTES_EXTENSION, "valueInteger": 65536},
    )
    assert attachment_policy_from_capabilities(small, default=default) == AttachmentPolicy(True, 65536)
    larger = capability_with({"url": MAX_INLINE_BYTES_EXTENSION, "valueInteger": 10**9})
    assert attachment_policy_from_capabilities(larger, default=default) == default
    no_images = AttachmentPolicy(accept_images=False, max_inline_bytes=10)
    assert attachment_policy_from_capabilities(small, default=no_images) == no_images
    assert (
        attachment_policy_from_capabilities({"resourceType": "CapabilityStatement"}, default=default)
        == default
    )
