"""The sandbox EHR's chart view: a patient's documents as its FHIR server holds them, Provenance and Device.

A clinician (or a newcomer to the demo) checks there what CareCanvas wrote back.
"""

from __future__ import annotations

import base64
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.templating import Jinja2Templates

from sandbox.auth.config import DEMO_CLIENT_ID
from sandbox.auth.oauth import SmartAuthorizationServer


@dataclass
class AttachmentView:
    content_type: str
    title: str
    size: int | None
    index: int


@dataclass
class DocumentView:
    id: str
    description: str
    date: str
    status: str
    doc_status: str
    type_text: str
    authors: list[str]
    custodian: str
    replaces: list[str]
    attachments: list[AttachmentView]
    provenance: list[str] = field(default_factory=list)
    devices: list[str] = field(default_factory=list)


def _token(server: SmartAuthorizationServer) -> str:
    """The EHR's own read access to its FHIR server (the chart view is the EHR, not an app)."""
    now = int(time.time())
    return server.mint_access_token(
        {
            "iss": server.config.issuer,
            "aud": server.config.fhir_base,
            "iat": now,
            "exp": now + 300,
            "jti": secrets.token_urlsafe(16),
            "scope": "system/*.rs",
            "client_id": DEMO_CLIENT_ID,
            "sub": DEMO_CLIENT_ID,
        }
    )


def _reference_text(reference: dict[str, Any] | None) -> str:
    if not reference:
        return ""
    return str(reference.get("display") or reference.get("reference") or "")


def _document_view(resource: dict[str, Any]) -> DocumentView:
    attachments = []
    for index, content in enumerate(resource.get("content") or []):
        attachment = content.get("attachment") or {}
        attachments.append(
            AttachmentView(
                content_type=str(attachment.get("contentType") or "unknown"),
                title=str(attachment.get("title") or ""),
                size=attachment.get("size"),
                index=index,
            )
        )
    return DocumentView(
        id=str(resource.get("id")),
        description=str(resource.get("description") or ""),
        date=str(resource.get("date") or ""),
        status=str(resource.get("status") or ""),
        doc_status=str(resource.get("docStatus") or ""),
        type_text=str((resource.get("type") or {}).get("text") or ""),
        authors=[_reference_text(author) for author in resource.get("author") or []],
        custodian=_reference_text(resource.get("custodian")),
        replaces=[
            _reference_text(relation.get("target"))
            for relation in resource.get("relatesTo") or []
            if relation.get("code") == "replaces"
        ],
        attachments=attachments,
    )


async def _search(client: httpx.AsyncClient, path: str, params: dict[str, str]) -> list[dict[str, Any]]:
    response = await client.get(path, params=params)
    response.raise_for_status()
    return [entry["resource"] for entry in response.json().get("entry") or [] if "resource" in entry]


def _provenance_lines(provenance: dict[str, Any]) -> list[str]:
    lines = []
    for agent in provenance.get("agent") or []:
        role = ", ".join(
            coding.get("display") or coding.get("code") or ""
            for coding in ((agent.get("type") or {}).get("coding") or [])
        )
        who = _reference_text(agent.get("who"))
        on_behalf = _reference_text(agent.get("onBehalfOf"))
        line = f"{role or 'agent'}: {who}"
        if on_behalf:
            line += f" (on behalf of {on_behalf})"
        lines.append(line)
    return lines


def _device_text(device: dict[str, Any]) -> str:
    names = [str(name.get("name")) for name in device.get("deviceName") or [] if name.get("name")]
    versions = [str(version.get("value")) for version in device.get("version") or [] if version.get("value")]
    text = names[0] if names else f"Device/{device.get('id')}"
    return f"{text} {versions[0]}" if versions else text


async def load_chart(server: SmartAuthorizationServer, patient_id: str) -> list[DocumentView]:
    """The patient's DocumentReferences, newest first, each with its Provenance agents and Devices."""
    headers = {"Authorization": f"Bearer {_token(server)}", "Accept": "application/fhir+json"}
    async with httpx.AsyncClient(base_url=server.config.fhir_base, headers=headers, timeout=10) as client:
        resources = await _search(
            client,
            "/DocumentReference",
            {"patient": f"Patient/{patient_id}", "_sort": "-date", "_count": "100"},
        )
        documents = [_document_view(resource) for resource in resources]
        for document in documents:
            provenances = await _search(client, "/Provenance", {"target": f"DocumentReference/{document.id}"})
            for provenance in provenances:
                document.provenance += _provenance_lines(provenance)
                for agent in provenance.get("agent") or []:
                    reference = str((agent.get("who") or {}).get("reference") or "")
                    if reference.startswith("Device/"):
                        response = await client.get(f"/{reference}")
                        if response.status_code == 200:
                            document.devices.append(_device_text(response.json()))
    return documents


async def load_attachment(
    server: SmartAuthorizationServer, document_id: str, index: int
) -> tuple[bytes, str] | None:
    """One attachment's bytes (inline data, or the Binary its url names on this FHIR server)."""
    headers = {"Authorization": f"Bearer {_token(server)}", "Accept": "application/fhir+json"}
    async with httpx.AsyncClient(base_url=server.config.fhir_base, headers=headers, timeout=10) as client:
        response = await client.get(f"/DocumentReference/{document_id}")
        if response.status_code != 200:
            return None
        contents = response.json().get("content") or []
        if not 0 <= index < len(contents):
            return None
        attachment = contents[index].get("attachment") or {}
        content_type = str(attachment.get("contentType") or "application/octet-stream")
        if attachment.get("data"):
            return base64.b64decode(attachment["data"]), content_type
        url = str(attachment.get("url") or "")
        binary_id = url.rsplit("Binary/", 1)[-1] if "Binary/" in url else ""
        if not binary_id or "/" in binary_id:
            return None
        binary = await client.get(f"/Binary/{binary_id}", headers={"Accept": content_type})
        if binary.status_code != 200:
            return None
        if binary.headers.get("content-type", "").startswith("application/fhir+json"):
            return base64.b64decode(binary.json().get("data") or ""), content_type
        return binary.content, content_type


_SAFE_TYPES = ("image/png", "image/jpeg", "image/webp", "application/pdf")


def chart_routes(server: SmartAuthorizationServer, templates: Jinja2Templates) -> list[Route]:
    """GET /ehr/chart?patient=… (the documents list) and GET /ehr/chart/attachment (one attachment)."""

    async def chart(request: Request) -> Response:
        patient_id = request.query_params.get("patient", "")
        patient = next((p for p in server.directory.patients if p.id == patient_id), None)
        if patient is None:
            return templates.TemplateResponse(
                request,
                "chart.html",
                {"patient": None, "documents": [], "problem": "Choose one listed patient."},
                status_code=404,
            )
        try:
            documents = await load_chart(server, patient_id)
            problem = None
        except httpx.HTTPError as error:
            documents, problem = [], f"The FHIR server did not answer ({type(error).__name__})."
        return templates.TemplateResponse(
            request, "chart.html", {"patient": patient, "documents": documents, "problem": problem}
        )

    async def attachment(request: Request) -> Response:
        document_id = request.query_params.get("doc", "")
        try:
            index = int(request.query_params.get("n", "0"))
        except ValueError:
            index = -1
        found = await load_attachment(server, document_id, index) if document_id.isascii() else None
        if found is None:
            return Response("No such attachment.", status_code=404, media_type="text/plain")
        data, content_type = found
        if content_type not in _SAFE_TYPES:  # anything else is offered as a download, never rendered
            content_type = "application/octet-stream"
        return Response(data, media_type=content_type, headers={"X-Content-Type-Options": "nosniff"})

    return [
        Route("/ehr/chart", chart, methods=["GET"]),
        Route("/ehr/chart/attachment", attachment, methods=["GET"]),
    ]
