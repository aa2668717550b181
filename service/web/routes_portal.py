"""The patient portal: standalone SMART launch (`launch/patient`) and the patient's approved pictures."""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse, Response

from fhir_adapters import FhirError, ForbiddenError, NotFoundError
from service.audit import AuditAction
from service.ehrs import UnregisteredIssuerError
from service.fhir_access import SessionExpiredError
from service.web.deps import (
    DbDep,
    PortalSessionDep,
    RequestIdDep,
    ServicesDep,
    SessionStoreDep,
    audit_touch,
    session_fhir,
)
from service.web.errors import PageError, fhir_failure_page
from service.web.routes_launch import not_registered, start_launch
from service.workflows.approve import IDENTIFIER_SYSTEM

router = APIRouter()

FHIR_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")
CONTENT_TYPES = {"png": "image/png", "pdf": "application/pdf"}
LANGUAGE_NAMES = {"en": "English", "es": "Español"}
_MAX_DOCUMENTS = "50"


@dataclass(frozen=True)
class PortalDocument:
    """What the portal shows of one of our DocumentReferences (never the raw resource)."""

    id: str
    caption: str
    alt_text: str
    language: str
    language_name: str
    created: str | None
    has_png: bool
    has_pdf: bool


def is_carecanvas_document(resource: dict[str, Any]) -> bool:
    identifiers = resource.get("identifier") or []
    return any(isinstance(i, dict) and i.get("system") == IDENTIFIER_SYSTEM for i in identifiers)


def subject_patient(resource: dict[str, Any]) -> str | None:
    reference = str((resource.get("subject") or {}).get("reference") or "")
    return reference.removeprefix("Patient/") if reference.startswith("Patient/") else None


def attachment_of(resource: dict[str, Any], content_type: str) -> dict[str, Any] | None:
    for content in resource.get("content") or []:
        attachment = content.get("attachment") if isinstance(content, dict) else None
        if isinstance(attachment, dict) and attachment.get("contentType") == content_type:
            return attachment
    return None


def portal_document(resource: dict[str, Any]) -> PortalDocument:
    png = attachment_of(resource, CONTENT_TYPES["png"])
    pdf = attachment_of(resource, CONTENT_TYPES["pdf"])
    first = png or pdf or {}
    language = str(first.get("language") or resource.get("language") or "en")
    # The PNG's title is the alt text; the PDF's title is the alt text plus the AI disclosure.
    alt_text = str((png or {}).get("title") or first.get("title") or "An illustration from your care team.")
    return PortalDocument(
        id=str(resource.get("id")),
        caption=str(resource.get("description") or "A picture from your care team"),
        alt_text=alt_text,
        language=language,
        language_name=LANGUAGE_NAMES.get(language.split("-")[0], language),
        created=str(first.get("creation") or resource.get("date") or "")[:10] or None,
        has_png=png is not None,
        has_pdf=pdf is not None,
    )


def shown_on_portal(resource: dict[str, Any], patient_id: str) -> bool:
    """Ours, about this patient, approved (final) and not retracted."""
    return (
        resource.get("resourceType") == "DocumentReference"
        and is_carecanvas_document(resource)
        and subject_patient(resource) == patient_id
        and resource.get("status") == "current"
        and resource.get("docStatus", "final") == "final"
    )


@router.get("/portal/launch")
async def portal_launch(
    services: ServicesDep,
    db: DbDep,
    store: SessionStoreDep,
    ehr: Annotated[str | None, Query(max_length=100)] = None,
) -> Response:
    """Standalone patient launch: the EHR's sign-in page asks the patient who they are."""
    try:
        registered = services.ehrs.by_name(ehr or "")
    except UnregisteredIssuerError:
        raise not_registered() from None
    if not registered.portal_scopes:
        raise PageError(404, "No patient portal for this EHR", "Your care team has not turned the portal on.")
    return await start_launch(
        services=services,
        store=store,
        db=db,
        ehr=registered,
        registration=services.ehrs.registration(registered),
        launch=None,
        scopes=tuple(registered.portal_scopes),
        kind="portal",
    )


@router.get("/portal", response_class=HTMLResponse)
async def portal_home(
    request: Request,
    services: ServicesDep,
    db: DbDep,
    store: SessionStoreDep,
    session: PortalSessionDep,
    request_id: RequestIdDep,
) -> Response:
    patient_id = session.patient_id
    if not patient_id:
        raise PageError(400, "No patient chosen", "Please sign in to the portal again.")
    try:
        async with session_fhir(services, session, store, db) as fhir:
            found = await fhir.search(
                "DocumentReference",
                {"patient": patient_id, "identifier": f"{IDENTIFIER_SYSTEM}|", "_count": _MAX_DOCUMENTS},
            )
    except SessionExpiredError as error:
        raise PageError(
            401, "Your portal session has ended", "Please sign in to the portal again."
        ) from error
    except FhirError as error:
        raise fhir_failure_page(error) from error
    documents = [portal_document(resource) for resource in found if shown_on_portal(resource, patient_id)]
    documents.sort(key=lambda document: document.created or "", reverse=True)
    # Audited before anything is shown; if the record cannot be written, nothing is shown.
    await audit_touch(
        services,
        db,
        session,
        action=AuditAction.PORTAL_VIEW,
        outcome="success",
        patient=patient_id,
        resource="DocumentReference",
        request_id=request_id,
        detail={"count": len(documents)},
    )
    await db.commit()
    return services.templates.TemplateResponse(
        request, "portal.html", {"documents": documents, "page_lang": "en"}
    )


async def _attachment_bytes(fhir: Any, attachment: dict[str, Any], *, fhir_base: str) -> bytes:
    if isinstance(attachment.get("data"), str):
        encoded = attachment["data"]
    else:
        url = str(attachment.get("url") or "")
        binary_id = url.removeprefix(fhir_base.rstrip("/") + "/").removeprefix("Binary/")
        if not url or binary_id == url or not FHIR_ID.fullmatch(binary_id):
            # Only Binary resources on the same FHIR server are fetched (never an arbitrary URL).
            raise PageError(
                404, "File not available", "This picture's file is not stored where CareCanvas can read it."
            )
        binary = await fhir.read("Binary", binary_id)
        encoded = binary.get("data") if isinstance(binary, dict) else None
        if not isinstance(encoded, str):
            raise PageError(404, "File not available", "This picture's file is empty.")
    try:
        return base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise PageError(502, "The file could not be read", "The EHR returned a damaged file.") from None


@router.get("/portal/documents/{document_id}/{kind}")
async def portal_file(
    document_id: str,
    kind: str,
    services: ServicesDep,
    db: DbDep,
    store: SessionStoreDep,
    session: PortalSessionDep,
    request_id: RequestIdDep,
) -> Response:
    """The picture (PNG) or printable handout (PDF) of one of the signed-in patient's documents."""
    if kind not in CONTENT_TYPES:
        raise PageError(404, "No such file", "Files are the picture (png) or the handout (pdf).")
    if not FHIR_ID.fullmatch(document_id):
        raise PageError(404, "No such picture", "Go back to the portal page and choose a picture there.")
    patient_id = session.patient_id
    ehr = services.ehrs.by_name(session.ehr_name)
    denied = False
    try:
        async with session_fhir(services, session, store, db) as fhir:
            try:
                resource = await fhir.read("DocumentReference", document_id)
            except ForbiddenError:
                resource = {}
            if not patient_id or subject_patient(resource) != patient_id:
                denied = True
                raise PageError(403, "Not your record", "This picture belongs to someone else's record.")
            if not shown_on_portal(resource, patient_id):
                raise PageError(404, "No such picture", "It may have been withdrawn by your care team.")
            attachment = attachment_of(resource, CONTENT_TYPES[kind])
            if attachment is None:
                raise PageError(404, "No such file", "This picture has no file of that kind.")
            content = await _attachment_bytes(fhir, attachment, fhir_base=ehr.iss)
    except NotFoundError as error:
        raise PageError(404, "No such picture", "It may have been withdrawn by your care team.") from error
    except PageError:
        if denied:  # someone else's record (or one the EHR refused): the attempt itself is audited
            await audit_touch(
                services,
                db,
                session,
                action=AuditAction.PORTAL_VIEW,
                outcome="denied",
                patient=patient_id,
                resource=f"DocumentReference/{document_id}",
                request_id=request_id,
                detail={"kind": kind},
            )
            await db.commit()
        raise
    except SessionExpiredError as error:
        raise PageError(
            401, "Your portal session has ended", "Please sign in to the portal again."
        ) from error
    except FhirError as error:
        raise fhir_failure_page(error) from error
    expected_hash = attachment.get("hash")
    if isinstance(expected_hash, str) and expected_hash:
        actual = base64.b64encode(hashlib.sha1(content, usedforsecurity=False).digest()).decode()
        if actual != expected_hash:
            raise PageError(
                502, "The file could not be checked", "The EHR returned a file that does not match."
            )
    await audit_touch(
        services,
        db,
        session,
        action=AuditAction.PORTAL_VIEW,
        outcome="success",
        patient=patient_id,
        resource=f"DocumentReference/{document_id}",
        request_id=request_id,
        detail={"kind": kind},
    )
    await db.commit()
    headers = {"Cache-Control": "private, no-store"}
    if kind == "pdf":
        headers["Content-Disposition"] = 'inline; filename="carecanvas-handout.pdf"'
    return Response(content, media_type=CONTENT_TYPES[kind], headers=headers)
