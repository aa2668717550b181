"""Review before approval: the draft, its live reading grade and handout pages, and approving it."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, Response

from fhir_adapters.scopes import Interaction
from service.web.choices import checked_language
from service.web.chrome import clinician_chrome
from service.web.context import ClinicianContext
from service.web.errors import AppError, ErrorCode
from service.web.routes_jobs import OwnedJob
from service.web.workflow_errors import workflow_errors
from service.workflows.approve import (
    ABOVE_TARGET_LABELS,
    AboveTargetReason,
    Approval,
    WriteBackResult,
    approve_and_write_back,
)
from service.workflows.drafts import DraftChange, handout_page_image, handout_pages, revise_draft
from service.workflows.review import ArtifactKind, GradedCaption, read_owned_artifact, review_draft
from service.workflows.reviewer import review_hold, words_locked

router = APIRouter()
_NO_STORE = {"Cache-Control": "private, no-store"}


def require(ctx: ClinicianContext, resource_type: str, interaction: Interaction, title: str) -> None:
    if not ctx.allows(resource_type, interaction):
        raise AppError(
            403,
            title,
            "The EHR did not grant CareCanvas permission for this. Ask your EHR team.",
            code=ErrorCode.NOT_ALLOWED,
        )


@router.get("/review/{job_id}", response_class=HTMLResponse)
async def review_page(request: Request, job: OwnedJob, ctx: ClinicianContext) -> Response:
    async with workflow_errors(ctx.db):
        draft = await review_draft(ctx.workflow(), job.job_id)
        settings, kind = ctx.services.settings, draft.document.content.kind
        held = await review_hold(ctx.db, settings, job.job_id, kind)
        locked = await words_locked(ctx.db, job.job_id, kind)
        await ctx.db.commit()
        pages = await handout_pages(ctx.workflow(), job)
    await ctx.db.commit()
    return ctx.services.templates.TemplateResponse(
        request,
        "review.html",
        {
            **clinician_chrome(ctx),
            "job_id": job.job_id,
            "job": job,
            "document": draft.document,
            "content": draft.document.content,
            "grade": draft.graded,
            "language": draft.language,
            "pages": pages,
            "model": draft.model,
            "above_target_reasons": ABOVE_TARGET_LABELS,
            "can_write": ctx.allows("DocumentReference", "create"),
            "held_for_reviewer": held,
            "words_locked": locked,
        },
    )


@router.post("/review/{job_id}/grade", response_class=HTMLResponse)
async def live_grade(
    request: Request,
    job: OwnedJob,
    ctx: ClinicianContext,
    caption: Annotated[str, Form(max_length=2000)],
    language: Annotated[str, Form(max_length=16)],
) -> Response:
    """The reading grade of the caption as it is being typed (an htmx fragment; nothing is stored)."""
    grade = GradedCaption.of(caption, checked_language(language))
    return ctx.services.templates.TemplateResponse(request, "_grade.html", {"grade": grade})


@router.post("/review/{job_id}/draft", response_class=HTMLResponse)
async def live_revision(
    request: Request,
    job: OwnedJob,
    ctx: ClinicianContext,
    caption: Annotated[str, Form(max_length=2000)],
    alt_text: Annotated[str, Form(max_length=1000)],
    above_target_reason: Annotated[str, Form(max_length=40)] = "",
) -> Response:
    """As the clinician types: keep the edit, answer the new grade and redrawn handout (htmx fragments)."""
    async with workflow_errors(ctx.db):
        revised = await revise_draft(ctx.workflow(), job, DraftChange(caption=caption, alt_text=alt_text))
    await ctx.db.commit()
    return ctx.services.templates.TemplateResponse(
        request,
        "_revision.html",
        {
            "job_id": job.job_id,
            "grade": revised.grade,
            "pages": revised.pages,
            "content": revised.document.content,
            "above_target_reasons": ABOVE_TARGET_LABELS,
            "selected_reason": above_target_reason,
        },
        headers=_NO_STORE,
    )


@router.get("/review/{job_id}/handout/{page:int}.png")
async def handout_page(job: OwnedJob, page: int, ctx: ClinicianContext) -> Response:
    """One page of the handout as approval would write it (the draft as it stands now)."""
    async with workflow_errors(ctx.db):
        png = await handout_page_image(ctx.workflow(), job, page)
    await ctx.db.commit()
    return Response(png, media_type="image/png", headers=_NO_STORE)


@router.get("/artifacts/{job_id}/{kind}")
async def artifact(job: OwnedJob, kind: str, ctx: ClinicianContext) -> Response:
    if kind not in {k.value for k in ArtifactKind}:
        raise AppError(404, "No such file", "Only the picture and its progress preview are served here.")
    async with workflow_errors(ctx.db):
        png = await read_owned_artifact(ctx.workflow(), job, ArtifactKind(kind))
    await ctx.db.commit()
    return Response(png, media_type="image/png", headers=_NO_STORE)


def checked_above_target(value: str) -> AboveTargetReason | None:
    if not value:
        return None
    try:
        return AboveTargetReason(value)
    except ValueError:
        raise AppError(
            400,
            "Unknown reason",
            "Pick one of the reasons offered on the page.",
            code=ErrorCode.INVALID_INPUT,
        ) from None


@router.post("/review/{job_id}/approve", response_class=HTMLResponse)
async def approve(
    request: Request,
    job: OwnedJob,
    ctx: ClinicianContext,
    caption: Annotated[str, Form(max_length=2000)],
    alt_text: Annotated[str, Form(max_length=1000)],
    csrf_token: Annotated[str, Form(max_length=100)],
    above_target_reason: Annotated[str, Form(max_length=40)] = "",
) -> Response:
    require(ctx, "DocumentReference", "create", "Write-back is not allowed for this launch")
    approval = Approval(
        job_id=job.job_id,
        caption=caption,
        alt_text=alt_text,
        reading_target=True,
        above_target=checked_above_target(above_target_reason),
    )
    async with workflow_errors(ctx.db), ctx.fhir() as fhir:
        result = await approve_and_write_back(ctx.workflow(), fhir, approval)
    return written_page(request, ctx, job.job_id, result)


def written_page(request: Request, ctx: ClinicianContext, job_id: str, result: WriteBackResult) -> Response:
    """The page after a write-back: this review's approval, or a reviewer-approved portrait."""
    return ctx.services.templates.TemplateResponse(
        request,
        "approved.html",
        {
            **clinician_chrome(ctx),
            "job_id": job_id,
            "fhir_document_id": result.fhir_document_id,
            "already_written": result.already_written,
            "included_image": result.included_image,
            "notes": result.notes,
            "replaced_document_id": result.replaced_document_id,
            "superseded": result.superseded,
            "can_give": ctx.allows("Communication", "create"),
        },
    )
