"""The portrait reviewer's pages: the queue across patients, one draft with its notes, send back, approve."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import APIRouter, Depends, Form, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from service.web.context import ClinicianContext, RequestContext
from service.web.errors import AppError, ErrorCode
from service.web.workflow_errors import workflow_errors
from service.workflows.reviewer import (
    NoteKind,
    Reviewer,
    ReviewStatus,
    decide,
    review_detail,
    review_image,
    review_queue,
    reviewer_for,
)

router = APIRouter()


@dataclass
class ReviewerRequest:
    """A launch whose fhirUser is on the reviewer list (setting portrait_reviewers)."""

    ctx: RequestContext
    reviewer: Reviewer


async def reviewer_context(ctx: ClinicianContext) -> ReviewerRequest:
    reviewer = reviewer_for(ctx.services.settings, ctx.fhir_user)
    if reviewer is None:
        raise AppError(
            403,
            "You are not a portrait reviewer",
            "Only the artists and clinicians on the reviewer list can open the review queue.",
            code=ErrorCode.NOT_ALLOWED,
        )
    return ReviewerRequest(ctx=ctx, reviewer=reviewer)


ReviewerContext = Annotated[ReviewerRequest, Depends(reviewer_context)]
FILTERS = {"all": None, **{status.value: status for status in ReviewStatus}}


@router.get("/reviewer", response_class=HTMLResponse)
async def queue_page(
    request: Request, rc: ReviewerContext, show: Annotated[str, Query(max_length=16)] = "waiting"
) -> Response:
    if show not in FILTERS:
        raise AppError(400, "Not a queue filter", "Choose waiting, sent back, approved or all.")
    ctx = rc.ctx
    async with workflow_errors(ctx.db):
        items = await review_queue(ctx.workflow(), rc.reviewer)
    await ctx.db.commit()
    wanted = FILTERS[show]
    counts = {status.value: sum(item.status is status for item in items) for status in ReviewStatus}
    return ctx.services.templates.TemplateResponse(
        request,
        "reviewer_queue.html",
        {
            "items": [item for item in items if wanted is None or item.status is wanted],
            "counts": counts,
            "total": len(items),
            "show": show,
            "reviewer": rc.reviewer,
            "banner": ctx.session.data.banner,
        },
    )


@router.get("/reviewer/{job_id}", response_class=HTMLResponse)
async def draft_page(request: Request, job_id: str, rc: ReviewerContext) -> Response:
    ctx = rc.ctx
    async with workflow_errors(ctx.db):
        detail = await review_detail(ctx.workflow(), rc.reviewer, job_id)
    await ctx.db.commit()
    return ctx.services.templates.TemplateResponse(
        request,
        "reviewer_draft.html",
        {
            "detail": detail,
            "reviewer": rc.reviewer,
            "csrf_token": ctx.csrf_token,
            "banner": ctx.session.data.banner,
            "decided": request.query_params.get("done"),
        },
    )


@router.get("/reviewer/{job_id}/image")
async def draft_image(job_id: str, rc: ReviewerContext) -> Response:
    ctx = rc.ctx
    async with workflow_errors(ctx.db):
        png = await review_image(ctx.workflow(), rc.reviewer, job_id)
    await ctx.db.commit()
    return Response(png, media_type="image/png", headers={"Cache-Control": "private, no-store"})


ACTIONS = {"note": NoteKind.NOTE, "send-back": NoteKind.SEND_BACK, "approve": NoteKind.APPROVE}


@router.post("/reviewer/{job_id}/{action}")
async def reviewer_action(
    job_id: str,
    action: str,
    rc: ReviewerContext,
    csrf_token: Annotated[str, Form(max_length=100)],
    note: Annotated[str, Form(max_length=1000)] = "",
) -> Response:
    """Add a note, send back with a note, or approve; then back to the draft, which says what was done."""
    kind = ACTIONS.get(action)
    if kind is None:
        raise AppError(404, "No such action", "A reviewer can add a note, send back or approve.")
    ctx = rc.ctx
    async with workflow_errors(ctx.db):
        await decide(ctx.workflow(), rc.reviewer, job_id=job_id, kind=kind, note=note)
    await ctx.db.commit()
    return RedirectResponse(f"/reviewer/{job_id}?done={kind.value}", status_code=303)
