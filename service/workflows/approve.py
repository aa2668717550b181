"""Approve a reviewed illustration and write it back to the EHR exactly once, in the shape it accepts."""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

import structlog

from fhir_adapters import (
    AttachmentPolicy,
    DocumentReferenceInput,
    FatalFhirError,
    FhirClient,
    FhirError,
    RequestLimitError,
    RequestTooLargeError,
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
from fhir_adapters.us_core import practitioner_organization
from service.audit import (
    AuditAction,
    AuditEntity,
    AuditOutcome,
    CareCanvasObject,
    EntityRole,
    carecanvas_ref,
)
from service.documents import DocumentView, DraftContent, load_document, save_content, transition
from service.ehr_profile import EhrProfile, LearnedLimit
from service.generation.handout import clinic_details_of, render_handout_pdf
from service.generation.models import ModelSpec
from service.generation.text import normalise_free_text
from service.images import ImageTooLargeError, optimise_png, png_size
from service.jobs import JobKind
from service.metrics import record_writeback
from service.workflows.context import WorkflowContext
from service.workflows.errors import (
    AboveReadingTargetError,
    ApprovalInProgressError,
    BinaryScopeMissingError,
    NotAllowedError,
    NotReadyError,
    OrganizationUnknownError,
    PortraitNotReviewedError,
    WriteBackFailedError,
    WriteBackTooLargeError,
)
from service.workflows.regenerate import SupersedeOutcome, supersede_document
from service.workflows.review import MAX_CAPTION_GRADE, measured_grade
from service.workflows.reviewer import (
    Reviewer,
    approved_patient_portrait,
    approving_reviewer,
    contained_reviewer,
    provenance_agent,
    require_review,
    words_locked,
)

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
# Each try after a refusal narrows something (attachments, the body limit, the picture), so this is plenty.
MAX_WRITE_ATTEMPTS = 6


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
    if refusal is WriteRefusal.INLINE_TOO_LARGE and policy.max_inline_bytes > 0:
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


class AboveTargetReason(StrEnum):
    """Why a clinician approved a caption that reads above the plain-language target (audited)."""

    TERMS_EXPLAINED = "terms-explained"
    PATIENT_ASKED = "patient-asked"
    READ_TOGETHER = "read-together"

    @property
    def label(self) -> str:
        return ABOVE_TARGET_LABELS[self]


ABOVE_TARGET_LABELS: dict[AboveTargetReason, str] = {
    AboveTargetReason.TERMS_EXPLAINED: "The medical words are needed, and I explained them to the patient",
    AboveTargetReason.PATIENT_ASKED: "The patient asked for the fuller wording",
    AboveTargetReason.READ_TOGETHER: "I read the handout together with the patient",
}


@dataclass(frozen=True)
class Approval:
    """What the clinician approved: the job and the caption and alt text as they stood on the form.

    `reading_target`: refuse a caption above the plain-language grade unless `above_target` says why
    (both faces set it).
    """

    job_id: str
    caption: str
    alt_text: str
    reading_target: bool = False
    above_target: AboveTargetReason | None = None


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


def _check_reading_target(content: DraftContent, approval: Approval) -> float | None:
    """The approved caption's grade; raises where it is above the target and no reason was given."""
    grade = measured_grade(content.caption, content.language)
    too_hard = grade is not None and grade > MAX_CAPTION_GRADE
    if approval.reading_target and too_hard and approval.above_target is None:
        raise AboveReadingTargetError(
            f"The caption reads at grade {grade:.1f}, above the target of grade {MAX_CAPTION_GRADE:.0f}. "
            "Make it simpler, or choose \u201capprove anyway\u201d and say why."
        )
    return grade


async def _audit_approval(
    ctx: WorkflowContext, document: DocumentView, before: DraftContent, approval: Approval
) -> None:
    content = document.content
    approved = ApprovedText.of(content)
    grade = measured_grade(content.caption, content.language)
    above = grade is not None and grade > MAX_CAPTION_GRADE
    reading = {
        "reading_grade": grade,
        "above_target": above,
        "above_target_reason": approval.above_target.value if above and approval.above_target else None,
    }
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
        detail={"job_id": document.job_id, **approved.detail(), **reading},
        description=f"{ctx.actor_reference} approved the picture about {content.source_reference}"
        + (" with edited text" if approved.edited else " as generated")
        + (
            f", above the reading target (grade {grade:.1f}; reason {reading['above_target_reason']})"
            if above and grade is not None
            else ""
        ),
    )


async def _check_reviewed(ctx: WorkflowContext, document: DocumentView) -> None:
    """A portrait needs a reviewer's approval when reviewers are configured; a refusal is audited (denied)."""
    if document.content.kind != JobKind.PORTRAIT:
        return  # education pictures are never gated
    try:
        await require_review(ctx.db, ctx.services.settings, document.job_id)
    except PortraitNotReviewedError as refused:
        await ctx.audit(
            AuditAction.APPROVE,
            AuditOutcome.DENIED,
            entities=[draft_entity(document)],
            patient=document.content.patient_id,
            detail={
                "job_id": document.job_id,
                "reason": refused.reason.value,
                "review_status": refused.status,
            },
            description=f"{ctx.actor_reference} was refused saving portrait {document.job_id} to the chart: "
            f"no reviewer approved it ({refused.status.replace('_', ' ')})",
        )
        await ctx.db.commit()
        raise


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
        await _check_reviewed(ctx, document)
        if document.status == "approved" and _claim_is_fresh(document):
            await db.commit()
            if time.monotonic() > deadline:
                raise ApprovalInProgressError(
                    "Someone else is saving this picture right now. Reload the page in a minute to see it."
                )
            await asyncio.sleep(0.25)
            continue
        before = document.content
        # A portrait a reviewer approved goes to the chart with the words they approved, not the form's.
        locked = await words_locked(db, document.job_id, before.kind)
        approved_content = before if locked else _approved_content(before, approval)
        try:
            _check_reading_target(approved_content, approval)
        except AboveReadingTargetError:
            await db.commit()
            raise
        await save_content(db, keyring=keyring, document=document, content=approved_content)
        if not await transition(
            db, document=document, to_status="approved", from_statuses=(document.status,), error=None
        ):
            await db.rollback()  # another approval changed the row since we read it: look again
            continue
        await _audit_approval(ctx, document, before, approval)
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


async def write_back_reviewed_portrait(
    ctx: WorkflowContext, fhir: FhirClient, job_id: str, *, above_target: AboveTargetReason | None
) -> WriteBackResult:
    """Write a reviewer-approved portrait of this patient to the chart from any clinician launch.

    The words are the ones the reviewer approved (locked since: `reviewer.words_locked`); the rest is
    `approve_and_write_back`: the same claim (exactly once, a second try answers what the first wrote), the
    same gate, reading target, audit records and Provenance (this launch's clinician as author, the reviewer
    as verifier). Another patient's or EHR's draft, or one no reviewer approved, is JobNotOwnedError.
    """
    document = await approved_patient_portrait(ctx, job_id)
    await ctx.db.commit()  # a short read; approve_and_write_back's queue reads come first (SQLite)
    content = document.content
    approval = Approval(
        job_id=job_id,
        caption=content.caption,
        alt_text=content.alt_text,
        reading_target=True,
        above_target=above_target,
    )
    return await approve_and_write_back(ctx, fhir, approval)


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
        # Lowered when the EHR (or its proxy) refuses a body as too large; the PNG attachment may be made
        # smaller to fit it (the handout PDF always shows the original picture).
        self.limits = LearnedLimit(target=profile.max_request_bytes, ceiling=profile.request_ceiling_bytes)
        self.attachment_png = png
        self.png_optimised = False
        self.organization_id: str = ""
        self.notes: list[str] = []
        content = document.content
        self.replaces = content.replaces.fhir_document_id if content.replaces else None
        self.model = ctx.services.models.get(content.model)
        self.reviewer: Reviewer | None = None  # a portrait's approving reviewer, named in the Provenance

    async def run(self) -> WriteBackResult:
        self.reviewer = await approving_reviewer(
            self.ctx.db, self.document.job_id, keyring=self.ctx.services.keyring
        )
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
            self.organization_id = await self._organization()
            return await self._write_with_fallbacks()
        except RequestLimitError as error:
            await self._record_failure("over the EHR's request size limit", status=None)
            raise _too_large(error.limit_bytes) from error
        except FhirError as error:
            await self._record_failure(f"EHR answered {error.status}", status=error.status)
            raise _write_back_failed(error, limit=self.limits.ceiling) from error
        except BinaryScopeMissingError as error:
            await self._record_failure("Binary create not granted", status=None)
            raise WriteBackFailedError(str(error), retryable=False) from error
        except OrganizationUnknownError:
            await self._record_failure("no organization for US Core custodian/onBehalfOf", status=None)
            raise
        except ImageTooLargeError as error:
            await self._record_failure("picture over the pixel cap", status=None)
            raise WriteBackFailedError(
                f"This picture is too big to put in a handout ({error.width} by {error.height} dots). "
                "Nothing was sent. Make a new, smaller picture.",
                retryable=False,
            ) from error
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
        for _ in range(MAX_WRITE_ATTEMPTS - 1):
            try:
                return await self._write_once()
            except RequestLimitError as error:  # nothing was sent: one attachment alone is over the limit
                if not self._shrink_picture(error):
                    raise
            except RequestTooLargeError as error:  # the EHR or its proxy refused the body as too large
                if write_refusal(error) is WriteRefusal.TOO_LARGE and not self._learn_limit(error):
                    raise
                if write_refusal(error) is WriteRefusal.INLINE_TOO_LARGE and not self._narrow(error):
                    raise
            except FatalFhirError as error:
                if not self._narrow(error):
                    raise
        return await self._write_once()

    def _narrow(self, error: FhirError) -> bool:
        """Narrow the attachments after a refusal that names them; False when nothing narrower is left."""
        fallback = fallback_policy(error, self.policy)
        if fallback is None:
            return False
        self.policy, note = fallback
        self.notes.append(note)
        log.info(
            "write-back retried with narrower attachments", job_id=self.document.job_id, status=error.status
        )
        return True

    def _learn_limit(self, error: RequestTooLargeError) -> bool:
        """Remember the EHR's lower body limit (for every later write) and try again within it."""
        learned = self.ctx.services.profiles.learn_request_limit(
            self.ctx.ehr.name,
            current=self.limits,
            refused_bytes=error.sent_bytes,
            stated_limit=error.limit_bytes,
        )
        # Warning, not info: an operator should raise the proxy's limit or the registration's setting.
        log.warning(
            "EHR refused the write-back as too large",
            job_id=self.document.job_id,
            ehr=self.ctx.ehr.name,
            status=error.status,
            sent_bytes=error.sent_bytes,
            max_request_bytes=learned.target if learned else None,
        )
        if learned is None:
            return False
        self.limits = learned
        return True

    def _shrink_picture(self, error: RequestLimitError) -> bool:
        """The PNG alone is over the limit: a smaller encoding of it, else the PDF handout alone."""
        if error.content_type != "image/png" or not self.policy.accept_images:
            return False
        smaller = None if self.png_optimised else optimise_png(self.png, max_bytes=error.max_data_bytes)
        self.png_optimised = True
        if smaller is not None:
            self.attachment_png, lossless = smaller
            self.notes.append(
                "This EHR takes only small files, so the picture file was saved in a smaller form"
                + ("." if lossless else " with fewer colours. The handout shows the full picture.")
            )
        else:
            self.policy = AttachmentPolicy(accept_images=False, max_inline_bytes=self.policy.max_inline_bytes)
            self.notes.append(
                "This EHR takes only small files, so only the PDF handout was saved. It shows the picture."
            )
        log.warning(
            "write-back picture made to fit the EHR's body limit",
            job_id=self.document.job_id,
            ehr=self.ctx.ehr.name,
            max_request_bytes=error.limit_bytes,
            outcome="smaller" if smaller is not None else "dropped",
        )
        return True

    async def _organization(self) -> str:
        """US Core's custodian and onBehalfOf: the registration's organization, else the clinician's
        PractitionerRole's; neither means nothing can be written that conforms."""
        configured = self.ctx.ehr.organization_id
        if configured:
            return configured
        found = None
        if self.ctx.scopes.allows("PractitionerRole", "search"):
            found = await practitioner_organization(self.fhir, self.practitioner_id)
        if found is None:
            raise OrganizationUnknownError(
                "CareCanvas does not know your clinic, so it cannot save this note. Nothing was sent. "
                "Ask your EHR team to set organization_id for this EHR, or to add your clinic to your "
                "PractitionerRole."
            )
        return found

    async def _write_once(self) -> str:
        now = datetime.now(UTC)
        content = self.document.content
        # Laid out in a thread (a Chinese or Korean handout takes most of a second): other requests go on.
        pdf = await asyncio.to_thread(self._handout, now)
        document_reference, binaries = apply_attachment_policy(
            build_document_reference(self._document_input(now, pdf)),
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
            max_request_bytes=self.limits.target,
            request_ceiling_bytes=self.limits.ceiling,
        )
        return written.document_id

    def _document_input(self, now: datetime, pdf: bytes) -> DocumentReferenceInput:
        content = self.document.content
        png_size(self.png, cap=self.ctx.services.settings.max_image_pixels)
        return DocumentReferenceInput(
            identifier_value=artifact_identifier(self.document.job_id),
            patient_id=content.patient_id or "",
            practitioner_id=self.practitioner_id,
            organization_id=self.organization_id,
            encounter_id=content.encounter_id,
            condition_id=content.condition_id,
            source_ref=None if content.condition_id else content.source_reference,
            description=_description(content),
            language=content.language,
            pdf=pdf,
            png=self.attachment_png,
            alt_text=content.alt_text,
            created=now,
            date=now,
            replaces=self.replaces,
            practitioner_display=self.ctx.actor_display,
            # The handout's label is the caption the clinician approved: what a portal shows the patient.
            pdf_title=content.caption,
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
            # The same sections and clinic lines as the review page's preview (drafts.py).
            sections=self.ctx.services.prompts.sections(content.topic_id, content.language),
            clinic=clinic_details_of(self.ctx.ehr),
            patient_name=self.ctx.patient_display,
            approved_by=self.ctx.actor_display,
        )

    def _provenance(self, now: datetime) -> dict[str, Any]:
        provenance = self._base_provenance(now)
        if self.reviewer is not None:
            agents = provenance["agent"]
            agents.append(provenance_agent(self.reviewer, agents[-1].get("onBehalfOf")))
            contained = contained_reviewer(self.reviewer)
            if contained is not None:  # a staff reviewer has no FHIR resource of their own
                provenance.setdefault("contained", []).append(contained)
        return provenance

    def _base_provenance(self, now: datetime) -> dict[str, Any]:
        content = self.document.content
        return build_provenance(
            # Placeholders: write_document_set points them at the real DocumentReference and Device.
            target_ref=f"urn:uuid:{uuid.uuid4()}",
            device_ref=f"urn:uuid:{uuid.uuid4()}",
            practitioner_id=self.practitioner_id,
            organization_id=self.organization_id,
            condition_id=content.condition_id,
            source_ref=None if content.condition_id else content.source_reference,
            prompt_markdown=_prompt_markdown(content, self.model),
            started=now,
            ended=now,
            recorded=now,
            practitioner_display=self.ctx.actor_display,
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


def _too_large(limit_bytes: int | None) -> WriteBackTooLargeError:
    size = f" It takes at most {_size_words(limit_bytes)} at a time." if limit_bytes else ""
    return WriteBackTooLargeError(
        f"The files are too big for this EHR.{size} Trying again will not help. Nothing was sent twice. "
        "Ask your EHR team to raise the limit."
    )


def _size_words(size: int) -> str:
    return f"{size / 1_000_000:.1f} MB" if size >= 1_000_000 else f"{max(1, round(size / 1000))} KB"


def _write_back_failed(error: FhirError, *, limit: int) -> WriteBackFailedError:
    if isinstance(error, RequestTooLargeError):
        return _too_large(error.limit_bytes or limit)
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
