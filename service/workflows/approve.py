"""Approve a reviewed illustration and write it back to the EHR exactly once, in the shape it accepts."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import structlog
from sqlalchemy.ext.asyncio import AsyncSession

from fhir_adapters import (
    AttachmentPolicy,
    FatalFhirError,
    FhirClient,
    FhirError,
    ResourceValidationError,
    TemporaryFhirError,
    apply_attachment_policy,
    attachment_policy_from_capabilities,
    build_document_reference,
    build_model_device,
    build_provenance,
    write_document_set,
)
from service.audit import AuditAction, AuditLog
from service.crypto import Keyring
from service.documents import DocumentView, load_document, save_content, transition
from service.generation.handout import render_handout_pdf
from service.generation.models import ModelSpec
from service.generation.text import normalise_free_text
from service.settings import EhrSettings
from service.workflows.context import WorkflowContext
from service.workflows.errors import (
    ApprovalInProgressError,
    BinaryScopeMissingError,
    NotAllowedError,
    NotReadyError,
    WriteBackFailedError,
)
from service.workflows.regenerate import SupersedeOutcome, supersede_document

log = structlog.get_logger("carecanvas.approve")

IDENTIFIER_SYSTEM = "urn:carecanvas:artifact"
DEVICE_IDENTIFIER_SYSTEM = "urn:carecanvas:model"
TEST_MODEL_NOTICE = (
    "Made by the CareCanvas test model (random weights): the picture is noise, not an illustration."
)
# An approval that is writing holds the document for this long; after it a crashed writer's claim lapses.
APPROVAL_LEASE = timedelta(seconds=120)
# A second approval of the same picture waits this long for the first one's answer before giving up.
WAIT_FOR_OTHER_APPROVAL_SECONDS = 45.0
_CONTENT_TYPE_WORDS = ("contenttype", "content type", "content-type", "image/", "mime")


@dataclass(frozen=True)
class AttachmentOverrides:
    """What the EHR registration says about attachments; None where it says nothing."""

    accept_images: bool | None = None
    max_inline_bytes: int | None = None

    @classmethod
    def from_registration(cls, ehr: EhrSettings) -> AttachmentOverrides:
        # max_inline_bytes always has a value; only one written into the registration overrides the server.
        explicit = "max_inline_bytes" in ehr.model_fields_set
        return cls(
            accept_images=ehr.accept_images, max_inline_bytes=ehr.max_inline_bytes if explicit else None
        )


def merge_attachment_policy(
    *, capabilities: Mapping[str, Any], overrides: AttachmentOverrides
) -> AttachmentPolicy:
    """The CapabilityStatement's hints, then the registration's overrides on top (the registration wins)."""
    advertised = attachment_policy_from_capabilities(capabilities, default=AttachmentPolicy())
    return AttachmentPolicy(
        accept_images=advertised.accept_images
        if overrides.accept_images is None
        else overrides.accept_images,
        max_inline_bytes=(
            advertised.max_inline_bytes if overrides.max_inline_bytes is None else overrides.max_inline_bytes
        ),
    )


def fallback_policy(error: FhirError, policy: AttachmentPolicy) -> tuple[AttachmentPolicy, str] | None:
    """A narrower policy worth one more try after the EHR refused the attachments, and what to tell the user.

    Both retries are safe: a refused create stored nothing, and the document is created conditionally on
    its identifier anyway.
    """
    reason = (error.diagnostics or "").lower()
    if (
        policy.accept_images
        and error.status in (400, 415, 422)
        and any(w in reason for w in _CONTENT_TYPE_WORDS)
    ):
        return (
            AttachmentPolicy(accept_images=False, max_inline_bytes=policy.max_inline_bytes),
            "This EHR does not take image files, so only the PDF handout (which shows the picture) was saved."
            f" The EHR said: {error.diagnostics}",
        )
    if error.status == 413 and policy.max_inline_bytes > 0:
        return (
            AttachmentPolicy(accept_images=policy.accept_images, max_inline_bytes=0),
            "This EHR limits the size of documents sent in one piece, so the files were uploaded separately.",
        )
    return None


@dataclass(frozen=True)
class WriteBackResult:
    fhir_document_id: str
    already_written: bool
    included_image: bool = True
    notes: tuple[str, ...] = ()
    replaced_document_id: str | None = None
    superseded: SupersedeOutcome | None = None


def artifact_identifier(job_id: str) -> str:
    """Deterministic per artifact, so a retried or doubled approval finds the same document."""
    return f"{job_id}-illustration-v1"


def job_id_from_identifier(identifier_value: str) -> str | None:
    suffix = "-illustration-v1"
    return identifier_value.removesuffix(suffix) if identifier_value.endswith(suffix) else None


def practitioner_id_from(fhir_user: str | None) -> str | None:
    if not fhir_user or "Practitioner/" not in fhir_user:
        return None
    return fhir_user.rsplit("Practitioner/", 1)[1].split("/")[0] or None


def _written_result(document: DocumentView) -> WriteBackResult:
    content = document.content
    return WriteBackResult(
        fhir_document_id=document.fhir_document_id or "",
        already_written=True,
        included_image=bool(content.get("included_image", True)),
        notes=tuple(content.get("write_notes") or ()),
        replaced_document_id=(content.get("replaces") or {}).get("fhir_document_id"),
    )


def _claim_is_fresh(document: DocumentView) -> bool:
    if document.approved_at is None:
        return False
    approved_at = document.approved_at
    if approved_at.tzinfo is None:
        approved_at = approved_at.replace(tzinfo=UTC)
    return datetime.now(UTC) - approved_at < APPROVAL_LEASE


async def _claim(
    *,
    db: AsyncSession,
    audit: AuditLog,
    keyring: Keyring,
    job_id: str,
    caption: str,
    alt_text: str,
    practitioner_id: str,
    ehr_name: str,
    request_id: str | None,
) -> DocumentView | WriteBackResult:
    """Take the document for writing (status approved), or return what an earlier approval wrote.

    The status is a compare-and-set on the row's version, so of two approvals at once exactly one writes;
    the other waits for its answer (each look in its own short transaction, never holding the writer lock).
    """
    deadline = time.monotonic() + WAIT_FOR_OTHER_APPROVAL_SECONDS
    while True:
        document = await load_document(db, keyring=keyring, job_id=job_id)
        if document is None:
            await db.commit()
            raise NotReadyError("There is no illustration with that id.")
        if document.status == "written" and document.fhir_document_id:
            await db.commit()
            return _written_result(document)
        if document.status == "retracted":
            await db.commit()
            raise NotReadyError(
                "This picture was withdrawn from the chart. Make a new version from the workspace instead."
            )
        if document.status == "approved" and _claim_is_fresh(document):
            await db.commit()
            if time.monotonic() > deadline:
                raise ApprovalInProgressError(
                    "Someone else is saving this picture right now. Reload the page in a minute to see it."
                )
            await asyncio.sleep(0.25)
            continue
        content = dict(document.content)
        content["caption"] = normalise_free_text(caption, max_chars=600) or content["caption"]
        content["alt_text"] = normalise_free_text(alt_text, max_chars=300) or content["alt_text"]
        await save_content(db, keyring=keyring, document=document, content=content)
        if not await transition(
            db, document=document, to_status="approved", from_statuses=(document.status,), error=None
        ):
            await db.rollback()  # another approval changed the row since we read it: look again
            continue
        await audit.append(
            db,
            action=AuditAction.APPROVE,
            outcome="success",
            actor=f"Practitioner/{practitioner_id}",
            patient=content["patient_id"],
            ehr=ehr_name,
            resource=source_reference(content),
            request_id=request_id,
            detail={"job_id": job_id},
        )
        await db.commit()
        return document


@dataclass(frozen=True)
class Approval:
    """What the clinician approved: the job and the caption and alt text as they stood on the form."""

    job_id: str
    caption: str
    alt_text: str


async def approve_and_write_back(
    ctx: WorkflowContext, fhir: FhirClient, approval: Approval
) -> WriteBackResult:
    """Approve, then write Device, (Binaries,) DocumentReference and Provenance exactly once.

    Order matters on SQLite: queue reads and the CapabilityStatement first, then the claim in one short
    transaction, then the EHR writes with no transaction open, then the outcome and its audit record.
    """
    practitioner_id = practitioner_id_from(ctx.actor)
    if practitioner_id is None:
        raise NotAllowedError("Approval needs a practitioner's launch.")
    db, queue, audit, keyring = ctx.db, ctx.services.queue, ctx.services.audit, ctx.services.keyring
    job_id, caption, alt_text = approval.job_id, approval.caption, approval.alt_text
    ehr_name, request_id, organization_id = ctx.ehr.name, ctx.request_id, ctx.ehr.organization_id
    may_create_binaries = ctx.scopes.allows("Binary", "create")
    may_update_documents = ctx.scopes.allows("DocumentReference", "update")
    attachment_overrides = AttachmentOverrides.from_registration(ctx.ehr)
    page_size = ctx.ehr.handout_page_size
    job = await queue.get(job_id)
    if job is None or job.status != "succeeded":
        raise NotReadyError("The illustration is not finished yet.")
    png = await queue.read_artifact(job_id, "png")
    policy = merge_attachment_policy(capabilities=await fhir.capabilities(), overrides=attachment_overrides)
    claimed = await _claim(
        db=db,
        audit=audit,
        keyring=keyring,
        job_id=job_id,
        caption=caption,
        alt_text=alt_text,
        practitioner_id=practitioner_id,
        ehr_name=ehr_name,
        request_id=request_id,
    )
    if isinstance(claimed, WriteBackResult):
        return claimed
    document = claimed
    content = document.content
    model = ctx.services.models.get(content["model"])
    replaces = (content.get("replaces") or {}).get("fhir_document_id")
    notes: list[str] = []
    try:
        while True:
            try:
                fhir_document_id = await _write(
                    fhir=fhir,
                    document=document,
                    model=model,
                    png=png,
                    practitioner_id=practitioner_id,
                    organization_id=organization_id,
                    policy=policy,
                    replaces=replaces,
                    may_create_binaries=may_create_binaries,
                    page_size=page_size,
                )
                break
            except FatalFhirError as error:
                fallback = fallback_policy(error, policy)
                if fallback is None:
                    raise
                policy, note = fallback
                notes.append(note)
                log.info("write-back retried with narrower attachments", job_id=job_id, status=error.status)
    except FhirError as error:
        await _record_failure(
            db,
            audit=audit,
            document=document,
            practitioner_id=practitioner_id,
            ehr_name=ehr_name,
            request_id=request_id,
            reason=f"EHR answered {error.status}",
            status=error.status,
        )
        if isinstance(error, TemporaryFhirError):
            raise WriteBackFailedError(
                "The EHR did not answer in time. Nothing was saved twice: try again in a minute.",
                retryable=True,
            ) from error
        raise WriteBackFailedError(
            f"The EHR did not accept the document ({error.diagnostics or 'no reason given'}). "
            "Nothing was lost: you can try again.",
            retryable=False,
        ) from error
    except BinaryScopeMissingError as error:
        await _record_failure(
            db,
            audit=audit,
            document=document,
            practitioner_id=practitioner_id,
            ehr_name=ehr_name,
            request_id=request_id,
            reason="Binary create not granted",
            status=None,
        )
        raise WriteBackFailedError(str(error), retryable=False) from error
    except (ResourceValidationError, ValueError) as error:
        # A resource we built is invalid: our bug. Nothing was sent (everything is validated first).
        log.error("write-back built an invalid resource", job_id=job_id, error_type=type(error).__name__)
        await _record_failure(
            db,
            audit=audit,
            document=document,
            practitioner_id=practitioner_id,
            ehr_name=ehr_name,
            request_id=request_id,
            reason="invalid resource (bug)",
            status=None,
        )
        raise WriteBackFailedError(
            "CareCanvas could not build a valid document for the EHR. This is a bug and has been logged; "
            "nothing was sent.",
            retryable=False,
        ) from error
    except BaseException:
        # Anything else (cancellation included): release the claim so a retry need not wait for the lease.
        await db.rollback()
        await transition(db, document=document, to_status="failed", from_statuses=("approved",))
        await db.commit()
        raise

    superseded: SupersedeOutcome | None = None
    if replaces is not None:
        superseded = await supersede_document(fhir, replaces, may_update=may_update_documents)
    content = dict(content)
    content["included_image"] = policy.accept_images
    content["write_notes"] = notes
    await save_content(db, keyring=keyring, document=document, content=content)
    await transition(
        db,
        document=document,
        to_status="written",
        from_statuses=("approved",),
        fhir_document_id=fhir_document_id,
        identifier=artifact_identifier(job_id),
        error=None,
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
        detail={"job_id": job_id, "image": policy.accept_images, "replaces": replaces},
    )
    if superseded == "superseded":
        await audit.append(
            db,
            action=AuditAction.WRITE_BACK,
            outcome="success",
            actor=f"Practitioner/{practitioner_id}",
            patient=content["patient_id"],
            ehr=ehr_name,
            resource=f"DocumentReference/{replaces}",
            request_id=request_id,
            detail={"status": "superseded", "replaced_by": fhir_document_id},
        )
    await db.commit()
    return WriteBackResult(
        fhir_document_id=fhir_document_id,
        already_written=False,
        included_image=policy.accept_images,
        notes=tuple(notes),
        replaced_document_id=replaces,
        superseded=superseded,
    )


async def _record_failure(
    db: AsyncSession,
    *,
    audit: AuditLog,
    document: DocumentView,
    practitioner_id: str,
    ehr_name: str,
    request_id: str | None,
    reason: str,
    status: int | None,
) -> None:
    await transition(db, document=document, to_status="failed", from_statuses=("approved",), error=reason)
    await audit.append(
        db,
        action=AuditAction.WRITE_BACK,
        outcome="failure",
        actor=f"Practitioner/{practitioner_id}",
        patient=document.content["patient_id"],
        ehr=ehr_name,
        resource="DocumentReference",
        request_id=request_id,
        detail={"job_id": document.job_id, "status": status},
    )
    await db.commit()


async def _write(
    *,
    fhir: FhirClient,
    document: DocumentView,
    model: ModelSpec,
    png: bytes,
    practitioner_id: str,
    organization_id: str | None,
    policy: AttachmentPolicy,
    replaces: str | None,
    may_create_binaries: bool,
    page_size: Literal["letter", "a4"],
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
        page_size=page_size,
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
        condition_id=content.get("condition_id"),
        source_ref=None if content.get("condition_id") else source_reference(content),
        description=_description(content),
        language=content["language"],
        pdf=pdf,
        png=png,
        alt_text=content["alt_text"],
        created=now,
        date=now,
        replaces=replaces,
    )
    provenance = build_provenance(
        # Placeholders: write_document_set points them at the real DocumentReference and Device.
        target_ref=f"urn:uuid:{uuid.uuid4()}",
        device_ref=f"urn:uuid:{uuid.uuid4()}",
        practitioner_id=practitioner_id,
        organization_id=organization_id,
        condition_id=content.get("condition_id"),
        source_ref=None if content.get("condition_id") else source_reference(content),
        prompt_markdown=_prompt_markdown(content, model),
        started=now,
        ended=now,
        recorded=now,
    )
    document_reference, binaries = apply_attachment_policy(
        document_reference, policy=policy, patient_id=content["patient_id"]
    )
    if binaries and not may_create_binaries:
        raise BinaryScopeMissingError(
            "The files are too large for this EHR to take in one piece, and this launch may not upload them "
            "separately (it needs the patient/Binary.c scope). Nothing was sent; ask your EHR team."
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


def source_reference(content: dict[str, Any]) -> str:
    """Education pictures come from a Condition; portraits from the patient's story."""
    if content.get("condition_id"):
        return f"Condition/{content['condition_id']}"
    return f"QuestionnaireResponse/{content['story_id']}"


def _description(content: dict[str, Any]) -> str:
    about = content.get("condition_text")
    return f"{content['title']} ({about})" if about else str(content["title"])


def _prompt_markdown(content: dict[str, str], model: ModelSpec) -> str:
    # The prompt holds the condition concept and style only; no patient identifiers ever enter it.
    return (
        f"---\nmodel: {model.name}\nversion: {model.version}\nseed: {content.get('seed')}\n"
        f"style: {content.get('style')}\ntopic: {content.get('topic_id')}\n---\n\n"
        f"{content['prompt']}\n\nNegative: {content.get('negative_prompt') or ''}\n"
    )
