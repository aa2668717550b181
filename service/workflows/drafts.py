"""Edit a draft before approval (caption, alt text) and preview its handout; both audited."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from service.audit import AuditAction, AuditEntity, CareCanvasObject, EntityRole, carecanvas_ref
from service.documents import DocumentView, load_document, save_content
from service.generation.handout import render_handout_pdf
from service.generation.text import normalise_free_text
from service.jobs import JobStatus
from service.workflows.approve import TEST_MODEL_NOTICE
from service.workflows.context import WorkflowContext
from service.workflows.errors import ArtifactNotReadyError, JobNotOwnedError, NotReadyError
from service.workflows.jobs import JobProgress

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


async def handout_preview(ctx: WorkflowContext, job: JobProgress) -> bytes:
    """The printable handout as approval would write it, from the draft as it stands now (audited)."""
    if job.status is not JobStatus.SUCCEEDED:
        raise ArtifactNotReadyError("The image is not finished yet.")
    # The queue read first: it has a transaction of its own, and on SQLite the draft read below holds
    # the writer lock until the caller commits.
    png = await ctx.services.queue.read_artifact(job.job_id, "png")
    document = await _owned_document(ctx, job.job_id)
    content = document.content
    model = ctx.services.models.get(content.model)
    pdf = render_handout_pdf(
        png=png,
        title=content.title,
        caption=content.caption,
        alt_text=content.alt_text,
        language=content.language,
        created=datetime.now(UTC).date(),
        page_size=ctx.ehr.handout_page_size,
        test_model_notice=TEST_MODEL_NOTICE if model.is_test_model else None,
    )
    await ctx.audit(
        AuditAction.VIEW,
        entities=[AuditEntity(carecanvas_ref(CareCanvasObject.HANDOUT, job.job_id))],
        detail={"job_id": job.job_id},
        patient=content.patient_id,
        description=f"{ctx.actor_reference} viewed the handout preview about {content.source_reference}",
    )
    return pdf
