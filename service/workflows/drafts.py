"""Drafts before approval: edit caption and alt text, preview the handout, list pending ones, discard."""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime

from service.audit import AuditAction, AuditEntity, CareCanvasObject, EntityRole, carecanvas_ref
from service.documents import (
    DocumentView,
    DraftContent,
    delete_draft,
    load_document,
    recent_documents,
    save_content,
)
from service.generation.handout import clinic_details_of, render_handout_pdf
from service.generation.text import normalise_free_text
from service.jobs import JobStatus
from service.pdf_pages import PdfPageError, page_count, page_png
from service.workflows.approve import TEST_MODEL_NOTICE
from service.workflows.context import WorkflowContext
from service.workflows.errors import ArtifactNotReadyError, JobNotOwnedError, NotReadyError
from service.workflows.jobs import JobProgress
from service.workflows.review import GradedCaption
from service.workflows.reviewer import WORDS_LOCKED, words_locked

# Only a draft may change: once approved, the chart holds what was approved.
_EDITABLE = frozenset({"draft", "failed"})


@dataclass(frozen=True)
class DraftChange:
    """New text for the draft; None keeps what it has."""

    caption: str | None = None
    alt_text: str | None = None


async def _owned_document(ctx: WorkflowContext, job_id: str) -> DocumentView:
    document = await load_document(ctx.db, keyring=ctx.services.keyring, job_id=job_id)
    if document is None:
        raise JobNotOwnedError("There is no draft for this picture. Start again from the workspace.")
    return document


async def edit_draft(ctx: WorkflowContext, job_id: str, change: DraftChange) -> DocumentView:
    """Save the new caption and/or alt text (cleaned like an approval's); the caller commits."""
    document = await _owned_document(ctx, job_id)
    if document.status not in _EDITABLE:
        raise NotReadyError("This picture was already approved; make a new version to change it.")
    if await words_locked(ctx.db, job_id, document.content.kind):
        raise NotReadyError(WORDS_LOCKED)
    content_before = document.content
    update: dict[str, str] = {}
    if change.caption is not None:
        update["caption"] = normalise_free_text(change.caption, max_chars=600) or content_before.caption
    if change.alt_text is not None:
        update["alt_text"] = normalise_free_text(change.alt_text, max_chars=300) or content_before.alt_text
    content = document.content.model_copy(update=update)
    await save_content(ctx.db, keyring=ctx.services.keyring, document=document, content=content)
    await ctx.audit(
        AuditAction.EDIT_CAPTION,
        entities=[
            AuditEntity(carecanvas_ref(CareCanvasObject.DRAFT, document.id)),
            AuditEntity(content.source_reference, EntityRole.SOURCE),
        ],
        detail={"job_id": job_id, "fields": sorted(update)},
        patient=content.patient_id,
        description=f"{ctx.actor_reference} edited the {' and '.join(sorted(update)) or 'text'} of the draft "
        f"about {content.source_reference}",
    )
    return document


async def _draft_handout(ctx: WorkflowContext, job: JobProgress) -> tuple[bytes, DraftContent]:
    if job.status is not JobStatus.SUCCEEDED:
        raise ArtifactNotReadyError("The image is not finished yet.")
    # The queue read first: it has a transaction of its own, and on SQLite the draft read below holds
    # the writer lock until the caller commits.
    png = await ctx.services.queue.read_artifact(job.job_id, "png")
    document = await _owned_document(ctx, job.job_id)
    content = document.content
    model = ctx.services.models.get(content.model)
    # Laid out in a thread (a Chinese or Korean handout takes most of a second): other requests go on.
    pdf = await asyncio.to_thread(
        render_handout_pdf,
        png=png,
        title=content.title,
        caption=content.caption,
        alt_text=content.alt_text,
        language=content.language,
        created=datetime.now(UTC).date(),
        page_size=ctx.ehr.handout_page_size,
        test_model_notice=TEST_MODEL_NOTICE if model.is_test_model else None,
        sections=ctx.services.prompts.sections(content.topic_id, content.language),
        clinic=clinic_details_of(ctx.ehr),
        # As approval prints them (approve.py): the patient's name, and the clinician who approves.
        patient_name=ctx.patient_display,
        approved_by=ctx.actor_display,
    )
    return pdf, content


def handout_revision(content: DraftContent) -> str:
    """Changes whenever the handout's text does, so the browser fetches new page images."""
    text = "\x1f".join((content.title, content.caption, content.alt_text, content.language))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class HandoutPages:
    """How many page images the draft's handout has, and its revision (for the image URLs)."""

    count: int
    revision: str


async def handout_pages(ctx: WorkflowContext, job: JobProgress) -> HandoutPages:
    """The draft's handout page count as it stands now (nothing shown yet, so nothing audited)."""
    pdf, content = await _draft_handout(ctx, job)
    return HandoutPages(count=await asyncio.to_thread(page_count, pdf), revision=handout_revision(content))


async def handout_page_image(ctx: WorkflowContext, job: JobProgress, page: int) -> bytes:
    """One page of the draft's handout as a PNG, exactly as approval would print it (audited)."""
    pdf = await handout_preview(ctx, job)
    try:
        return await asyncio.to_thread(page_png, pdf, page)
    except PdfPageError as error:
        raise ArtifactNotReadyError(f"The handout has no page {page}.") from error


async def handout_preview(ctx: WorkflowContext, job: JobProgress) -> bytes:
    """The printable handout as approval would write it, from the draft as it stands now (audited)."""
    pdf, content = await _draft_handout(ctx, job)
    await ctx.audit(
        AuditAction.VIEW,
        entities=[AuditEntity(carecanvas_ref(CareCanvasObject.HANDOUT, job.job_id))],
        detail={"job_id": job.job_id},
        patient=content.patient_id,
        description=f"{ctx.actor_reference} viewed the handout preview about {content.source_reference}",
    )
    return pdf


# Pending drafts listed in the workspace: the newest few of this EHR, of which this patient's are shown.
_PENDING_SCAN = 200
_PENDING_SHOWN = 10


@dataclass(frozen=True)
class PendingDraft:
    """A draft not yet approved (or whose write-back failed), as the workspace lists it."""

    job_id: str
    title: str
    caption: str
    status: str
    created: str  # YYYY-MM-DD HH:MM UTC
    replaces: str | None
    job_status: str = ""
    resumable: bool = False  # made in this session, so its review page opens here

    @property
    def discardable(self) -> bool:
        return self.job_status not in (JobStatus.QUEUED, JobStatus.RUNNING)


async def pending_drafts(ctx: WorkflowContext) -> list[PendingDraft]:
    """This patient's drafts never approved, newest first; the caller commits."""
    documents = await recent_documents(
        ctx.db,
        keyring=ctx.services.keyring,
        ehr_name=ctx.ehr.name,
        statuses=tuple(_EDITABLE),
        limit=_PENDING_SCAN,
    )
    mine = [d for d in documents if ctx.patient_id and d.content.patient_id == ctx.patient_id]
    await ctx.db.commit()  # the queue reads below have transactions of their own
    pending = []
    for document in mine[:_PENDING_SHOWN]:
        job = await ctx.services.queue.get(document.job_id)
        content = document.content
        pending.append(
            PendingDraft(
                job_id=document.job_id,
                title=content.title,
                caption=content.caption,
                status=document.status,
                created=document.created_at.strftime("%Y-%m-%d %H:%M") if document.created_at else "",
                replaces=content.replaces.fhir_document_id if content.replaces else None,
                job_status=str(job.status) if job else "",
                resumable=job is not None and job.session_id_hash == ctx.session_id_hash,
            )
        )
    return pending


async def discard_draft(ctx: WorkflowContext, job_id: str) -> None:
    """Throw away a never-approved draft of this patient (audited as rejected); the caller commits."""
    # The queue first: it has a transaction of its own, and the draft read below opens the caller's.
    job = await ctx.services.queue.get(job_id)
    document = await _owned_document(ctx, job_id)
    if document.content.patient_id != ctx.patient_id or document.ehr_name != ctx.ehr.name:
        raise JobNotOwnedError("There is no draft for this picture. Start again from the workspace.")
    if document.status not in _EDITABLE:
        raise NotReadyError("This picture was already approved; withdraw it from the chart instead.")
    if job is not None and job.status in (JobStatus.QUEUED, JobStatus.RUNNING):
        raise NotReadyError("This picture is still being made. Cancel it first, or wait until it is done.")
    if not await delete_draft(ctx.db, document=document, from_statuses=tuple(_EDITABLE)):
        raise NotReadyError("This draft changed just now. Reload the workspace and try again.")
    content = document.content
    await ctx.audit(
        AuditAction.REJECT,
        entities=[
            AuditEntity(carecanvas_ref(CareCanvasObject.DRAFT, document.id)),
            AuditEntity(content.source_reference, EntityRole.SOURCE),
        ],
        detail={"job_id": job_id, "discarded": True},
        patient=content.patient_id,
        description=f"{ctx.actor_reference} discarded the draft about {content.source_reference}",
    )


@dataclass(frozen=True)
class RevisedDraft:
    """The draft after a live edit: its caption's grade and its handout's pages, to redraw the review page."""

    document: DocumentView
    grade: GradedCaption
    pages: HandoutPages


async def revise_draft(ctx: WorkflowContext, job: JobProgress, change: DraftChange) -> RevisedDraft:
    """Save the edit as it is typed (nothing is lost on navigation), then measure and re-count the handout."""
    document = await edit_draft(ctx, job.job_id, change)
    await ctx.db.commit()  # the edit is kept before the handout is rendered (no writer lock held meanwhile)
    pages = await handout_pages(ctx, job)
    content = document.content
    return RevisedDraft(
        document=document, grade=GradedCaption.of(content.caption, content.language), pages=pages
    )
