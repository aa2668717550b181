"""A saved handout after approval: read back from the chart to open or print, and given to the patient."""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from fhir_adapters import FhirClient, FhirError, NotFoundError, validate_resource
from service.audit import AuditAction, AuditEntity, AuditOutcome, CareCanvasObject, carecanvas_ref
from service.documents import DocumentView
from service.jobs import JobNotFoundError
from service.workflows.context import WorkflowContext
from service.workflows.errors import NotAllowedError, PortalFileError
from service.workflows.portal import attachment_of
from service.workflows.regenerate import load_replaceable

HANDOVER_IDENTIFIER_SYSTEM = "urn:carecanvas:handover"
_FHIR_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")
# SNOMED CT 311401005 |Patient education (procedure)|: what the Communication records.
_EDUCATION = {"system": "http://snomed.info/sct", "code": "311401005", "display": "Patient education"}
_CATEGORY = {
    "system": "http://terminology.hl7.org/CodeSystem/communication-category",
    "code": "instruction",
    "display": "Instruction",
}


@dataclass(frozen=True)
class SavedHandout:
    """The handout PDF exactly as the chart holds it, and which document it belongs to."""

    pdf: bytes
    fhir_document_id: str
    document: DocumentView


async def read_saved_handout(ctx: WorkflowContext, fhir: FhirClient, job_id: str) -> SavedHandout:
    """The PDF of a document this patient has in the chart, read back from the EHR (audited)."""
    document = await load_replaceable(
        ctx.db, keyring=ctx.services.keyring, job_id=job_id, patient_id=ctx.patient_id, ehr_name=ctx.ehr.name
    )
    await ctx.db.commit()  # no transaction held across the EHR reads
    fhir_document_id = document.fhir_document_id or ""
    try:
        resource = await fhir.read("DocumentReference", fhir_document_id)
    except NotFoundError as error:
        raise PortalFileError("The chart no longer has this handout.") from error
    attachment = attachment_of(resource, "application/pdf")
    if attachment is None:
        raise PortalFileError("The chart holds no PDF handout for this picture.")
    pdf = await _attachment_bytes(fhir, attachment, fhir_base=ctx.ehr.iss)
    reference = f"DocumentReference/{fhir_document_id}"
    await ctx.audit(
        AuditAction.VIEW,
        entities=[AuditEntity(reference)],
        detail={"job_id": job_id, "kind": "handout"},
        patient=document.content.patient_id,
        description=f"{ctx.actor_reference} opened the handout of {reference}",
    )
    await ctx.db.commit()
    return SavedHandout(pdf=pdf, fhir_document_id=fhir_document_id, document=document)


async def saved_picture(ctx: WorkflowContext, job_id: str) -> bytes:
    """The picture of a document this patient has in the chart (history thumbnails), audited as viewed."""
    document = await load_replaceable(
        ctx.db, keyring=ctx.services.keyring, job_id=job_id, patient_id=ctx.patient_id, ehr_name=ctx.ehr.name
    )
    await ctx.db.commit()  # the queue read has a transaction of its own
    try:
        png = await ctx.services.queue.read_artifact(job_id, "png")
    except JobNotFoundError:
        raise PortalFileError("This picture is no longer kept by CareCanvas.") from None
    await ctx.audit(
        AuditAction.VIEW,
        entities=[AuditEntity(carecanvas_ref(CareCanvasObject.IMAGE, job_id))],
        detail={"job_id": job_id, "kind": "thumbnail"},
        patient=document.content.patient_id,
        description=f"{ctx.actor_reference} viewed the picture of "
        f"DocumentReference/{document.fhir_document_id}",
    )
    return png


async def _attachment_bytes(fhir: FhirClient, attachment: dict[str, Any], *, fhir_base: str) -> bytes:
    encoded = attachment.get("data")
    if not isinstance(encoded, str):
        url = str(attachment.get("url") or "")
        binary_id = url.removeprefix(fhir_base.rstrip("/") + "/").removeprefix("Binary/")
        if not url or binary_id == url or not _FHIR_ID.fullmatch(binary_id):
            # Only Binary resources on the same FHIR server are fetched (never an arbitrary URL).
            raise PortalFileError("The handout's file is not stored where CareCanvas can read it.")
        encoded = (await fhir.read("Binary", binary_id)).get("data")
        if not isinstance(encoded, str):
            raise PortalFileError("The handout's file is empty.")
    try:
        return base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise PortalFileError("The EHR returned a damaged file.", damaged=True) from None


class HandoverSkip(StrEnum):
    """Why giving the handout was not recorded in the chart (the clinician is told; the audit says so)."""

    NOT_OFFERED = "not-offered"  # the CapabilityStatement offers no Communication create
    NOT_GRANTED = "not-granted"  # this launch may not create Communications
    REFUSED = "refused"  # the EHR refused the Communication


SKIP_NOTES: dict[HandoverSkip, str] = {
    HandoverSkip.NOT_OFFERED: "This EHR does not record handouts given to patients, so nothing was added to "
    "the chart. Give the printed handout to the patient; the visit note is the place to mention it.",
    HandoverSkip.NOT_GRANTED: "This launch may not record handouts given to patients, so nothing was added "
    "to the chart. Give the printed handout to the patient; ask your EHR team for the permission.",
    HandoverSkip.REFUSED: "The EHR refused to record the handout as given, so nothing was added to the "
    "chart. The handout itself is still saved. Give the printed copy to the patient.",
}


@dataclass(frozen=True)
class HandoverResult:
    fhir_document_id: str
    communication_id: str | None
    already_recorded: bool = False
    skipped: HandoverSkip | None = None

    @property
    def note(self) -> str | None:
        return SKIP_NOTES[self.skipped] if self.skipped else None


def handover_identifier(job_id: str) -> str:
    """One Communication per saved handout: giving it twice records it once."""
    return f"{job_id}-given-v1"


def build_communication(
    *,
    job_id: str,
    patient_id: str,
    practitioner_id: str | None,
    document_id: str,
    encounter_id: str | None,
    language: str,
    sent: datetime,
) -> dict[str, Any]:
    """An R4 Communication saying the patient was given the education handout (DocumentReference)."""
    resource: dict[str, Any] = {
        "resourceType": "Communication",
        "identifier": [{"system": HANDOVER_IDENTIFIER_SYSTEM, "value": handover_identifier(job_id)}],
        "status": "completed",
        "category": [{"coding": [_CATEGORY]}],
        "topic": {"coding": [_EDUCATION], "text": "Patient education handout"},
        "subject": {"reference": f"Patient/{patient_id}"},
        "recipient": [{"reference": f"Patient/{patient_id}"}],
        "sent": sent.isoformat(timespec="seconds"),
        "language": language,
        "about": [{"reference": f"DocumentReference/{document_id}"}],
        "payload": [{"contentReference": {"reference": f"DocumentReference/{document_id}"}}],
    }
    if practitioner_id:
        resource["sender"] = {"reference": f"Practitioner/{practitioner_id}"}
    if encounter_id:
        resource["encounter"] = {"reference": f"Encounter/{encounter_id}"}
    validate_resource(resource)
    return resource


async def give_to_patient(
    ctx: WorkflowContext, fhir: FhirClient, job_id: str, *, practitioner_id: str | None
) -> HandoverResult:
    """Record that the patient was given the saved handout, where the EHR and the launch allow it; audited."""
    if practitioner_id is None:
        raise NotAllowedError("Recording a handout as given needs a practitioner's launch.")
    document = await load_replaceable(
        ctx.db, keyring=ctx.services.keyring, job_id=job_id, patient_id=ctx.patient_id, ehr_name=ctx.ehr.name
    )
    await ctx.db.commit()
    if document.status != "written":
        raise NotAllowedError("This handout was withdrawn from the chart, so it cannot be given.")
    fhir_document_id = document.fhir_document_id or ""
    profile = await ctx.profile(fhir)
    skipped: HandoverSkip | None = None
    communication_id: str | None = None
    already = False
    if not profile.records_handouts:
        skipped = HandoverSkip.NOT_OFFERED
    elif not ctx.scopes.allows("Communication", "create"):
        skipped = HandoverSkip.NOT_GRANTED
    else:
        content = document.content
        resource = build_communication(
            job_id=job_id,
            patient_id=content.patient_id or "",
            practitioner_id=practitioner_id,
            document_id=fhir_document_id,
            encounter_id=ctx.encounter_id or content.encounter_id,
            language=content.language,
            sent=datetime.now(UTC),
        )
        try:
            written = await fhir.create(
                resource,
                if_none_exist=f"identifier={HANDOVER_IDENTIFIER_SYSTEM}|{handover_identifier(job_id)}",
            )
        except FhirError as error:
            await _audit_handover(ctx, document, None, skipped=HandoverSkip.REFUSED, status=error.status)
            return HandoverResult(fhir_document_id, None, skipped=HandoverSkip.REFUSED)
        communication_id = written.id
        already = not written.created
    await _audit_handover(ctx, document, communication_id, skipped=skipped, already=already)
    return HandoverResult(fhir_document_id, communication_id, already_recorded=already, skipped=skipped)


async def _audit_handover(
    ctx: WorkflowContext,
    document: DocumentView,
    communication_id: str | None,
    *,
    skipped: HandoverSkip | None,
    already: bool = False,
    status: int | None = None,
) -> None:
    reference = f"DocumentReference/{document.fhir_document_id}"
    entities = [
        AuditEntity(reference),
        AuditEntity(carecanvas_ref(CareCanvasObject.HANDOUT, document.job_id)),
    ]
    if communication_id:
        entities.append(AuditEntity(f"Communication/{communication_id}"))
    if skipped is None:
        description = f"{ctx.actor_reference} gave the handout {reference} to the patient" + (
            " (already recorded)" if already else f", recorded as Communication/{communication_id}"
        )
    else:
        description = (
            f"{ctx.actor_reference} gave the handout {reference} to the patient; not recorded in the chart "
            f"({skipped.value})"
        )
    await ctx.audit(
        AuditAction.GIVE_HANDOUT,
        AuditOutcome.FAILURE if skipped is HandoverSkip.REFUSED else AuditOutcome.SUCCESS,
        entities=entities,
        patient=document.content.patient_id,
        detail={
            "job_id": document.job_id,
            "recorded": skipped is None,
            "skipped": skipped.value if skipped else None,
            "already": already,
            "status": status,
        },
        description=description,
    )
    await ctx.db.commit()
