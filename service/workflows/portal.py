"""The patient portal's reads: the signed-in patient's approved documents and their files, audited."""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from fhir_adapters import FhirClient, FhirError, ForbiddenError, NotFoundError
from fhir_adapters.conditions import summarize_patient
from service.audit import AuditAction, AuditEntity, AuditOutcome
from service.workflows.approve import IDENTIFIER_SYSTEM
from service.workflows.context import WorkflowContext
from service.workflows.errors import NotAllowedError, PortalFileError
from service.workflows.portal_text import PortalWords, language_name, portal_words

FHIR_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")
_MAX_DOCUMENTS = "50"


class FileKind(StrEnum):
    PNG = "png"
    PDF = "pdf"

    @property
    def content_type(self) -> str:
        return "image/png" if self is FileKind.PNG else "application/pdf"


CONTENT_TYPES = {kind.value: kind.content_type for kind in FileKind}


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
    checked_by: str | None = None  # the approving clinician's name, when the EHR's record names them

    @property
    def pdf_filename(self) -> str:
        """A name that says what the file is: "handout-<first words of the caption>-<date>.pdf"."""
        words = re.sub(r"[^a-z0-9]+", "-", self.caption.lower()).strip("-")[:40].strip("-")
        return (
            "-".join(part for part in ("handout", words or "carecanvas", self.created or "") if part) + ".pdf"
        )


@dataclass(frozen=True)
class PortalPage:
    """The portal page: the patient's name (None when the record could not be read), words, documents."""

    patient_name: str | None
    words: PortalWords
    documents: list[PortalDocument]


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
    # The PNG's title is the alt text; the PDF's is the caption the clinician approved (older documents:
    # the alt text again, so the description stands in).
    alt_text = str((png or {}).get("title") or "An illustration from your care team.")
    pdf_title = str((pdf or {}).get("title") or "")
    caption = pdf_title if pdf_title and pdf_title != (png or {}).get("title") else None
    authors = [a for a in resource.get("author") or [] if isinstance(a, dict) and a.get("display")]
    return PortalDocument(
        id=str(resource.get("id")),
        caption=caption or str(resource.get("description") or "A picture from your care team"),
        alt_text=alt_text,
        language=language,
        language_name=language_name(language),
        created=str(first.get("creation") or resource.get("date") or "")[:10] or None,
        has_png=png is not None,
        has_pdf=pdf is not None,
        checked_by=str(authors[0]["display"]) if authors else None,
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


async def _read_patient(fhir: FhirClient, patient_id: str) -> dict[str, Any] | None:
    """The patient's own record, for their name and language; the page still works without it."""
    try:
        return await fhir.read("Patient", patient_id)
    except FhirError:
        return None


async def load_portal_page(ctx: WorkflowContext, fhir: FhirClient) -> PortalPage:
    """The patient's name and language (one Patient read) and their documents, read side by side."""
    patient_id = ctx.patient_id or ""
    patient, documents = await asyncio.gather(
        _read_patient(fhir, patient_id), list_portal_documents(ctx, fhir)
    )
    if patient is not None:
        await ctx.audit(AuditAction.FHIR_READ, resource=f"Patient/{patient_id}")
    name = summarize_patient(patient).display_name if patient is not None else None
    return PortalPage(patient_name=name, words=portal_words(patient), documents=documents)


async def list_portal_documents(ctx: WorkflowContext, fhir: FhirClient) -> list[PortalDocument]:
    """The patient's approved, current documents, newest first; audited before anything is shown."""
    patient_id = ctx.patient_id or ""
    found = await fhir.search(
        "DocumentReference",
        {"patient": patient_id, "identifier": f"{IDENTIFIER_SYSTEM}|", "_count": _MAX_DOCUMENTS},
    )
    documents = [portal_document(resource) for resource in found if shown_on_portal(resource, patient_id)]
    documents.sort(key=lambda document: document.created or "", reverse=True)
    # The documents shown, each by its EHR reference (the search itself names no single resource).
    await ctx.audit(
        AuditAction.PORTAL_VIEW,
        resource="DocumentReference",
        entities=[AuditEntity(f"DocumentReference/{document.id}") for document in documents],
        detail={"count": len(documents)},
        description=f"{ctx.actor_reference} viewed their {len(documents)} picture(s) in the portal",
    )
    return documents


@dataclass(frozen=True)
class PortalFile:
    content: bytes
    kind: FileKind
    filename: str


async def read_portal_file(
    ctx: WorkflowContext, fhir: FhirClient, document_id: str, kind: FileKind
) -> PortalFile:
    """One file of one of the patient's documents; someone else's record is refused and audited."""
    patient_id = ctx.patient_id or ""
    resource_ref = f"DocumentReference/{document_id}"
    try:
        resource = await fhir.read("DocumentReference", document_id)
    except ForbiddenError:
        resource = {}
    except NotFoundError as error:
        raise PortalFileError("It may have been withdrawn by your care team.") from error
    if not patient_id or subject_patient(resource) != patient_id:
        await ctx.audit(
            AuditAction.PORTAL_VIEW, AuditOutcome.DENIED, resource=resource_ref, detail={"kind": kind.value}
        )
        await ctx.db.commit()
        raise NotAllowedError("This picture belongs to someone else's record.")
    if not shown_on_portal(resource, patient_id):
        raise PortalFileError("It may have been withdrawn by your care team.")
    attachment = attachment_of(resource, kind.content_type)
    if attachment is None:
        raise PortalFileError("This picture has no file of that kind.")
    content = await _attachment_bytes(fhir, attachment, fhir_base=ctx.ehr.iss)
    _check_hash(content, attachment)
    await ctx.audit(
        AuditAction.PORTAL_VIEW,
        entities=[AuditEntity(resource_ref)],
        detail={"kind": kind.value},
        description=f"{ctx.actor_reference} opened the {kind.value} of {resource_ref} in the portal",
    )
    document = portal_document(resource)
    filename = document.pdf_filename if kind is FileKind.PDF else document.pdf_filename[:-4] + ".png"
    return PortalFile(content=content, kind=kind, filename=filename)


def _check_hash(content: bytes, attachment: dict[str, Any]) -> None:
    expected_hash = attachment.get("hash")
    if isinstance(expected_hash, str) and expected_hash:
        actual = base64.b64encode(hashlib.sha1(content, usedforsecurity=False).digest()).decode()
        if actual != expected_hash:
            raise PortalFileError("The EHR returned a file that does not match.", damaged=True)


async def _attachment_bytes(fhir: FhirClient, attachment: dict[str, Any], *, fhir_base: str) -> bytes:
    if isinstance(attachment.get("data"), str):
        encoded = attachment["data"]
    else:
        url = str(attachment.get("url") or "")
        binary_id = url.removeprefix(fhir_base.rstrip("/") + "/").removeprefix("Binary/")
        if not url or binary_id == url or not FHIR_ID.fullmatch(binary_id):
            # Only Binary resources on the same FHIR server are fetched (never an arbitrary URL).
            raise PortalFileError("This picture's file is not stored where CareCanvas can read it.")
        binary = await fhir.read("Binary", binary_id)
        encoded = binary.get("data") if isinstance(binary, dict) else None
        if not isinstance(encoded, str):
            raise PortalFileError("This picture's file is empty.")
    try:
        return base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise PortalFileError("The EHR returned a damaged file.", damaged=True) from None
