"""Approve a reviewed illustration and write it back to the EHR exactly once."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy.ext.asyncio import AsyncSession

from fhir_adapters import (
    AttachmentPolicy,
    FhirClient,
    FhirError,
    apply_attachment_policy,
    build_document_reference,
    build_model_device,
    build_provenance,
    write_document_set,
)
from service.audit import AuditAction, AuditLog
from service.crypto import Keyring
from service.documents import DocumentView, load_document, save_content, transition
from service.generation.handout import render_handout_pdf
from service.generation.models import ModelRegistry, ModelSpec
from service.generation.text import normalise_free_text
from service.jobs import JobQueue

IDENTIFIER_SYSTEM = "urn:carecanvas:artifact"
DEVICE_IDENTIFIER_SYSTEM = "urn:carecanvas:model"
TEST_MODEL_NOTICE = (
    "Made by the CareCanvas test model (random weights): the picture is noise, not an illustration."
)


class NotReadyError(RuntimeError):
    """The image is not finished (or the job failed), so there is nothing to approve yet."""


class WriteBackFailedError(RuntimeError):
    """The EHR refused or failed the write-back; the message is safe to show, the draft is kept."""


@dataclass(frozen=True)
class WriteBackResult:
    fhir_document_id: str
    already_written: bool


def artifact_identifier(job_id: str) -> str:
    """Deterministic per artifact, so a retried or doubled approval finds the same document."""
    return f"{job_id}-illustration-v1"


def practitioner_id_from(fhir_user: str | None) -> str | None:
    if not fhir_user or "Practitioner/" not in fhir_user:
        return None
    return fhir_user.rsplit("Practitioner/", 1)[1].split("/")[0] or None


async def approve_and_write_back(
    *,
    db: AsyncSession,
    fhir: FhirClient,
    queue: JobQueue,
    audit: AuditLog,
    keyring: Keyring,
    models: ModelRegistry,
    job_id: str,
    caption: str,
    alt_text: str,
    practitioner_id: str,
    organization_id: str | None,
    attachment_policy: AttachmentPolicy,
    ehr_name: str,
    request_id: str | None,
) -> WriteBackResult:
    # Queue reads first, in their own short transactions, before this request's transaction starts.
    job = await queue.get(job_id)
    if job is None or job.status != "succeeded":
        raise NotReadyError("The illustration is not finished yet.")
    png = await queue.read_artifact(job_id, "png")
    document = await load_document(db, keyring=keyring, job_id=job_id)
    if document is None:
        raise NotReadyError("There is no illustration with that id.")
    if document.status == "written" and document.fhir_document_id:
        await db.commit()
        return WriteBackResult(fhir_document_id=document.fhir_document_id, already_written=True)
    content = dict(document.content)
    model = models.get(content["model"])
    content["caption"] = normalise_free_text(caption, max_chars=600) or content["caption"]
    content["alt_text"] = normalise_free_text(alt_text, max_chars=300) or content["alt_text"]
    await save_content(db, keyring=keyring, document=document, content=content)
    if not await transition(
        db, document=document, to_status="approved", from_statuses=("draft", "approved", "failed")
    ):
        # Someone else approved it in the same moment; their write-back is the one that counts.
        fresh = await load_document(db, keyring=keyring, job_id=job_id)
        if fresh and fresh.fhir_document_id:
            return WriteBackResult(fhir_document_id=fresh.fhir_document_id, already_written=True)
        raise NotReadyError("This illustration is being approved by someone else right now.")
    await audit.append(
        db,
        action=AuditAction.APPROVE,
        outcome="success",
        actor=f"Practitioner/{practitioner_id}",
        patient=content["patient_id"],
        ehr=ehr_name,
        resource=f"Condition/{content['condition_id']}",
        request_id=request_id,
        detail={"job_id": job_id},
    )
    await db.commit()
    try:
        fhir_document_id = await _write(
            fhir=fhir,
            document=document,
            model=model,
            png=png,
            practitioner_id=practitioner_id,
            organization_id=organization_id,
            policy=attachment_policy,
        )
    except FhirError as error:
        await transition(
            db, document=document, to_status="failed", from_statuses=("approved",), error=str(error)[:200]
        )
        await audit.append(
            db,
            action=AuditAction.WRITE_BACK,
            outcome="failure",
            actor=f"Practitioner/{practitioner_id}",
            patient=content["patient_id"],
            ehr=ehr_name,
            resource="DocumentReference",
            request_id=request_id,
            detail={"job_id": job_id, "status": error.status},
        )
        await db.commit()
        raise WriteBackFailedError(
            f"The EHR did not accept the document ({error.diagnostics or 'no reason given'}). "
            "Nothing was lost: you can try again."
        ) from error
    await transition(
        db,
        document=document,
        to_status="written",
        from_statuses=("approved",),
        fhir_document_id=fhir_document_id,
        identifier=artifact_identifier(job_id),
    )
    await audit.append(
        db,
        action=AuditAction.WRITE_BACK,
        outcome="success",
        actor=f"Practitioner/{practitioner_id}",
        patient=content["patient_id"],
        ehr=ehr_name,
        resource=f"DocumentReference/{fhir_document_id}",
        request_id=request_id,
        detail={"job_id": job_id},
    )
    await db.commit()
    return WriteBackResult(fhir_document_id=fhir_document_id, already_written=False)


async def _write(
    *,
    fhir: FhirClient,
    document: DocumentView,
    model: ModelSpec,
    png: bytes,
    practitioner_id: str,
    organization_id: str | None,
    policy: AttachmentPolicy,
) -> str:
    content = document.content
    now = datetime.now(UTC)
    pdf = render_handout_pdf(
        png=png,
        title=content["title"],
        caption=content["caption"],
        alt_text=content["alt_text"],
        language=content["language"],
        created=now.date(),
        test_model_notice=TEST_MODEL_NOTICE if model.is_test_model else None,
    )
    identifier_value = artifact_identifier(document.job_id)
    device = build_model_device(
        device_id_value=f"{model.name}:{model.version}", model_name=model.name, model_version=model.version
    )
    document_reference = build_document_reference(
        identifier_value=identifier_value,
        patient_id=content["patient_id"],
        practitioner_id=practitioner_id,
        organization_id=organization_id,
        encounter_id=content.get("encounter_id"),
        condition_id=content["condition_id"],
        description=f"{content['title']} ({content['condition_text']})",
        language=content["language"],
        pdf=pdf,
        png=png,
        alt_text=content["alt_text"],
        created=now,
        date=now,
    )
    provenance = build_provenance(
        # Placeholders: write_document_set points them at the real DocumentReference and Device.
        target_ref=f"urn:uuid:{uuid.uuid4()}",
        device_ref=f"urn:uuid:{uuid.uuid4()}",
        practitioner_id=practitioner_id,
        organization_id=organization_id,
        condition_id=content["condition_id"],
        prompt_markdown=_prompt_markdown(content, model),
        started=now,
        ended=now,
        recorded=now,
    )
    document_reference, binaries = apply_attachment_policy(
        document_reference, policy=policy, patient_id=content["patient_id"]
    )
    written = await write_document_set(
        fhir,
        document=document_reference,
        device=device,
        provenance=provenance,
        identifier_system=IDENTIFIER_SYSTEM,
        identifier_value=identifier_value,
        binaries=binaries,
    )
    return written.document_id


def _prompt_markdown(content: dict[str, str], model: ModelSpec) -> str:
    # The prompt holds the condition concept and style only; no patient identifiers ever enter it.
    return (
        f"---\nmodel: {model.name}\nversion: {model.version}\nseed: {content.get('seed')}\n"
        f"style: {content.get('style')}\ntopic: {content.get('topic_id')}\n---\n\n"
        f"{content['prompt']}\n\nNegative: {content.get('negative_prompt') or ''}\n"
    )
