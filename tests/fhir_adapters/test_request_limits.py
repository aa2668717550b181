"""Fitting a write-back into an EHR's body limit (pure planning) and doing it against a real server."""

from __future__ import annotations

import base64
from datetime import UTC, datetime
from typing import Any

import pytest
from fhir_test_servers import MiniFhir, Reply, Request, ScriptedServer

from fhir_adapters import (
    DocumentReferenceInput,
    FhirClient,
    RequestLimitError,
    body_bytes,
    build_document_reference,
    build_model_device,
    build_provenance,
    fit_request_limit,
    write_document_set,
)
from fhir_adapters.write import max_binary_data_bytes

NOW = datetime(2026, 12, 1, 14, 0, tzinfo=UTC)
SYSTEM = "urn:carecanvas:artifact"


def parts(*, pdf: int, png: int) -> dict[str, Any]:
    document = build_document_reference(
        DocumentReferenceInput(
            identifier_value="job-1-v1",
            patient_id="pat-1",
            practitioner_id="prac-1",
            organization_id="org-1",
            encounter_id=None,
            condition_id="cond-1",
            description="Asthma",
            language="en",
            pdf=b"%PDF" + b"p" * pdf,
            png=b"\x89PNG" + b"i" * png,
            alt_text="A drawing.",
            created=NOW,
            date=NOW,
        )
    )
    device = build_model_device(device_id_value="tiny:1", model_name="tiny", model_version="1")
    provenance = build_provenance(
        target_ref="urn:uuid:1b4e28ba-2fa1-11d2-883f-0016d3cca427",
        device_ref="urn:uuid:2b4e28ba-2fa1-11d2-883f-0016d3cca427",
        practitioner_id="prac-1",
        organization_id="org-1",
        condition_id="cond-1",
        prompt_markdown="a prompt",
        started=NOW,
        ended=NOW,
        recorded=NOW,
    )
    return {"document": document, "device": device, "provenance": provenance}


def test_within_the_limit_nothing_moves() -> None:
    given = parts(pdf=1000, png=1000)
    plan = fit_request_limit(given["document"], (), **_rest(given), limit=1_000_000, transaction=True)
    assert plan.separate == ()
    assert plan.document == given["document"]


def test_the_largest_attachment_leaves_first_and_only_as_much_as_needed() -> None:
    given = parts(pdf=50_000, png=30_000)
    plan = fit_request_limit(given["document"], (), **_rest(given), limit=80_000, transaction=True)
    assert [upload.resource["contentType"] for upload in plan.separate] == ["application/pdf"]
    assert plan.document["content"][0]["attachment"]["url"] == plan.separate[0].placeholder_url
    assert "data" in plan.document["content"][1]["attachment"]  # the PNG stays inline: it fits now
    assert body_bytes(plan.separate[0].resource) <= 80_000


def test_one_attachment_over_the_ceiling_is_refused_before_anything_is_sent() -> None:
    given = parts(pdf=10_000, png=90_000)
    with pytest.raises(RequestLimitError) as caught:
        fit_request_limit(given["document"], (), **_rest(given), limit=60_000, transaction=False)
    assert caught.value.content_type == "image/png"
    assert caught.value.max_data_bytes == max_binary_data_bytes(60_000)
    assert 40_000 < caught.value.max_data_bytes < 45_000  # base64 takes 4 bytes for every 3
    # Between the target and the ceiling it is still tried.
    plan = fit_request_limit(
        given["document"], (), **_rest(given), limit=60_000, ceiling=200_000, transaction=False
    )
    assert {u.resource["contentType"] for u in plan.separate} == {"image/png"}


def _rest(given: dict[str, Any]) -> dict[str, Any]:
    return {"device": given["device"], "provenance": given["provenance"]}


class BodyLimited:
    """MiniFhir behind a proxy that answers 413 to any body over `limit` bytes."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.fhir = MiniFhir(transactions=True)
        self.sizes: list[tuple[str, int]] = []

    def __call__(self, request: Request) -> Reply:
        if request.body:
            self.sizes.append((request.path, len(request.body)))
        if len(request.body) > self.limit:
            return Reply(413, b"<html>413 Request Entity Too Large</html>", content_type="text/html")
        return self.fhir(request)


async def test_binaries_go_first_in_their_own_requests_and_the_set_is_written_once(
    server: ScriptedServer,
) -> None:
    backend = BodyLimited(limit=100_000)
    server.handle = backend
    given = parts(pdf=50_000, png=40_000)
    async with FhirClient(f"{server.url}/fhir", auth=None) as client:
        written = await write_document_set(
            client, **given, identifier_system=SYSTEM, identifier_value="job-1-v1", max_request_bytes=100_000
        )
        again = await write_document_set(
            client, **given, identifier_system=SYSTEM, identifier_value="job-1-v1", max_request_bytes=100_000
        )
    assert written.strategy == "transaction"
    assert again.strategy == "already-written"
    assert all(size <= 100_000 for _, size in backend.sizes), backend.sizes
    (document,) = backend.fhir.resources("DocumentReference")
    assert len(backend.fhir.resources("Provenance")) == 1
    pdf_url = document["content"][0]["attachment"]["url"]
    stored = backend.fhir.store["Binary"][pdf_url.removeprefix("Binary/")]
    assert base64.b64decode(stored["data"]).startswith(b"%PDF")
