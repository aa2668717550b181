"""Review and chart actions: approve and write back, make a new version of a saved picture, withdraw it."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from fhir_adapters.scopes import Interaction
from service.web.choices import checked_depiction, checked_language, checked_style
from service.web.context import ClinicianContext
from service.web.errors import AppError, ErrorCode
from service.web.routes_jobs import OwnedJob
from service.web.workflow_errors import workflow_errors
from service.workflows.approve import Approval, approve_and_write_back
from service.workflows.regenerate import RegenerationChoice, start_regeneration
from service.workflows.retract import retract_document
from service.workflows.review import ArtifactKind, GradedCaption, read_owned_artifact, review_draft

router = APIRouter()


def _require(ctx: ClinicianContext, resource_type: str, interaction: Interaction, title: str) -> None:
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
    await ctx.db.commit()
    return ctx.services.templates.TemplateResponse(
        request,
        "review.html",
        {
            "job_id": job.job_id,
            "job": job,
            "banner": ctx.session.data.banner,
            "document": draft.document,
            "content": draft.document.content,
            "grade": GradedCaption(draft.caption_grade),
            "model": draft.model,
            "csrf_token": ctx.csrf_token,
            "can_write": ctx.allows("DocumentReference", "create"),
        },
    )


@router.post("/review/{job_id}/grade", response_class=HTMLResponse)
async def live_grade(
    request: Request,
    job: OwnedJob,
    ctx: ClinicianContext,
    caption: Annotated[str, Form(max_length=2000)],
    language: Annotated[str, Form(max_length=5)],
) -> Response:
    """The reading grade of the caption as it is being typed (an htmx fragment; nothing is stored)."""
    grade = GradedCaption.of(caption, checked_language(language))
    return ctx.services.templates.TemplateResponse(request, "_grade.html", {"grade": grade})


@router.get("/artifacts/{job_id}/{kind}")
async def artifact(job: OwnedJob, kind: str, ctx: ClinicianContext) -> Response:
    if kind not in {k.value for k in ArtifactKind}:
        raise AppError(404, "No such file", "Only the picture and its progress preview are served here.")
    async with workflow_errors(ctx.db):
        png = await read_owned_artifact(ctx.workflow(), job, ArtifactKind(kind))
    await ctx.db.commit()
    return Response(png, media_type="image/png", headers={"Cache-Control": "private, no-store"})


@router.post("/review/{job_id}/approve", response_class=HTMLResponse)
async def approve(
    request: Request,
    job: OwnedJob,
    ctx: ClinicianContext,
    caption: Annotated[str, Form(max_length=2000)],
    alt_text: Annotated[str, Form(max_length=1000)],
    csrf_token: Annotated[str, Form(max_length=100)],
) -> Response:
    _require(ctx, "DocumentReference", "create", "Write-back is not allowed for this launch")
    async with workflow_errors(ctx.db), ctx.fhir() as fhir:
        result = await approve_and_write_back(
            ctx.workflow(), fhir, Approval(job_id=job.job_id, caption=caption, alt_text=alt_text)
        )
    return ctx.services.templates.TemplateResponse(
        request,
        "approved.html",
        {
            "job_id": job.job_id,
            "fhir_document_id": result.fhir_document_id,
            "already_written": result.already_written,
            "included_image": result.included_image,
            "notes": result.notes,
            "replaced_document_id": result.replaced_document_id,
            "superseded": result.superseded,
        },
    )


@router.post("/documents/{job_id}/regenerate")
async def regenerate(
    job_id: str,
    ctx: ClinicianContext,
    csrf_token: Annotated[str, Form(max_length=100)],
    style: Annotated[str, Form(max_length=40)] = "",
    language: Annotated[str, Form(max_length=5)] = "",
    depiction: Annotated[str, Form(max_length=40)] = "varied",
) -> Response:
    """A new version of a saved picture; approving it replaces the old document in the chart."""
    choice = RegenerationChoice(
        previous_job_id=job_id,
        style=checked_style(ctx.services.prompts, style) if style else None,
        language=checked_language(language) if language else None,
        depiction=checked_depiction(depiction),
    )
    ctx.patient_id()
    async with workflow_errors(ctx.db), ctx.fhir() as fhir:
        new_job_id = await start_regeneration(ctx.workflow(), fhir, choice)
    await ctx.db.commit()
    return RedirectResponse(f"/jobs/{new_job_id}", status_code=303)


@router.post("/documents/{job_id}/retract", response_class=HTMLResponse)
async def retract(
    request: Request,
    job_id: str,
    ctx: ClinicianContext,
    csrf_token: Annotated[str, Form(max_length=100)],
) -> Response:
    """Withdraw a saved picture: the EHR's DocumentReference becomes entered-in-error."""
    _require(ctx, "DocumentReference", "update", "Withdrawing is not allowed for this launch")
    ctx.patient_id()
    async with workflow_errors(ctx.db), ctx.fhir() as fhir:
        result = await retract_document(ctx.workflow(), fhir, job_id)
    return ctx.services.templates.TemplateResponse(
        request,
        "approved.html",
        {
            "job_id": job_id,
            "fhir_document_id": result.fhir_document_id,
            "retracted": True,
            "already_retracted": result.already_retracted,
        },
    )
