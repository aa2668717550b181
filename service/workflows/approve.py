"""Approve a reviewed illustration and write it back to the EHR exactly once, in the shape it accepts."""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog

from fhir_adapters import (
    AttachmentPolicy,
    DocumentReferenceInput,
    FatalFhirError,
    FhirClient,
    FhirError,
    ResourceValidationError,
    TemporaryFhirError,
    WriteRefusal,
    apply_attachment_policy,
    build_document_reference,
    build_model_device,
    build_provenance,
    write_document_set,
    write_refusal,
)
from service.audit import (
    AuditAction,
    AuditEntity,
    AuditOutcome,
    CareCanvasObject,
    EntityRole,
    carecanvas_ref,
)
from service.documents import DocumentView, DraftContent, load_document, save_content, transition
from service.ehr_profile import EhrProfile
from service.generation.handout import render_handout_pdf
from service.generation.models import ModelSpec
from service.generation.text import normalise_free_text
from service.metrics import record_writeback
from service.workflows.context import WorkflowContext
from service.workflows.errors import (
    ApprovalInProgressError,
    BinaryScopeMissingError,
    NotAllowedError,
    NotReadyError,
    WriteBackFailedError,
)
from service.workflows.regenerate import SupersedeOutcome, supersede_document
from service.workflows.reviewer import Reviewer, approving_reviewer, provenance_agent

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


def fallback_policy(error: FhirError, policy: AttachmentPolicy) -> tuple[AttachmentPolicy, str] | None:
    """A narrower policy worth one more try after the EHR refused the attachments, and what to tell the user.

    Both retries are safe: a refused create stored nothing, and the document is created conditionally on
    its identifier anyway.
    """
    refusal = write_refusal(error)
    if policy.accept_images and refusal is WriteRefusal.ATTACHMENT_TYPE:
        return (
            AttachmentPolicy(accept_images=False, max_inline_bytes=policy.max_inline_bytes),
            "This EHR does not take image files, so only the PDF handout (which shows the picture) was saved."
            f" The EHR said: {error.diagnostics}",
        )
    if refusal is WriteRefusal.TOO_LARGE and policy.max_inline_bytes > 0:
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


@dataclass(frozen=True)
class Approval:
    """What the clinician approved: the job and the caption and alt text as they stood on the form."""

    job_id: str
    caption: str
    alt_text: str


@dataclass(frozen=True)
class ApprovedText:
    """What the audit record says about the approved text: its SHA-256 and whether it was edited."""

    caption_sha256: str
    alt_text_sha256: str
    caption_edited: bool
    alt_text_edited: bool

    @classmethod
    def of(cls, content: DraftContent) -> ApprovedText:
        return cls(
            caption_sha256=_sha256(content.caption),
            alt_text_sha256=_sha256(content.alt_text),
            caption_edited=content.caption != content.original_caption,
            alt_text_edited=content.alt_text != content.original_alt_text,
        )

    @property
    def edited(self) -> bool:
        return self.caption_edited or self.alt_text_edited

    def detail(self) -> dict[str, str | bool]:
        return {
            "caption_sha256": self.caption_sha256,
            "alt_text_sha256": self.alt_text_sha256,
            "caption_edited": self.caption_edited,
            "alt_text_edited": self.alt_text_edited,
            "edited": self.edited,
        }


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def artifact_identifier(job_id: str) -> str:
    """Deterministic per artifact, so a retried or doubled approval finds the same document."""
    return f"{job_id}-illustration-v1"


def practitioner_id_from(fhir_user: str | None) -> str | None:
    if not fhir_user or "Practitioner/" not in fhir_user:
        return None
    return fhir_user.rsplit("Practitioner/", 1)[1].split("/")[0] or None


def draft_entity(document: DocumentView) -> AuditEntity:
    return AuditEntity(carecanvas_ref(CareCanvasObject.DRAFT, document.id))


def _source_entity(content: DraftContent) -> AuditEntity:
    return AuditEntity(content.source_reference, EntityRole.SOURCE)


def _written_result(document: DocumentView) -> WriteBackResult:
    content = document.content
    return WriteBackResult(
        fhir_document_id=document.fhir_document_id or "",
        already_written=True,
        included_image=content.included_image,
        notes=content.write_notes,
        replaced_document_id=content.replaces.fhir_document_id if content.replaces else None,
    )


def _claim_is_fresh(document: DocumentView) -> bool:
    if document.approved_at is None:
        return False
    approved_at = document.approved_at
    if approved_at.tzinfo is None:
        approved_at = approved_at.replace(tzinfo=UTC)
    return datetime.now(UTC) - approved_at < APPROVAL_LEASE


def _approved_content(content: DraftContent, approval: Approval) -> DraftContent:
    """The draft with the form's text (cleaned; an emptied field keeps the draft's)."""
    caption = normalise_free_text(approval.caption, max_chars=600) or content.caption
    alt_text = normalise_free_text(approval.alt_text, max_chars=300) or content.alt_text
    return content.model_copy(update={"caption": caption, "alt_text": alt_text})


async def _settled(ctx: WorkflowContext, document: DocumentView | None) -> WriteBackResult | None:
    """What an earlier approval settled (raises where nothing may be approved); None: free to claim."""
    if document is None:
        await ctx.db.commit()
        raise NotReadyError("There is no illustration with that id.")
    if document.status == "written" and document.fhir_document_id:
        await ctx.db.commit()
        return _written_result(document)
    if document.status == "retracted":
        await ctx.db.commit()
        raise NotReadyError(
            "This picture was withdrawn from the chart. Make a new version from the workspace instead."
        )
    return None


async def _audit_approval(ctx: WorkflowContext, document: DocumentView, before: DraftContent) -> None:
    content = document.content
    approved = ApprovedText.of(content)
    entities = [draft_entity(document), _source_entity(content)]
    if content.caption != before.caption or content.alt_text != before.alt_text:
        await ctx.audit(
            AuditAction.EDIT_CAPTION,
            entities=entities,
            patient=content.patient_id,
            detail={"job_id": document.job_id, **approved.detail()},
            description=f"{ctx.actor_reference} edited the caption or alt text of the draft about "
            f"{content.source_reference} before approving it",
        )
    await ctx.audit(
        AuditAction.APPROVE,
        entities=entities,
        patient=content.patient_id,
        detail={"job_id": document.job_id, **approved.detail()},
        description=f"{ctx.actor_reference} approved the picture about {content.source_reference}"
        + (" with edited text" if approved.edited else " as generated"),
    )


async def _claim(ctx: WorkflowContext, approval: Approval) -> DocumentView | WriteBackResult:
    """Take the document for writing (status approved), or return what an earlier approval wrote.

    The status is a compare-and-set on the row's version, so of two approvals at once exactly one writes;
    the other waits for its answer (each look in its own short transaction, never holding the writer lock).
    """
    db, keyring = ctx.db, ctx.services.keyring
    deadline = time.monotonic() + WAIT_FOR_OTHER_APPROVAL_SECONDS
    while True:
        document = await load_document(db, keyring=keyring, job_id=approval.job_id)
        settled = await _settled(ctx, document)
        if settled is not None:
            return settled
        assert document is not None  # noqa: S101 - _settled raised otherwise
        if document.status == "approved" and _claim_is_fresh(document):
            await db.commit()
            if time.monotonic() > deadline:
                raise ApprovalInProgressError(
                    "Someone else is saving this picture right now. Reload the page in a minute to see it."
                )
            await asyncio.sleep(0.25)
            continue
        before = document.content
        await save_content(
            db, keyring=keyring, document=document, content=_approved_content(before, approval)
        )
        if not await transition(
            db, document=document, to_status="approved", from_statuses=(document.status,), error=None
        ):
            await db.rollback()  # another approval changed the row since we read it: look again
            continue
        await _audit_approval(ctx, document, before)
        await db.commit()
        return document


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
    job = await ctx.services.queue.get(approval.job_id)
    if job is None or job.status != "succeeded":
        raise NotReadyError("The illustration is not finished yet.")
    png = await ctx.services.queue.read_artifact(approval.job_id, "png")
    # The app's one CapabilityStatement per EHR (settings.capabilities_max_age_seconds), not one per approval.
    profile = await ctx.profile(fhir)
    claimed = await _claim(ctx, approval)
    if isinstance(claimed, WriteBackResult):
        return claimed
    return await _WriteBack(
        ctx, fhir, claimed, png=png, practitioner_id=practitioner_id, profile=profile
    ).run()


class _WriteBack:
    """One claimed document's trip to the EHR: write (narrowing the attachments once if refused), supersede
    what it replaces, record the outcome."""

    def __init__(
        self,
        ctx: WorkflowContext,
        fhir: FhirClient,
        document: DocumentView,
        *,
        png: bytes,
        practitioner_id: str,
        profile: EhrProfile,
    ) -> None:
        self.ctx, self.fhir, self.document, self.png = ctx, fhir, document, png
        self.practitioner_id = practitioner_id
        self.profile = profile
        self.policy: AttachmentPolicy = profile.attachments  # narrowed when the EHR refuses the attachments
        self.notes: list[str] = []
        content = document.content
        self.replaces = content.replaces.fhir_document_id if content.replaces else None
        self.model = ctx.services.models.get(content.model)
        self.reviewer: Reviewer | None = None  # a portrait's approving reviewer, named in the Provenance

    async def run(self) -> WriteBackResult:
        self.reviewer = await approving_reviewer(self.ctx.db, self.document.job_id)
        fhir_document_id = await self._write_or_fail()
        superseded: SupersedeOutcome | None = None
        if self.replaces is not None:
            may_update = self.ctx.scopes.allows("DocumentReference", "update")
            superseded = await supersede_document(
                self.fhir, self.replaces, may_update=may_update, server_updates=self.profile.updates_documents
            )
        await self._record_written(fhir_document_id, superseded)
        return WriteBackResult(
            fhir_document_id=fhir_document_id,
            already_written=False,
            included_image=self.policy.accept_images,
            notes=tuple(self.notes),
            replaced_document_id=self.replaces,
            superseded=superseded,
        )

    async def _write_or_fail(self) -> str:
        """The written DocumentReference's id; each failure is recorded and becomes WriteBackFailedError."""
        db = self.ctx.db
        try:
            return await self._write_with_fallbacks()
        except FhirError as error:
            await self._record_failure(f"EHR answered {error.status}", status=error.status)
            raise _write_back_failed(error) from error
        except BinaryScopeMissingError as error:
            await self._record_failure("Binary create not granted", status=None)
            raise WriteBackFailedError(str(error), retryable=False) from error
        except (ResourceValidationError, ValueError) as error:
            # A resource we built is invalid: our bug. Nothing was sent (everything is validated first).
            log.error(
                "write-back built an invalid resource",
                job_id=self.document.job_id,
                error_type=type(error).__name__,
            )
            await self._record_failure("invalid resource (bug)", status=None)
            raise WriteBackFailedError(
                "CareCanvas could not build a valid document for the EHR. This is a bug and has been logged; "
                "nothing was sent.",
                retryable=False,
            ) from error
        except BaseException:
            # Anything else (cancellation included): release the claim so a retry need not wait for the lease.
            await db.rollback()
            await transition(db, document=self.document, to_status="failed", from_statuses=("approved",))
            await db.commit()
            raise

    async def _write_with_fallbacks(self) -> str:
        while True:
            try:
                return await self._write_once()
            except FatalFhirError as error:
                fallback = fallback_policy(error, self.policy)
                if fallback is None:
                    raise
                self.policy, note = fallback
                self.notes.append(note)
                log.info(
                    "write-back retried with narrower attachments",
                    job_id=self.document.job_id,
                    status=error.status,
                )

    async def _write_once(self) -> str:
        now = datetime.now(UTC)
        content = self.document.content
        document_reference, binaries = apply_attachment_policy(
            build_document_reference(self._document_input(now)),
            policy=self.policy,
            patient_id=content.patient_id or "",
        )
        if binaries and not self.ctx.scopes.allows("Binary", "create"):
            raise BinaryScopeMissingError(
                "The files are too large for this EHR to take in one piece, and this launch may not upload "
                "them separately (it needs the patient/Binary.c scope). Nothing was sent; ask your EHR team."
            )
        written = await write_document_set(
            self.fhir,
            document=document_reference,
            device=build_model_device(
                device_id_value=f"{self.model.name}:{self.model.version}",
                model_name=self.model.name,
                model_version=self.model.version,
            ),
            provenance=self._provenance(now),
            identifier_system=IDENTIFIER_SYSTEM,
            identifier_value=artifact_identifier(self.document.job_id),
            binaries=binaries,
        )
        return written.document_id

    def _document_input(self, now: datetime) -> DocumentReferenceInput:
        content = self.document.content
        return DocumentReferenceInput(
            identifier_value=artifact_identifier(self.document.job_id),
            patient_id=content.patient_id or "",
            practitioner_id=self.practitioner_id,
            organization_id=self.ctx.ehr.organization_id,
            encounter_id=content.encounter_id,
            condition_id=content.condition_id,
            source_ref=None if content.condition_id else content.source_reference,
            description=_description(content),
            language=content.language,
            pdf=self._handout(now),
            png=self.png,
            alt_text=content.alt_text,
            created=now,
            date=now,
            replaces=self.replaces,
        )

    def _handout(self, now: datetime) -> bytes:
        content = self.document.content
        return render_handout_pdf(
            png=self.png,
            title=content.title,
            caption=content.caption,
            alt_text=content.alt_text,
            language=content.language,
            created=now.date(),
            page_size=self.ctx.ehr.handout_page_size,
            test_model_notice=TEST_MODEL_NOTICE if self.model.is_test_model else None,
        )

    def _provenance(self, now: datetime) -> dict[str, Any]:
        provenance = self._base_provenance(now)
        if self.reviewer is not None:
            agents = provenance["agent"]
            agents.append(provenance_agent(self.reviewer, agents[-1].get("onBehalfOf")))
        return provenance

    def _base_provenance(self, now: datetime) -> dict[str, Any]:
        content = self.document.content
        return build_provenance(
            # Placeholders: write_document_set points them at the real DocumentReference and Device.
            target_ref=f"urn:uuid:{uuid.uuid4()}",
            device_ref=f"urn:uuid:{uuid.uuid4()}",
            practitioner_id=self.practitioner_id,
            organization_id=self.ctx.ehr.organization_id,
            condition_id=content.condition_id,
            source_ref=None if content.condition_id else content.source_reference,
            prompt_markdown=_prompt_markdown(content, self.model),
            started=now,
            ended=now,
            recorded=now,
        )

    async def _record_written(self, fhir_document_id: str, superseded: SupersedeOutcome | None) -> None:
        ctx, document = self.ctx, self.document
        content = document.content.model_copy(
            update={"included_image": self.policy.accept_images, "write_notes": tuple(self.notes)}
        )
        await save_content(ctx.db, keyring=ctx.services.keyring, document=document, content=content)
        await transition(
            ctx.db,
            document=document,
            to_status="written",
            from_statuses=("approved",),
            fhir_document_id=fhir_document_id,
            identifier=artifact_identifier(document.job_id),
            error=None,
        )
        new_reference = f"DocumentReference/{fhir_document_id}"
        entities = [AuditEntity(new_reference), _source_entity(content), draft_entity(document)]
        if self.replaces is not None:
            entities.append(AuditEntity(f"DocumentReference/{self.replaces}", EntityRole.REPLACED))
        await ctx.audit(
            AuditAction.WRITE_BACK,
            entities=entities,
            patient=content.patient_id,
            detail={"job_id": document.job_id, "image": self.policy.accept_images, "replaces": self.replaces},
            description=f"{ctx.actor_reference} wrote {new_reference} about {content.source_reference} "
            "to the chart",
        )
        if superseded == "superseded":
            await self._record_superseded(new_reference, content)
        await ctx.db.commit()
        record_writeback(ctx.ehr.name, written=True)

    async def _record_superseded(self, new_reference: str, content: DraftContent) -> None:
        old_reference = f"DocumentReference/{self.replaces}"
        await self.ctx.audit(
            AuditAction.SUPERSEDE,
            entities=[AuditEntity(old_reference), AuditEntity(new_reference, EntityRole.SOURCE)],
            patient=content.patient_id,
            detail={"status": "superseded", "replaced_by": new_reference.removeprefix("DocumentReference/")},
            description=f"{self.ctx.actor_reference} marked {old_reference} superseded by {new_reference}",
        )

    async def _record_failure(self, reason: str, *, status: int | None) -> None:
        ctx, document = self.ctx, self.document
        await transition(
            ctx.db, document=document, to_status="failed", from_statuses=("approved",), error=reason
        )
        await ctx.audit(
            AuditAction.WRITE_BACK,
            AuditOutcome.FAILURE,
            entities=[draft_entity(document), _source_entity(document.content)],
            patient=document.content.patient_id,
            detail={"job_id": document.job_id, "status": status},
            description=f"{ctx.actor_reference} could not write the approved picture about "
            f"{document.content.source_reference} to the chart",
        )
        await ctx.db.commit()
        record_writeback(ctx.ehr.name, written=False)


def _write_back_failed(error: FhirError) -> WriteBackFailedError:
    if isinstance(error, TemporaryFhirError):
        return WriteBackFailedError(
            "The EHR did not answer in time. Nothing was saved twice: try again in a minute.", retryable=True
        )
    return WriteBackFailedError(
        f"The EHR did not accept the document ({error.diagnostics or 'no reason given'}). "
        "Nothing was lost: you can try again.",
        retryable=False,
    )


def _description(content: DraftContent) -> str:
    about = content.condition_text
    return f"{content.title} ({about})" if about else content.title


def _prompt_markdown(content: DraftContent, model: ModelSpec) -> str:
    # The prompt holds the condition concept and style only; no patient identifiers ever enter it.
    return (
        f"---\nmodel: {model.name}\nversion: {model.version}\nseed: {content.seed}\n"
        f"style: {content.style}\ntopic: {content.topic_id}\n---\n\n"
        f"{content.prompt}\n\nNegative: {content.negative_prompt or ''}\n"
    )
