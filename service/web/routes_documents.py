"""Chart documents after approval: open/print, give to patient, new version, withdraw; and draft discard."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from service.pdf_pages import PdfPageError, page_count, page_png
from service.web.choices import checked_depiction, checked_language, checked_style
from service.web.chrome import clinician_chrome
from service.web.context import ClinicianContext
from service.web.errors import AppError, ErrorCode
from service.web.routes_review import require
from service.web.workflow_errors import workflow_errors
from service.workflows.approve import practitioner_id_from
from service.workflows.drafts import discard_draft
from service.workflows.handout import give_to_patient, read_saved_handout, saved_picture
from service.workflows.regenerate import RegenerationChoice, start_regeneration
from service.workflows.retract import (
    WITHDRAW_REASON_LABELS,
    Withdrawal,
    WithdrawReason,
    retract_document,
    withdrawal_preview,
)

router = APIRouter()
_NO_STORE = {"Cache-Control": "private, no-store"}


@router.get("/documents/{job_id}/handout", response_class=HTMLResponse)
async def print_page(request: Request, job_id: str, ctx: ClinicianContext) -> Response:
    """The saved handout as the chart holds it, page by page, ready to print."""
    ctx.patient_id()
    async with workflow_errors(ctx.db), ctx.fhir() as fhir:
        saved = await read_saved_handout(ctx.workflow(), fhir, job_id)
    try:
        pages = await asyncio.to_thread(page_count, saved.pdf)
    except PdfPageError:
        pages = 0
    return ctx.services.templates.TemplateResponse(
        request,
        "handout_print.html",
        {
            **clinician_chrome(ctx),
            "job_id": job_id,
            "pages": pages,
            "content": saved.document.content,
            "fhir_document_id": saved.fhir_document_id,
        },
    )


@router.get("/documents/{job_id}/handout.pdf")
async def handout_pdf(job_id: str, ctx: ClinicianContext) -> Response:
    ctx.patient_id()
    async with workflow_errors(ctx.db), ctx.fhir() as fhir:
        saved = await read_saved_handout(ctx.workflow(), fhir, job_id)
    return Response(
        saved.pdf,
        media_type="application/pdf",
        headers={**_NO_STORE, "Content-Disposition": 'inline; filename="handout.pdf"'},
    )


@router.get("/documents/{job_id}/handout/{page:int}.png")
async def handout_page(job_id: str, page: int, ctx: ClinicianContext) -> Response:
    ctx.patient_id()
    async with workflow_errors(ctx.db), ctx.fhir() as fhir:
        saved = await read_saved_handout(ctx.workflow(), fhir, job_id)
    try:
        png = await asyncio.to_thread(page_png, saved.pdf, page)  # rasterised off the event loop
    except PdfPageError:
        raise AppError(404, "No such page", "The handout has no page with that number.") from None
    return Response(png, media_type="image/png", headers=_NO_STORE)


@router.get("/documents/{job_id}/thumbnail")
async def thumbnail(job_id: str, ctx: ClinicianContext) -> Response:
    ctx.patient_id()
    async with workflow_errors(ctx.db):
        png = await saved_picture(ctx.workflow(), job_id)
    await ctx.db.commit()
    return Response(png, media_type="image/png", headers=_NO_STORE)


@router.post("/documents/{job_id}/give", response_class=HTMLResponse)
async def give(
    request: Request,
    job_id: str,
    ctx: ClinicianContext,
    csrf_token: Annotated[str, Form(max_length=100)],
) -> Response:
    """Record that the patient was given the handout (a Communication, where the EHR takes one)."""
    ctx.patient_id()
    async with workflow_errors(ctx.db), ctx.fhir() as fhir:
        result = await give_to_patient(
            ctx.workflow(), fhir, job_id, practitioner_id=practitioner_id_from(ctx.fhir_user)
        )
    return ctx.services.templates.TemplateResponse(
        request, "given.html", {**clinician_chrome(ctx), "job_id": job_id, "result": result}
    )


@router.post("/documents/{job_id}/regenerate")
async def regenerate(
    job_id: str,
    ctx: ClinicianContext,
    csrf_token: Annotated[str, Form(max_length=100)],
    style: Annotated[str, Form(max_length=40)] = "",
    language: Annotated[str, Form(max_length=16)] = "",
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


@router.get("/documents/{job_id}/withdraw", response_class=HTMLResponse)
async def withdraw_page(request: Request, job_id: str, ctx: ClinicianContext) -> Response:
    """Ask before withdrawing: a coded reason, and whether to make the replaced version current again."""
    require(ctx, "DocumentReference", "update", "Withdrawing is not allowed for this launch")
    ctx.patient_id()
    async with workflow_errors(ctx.db):
        preview = await withdrawal_preview(ctx.workflow(), job_id)
    await ctx.db.commit()
    return ctx.services.templates.TemplateResponse(
        request,
        "withdraw.html",
        {**clinician_chrome(ctx), "preview": preview, "reasons": WITHDRAW_REASON_LABELS},
    )


def _checked_reason(value: str) -> WithdrawReason:
    try:
        return WithdrawReason(value)
    except ValueError:
        raise AppError(
            400,
            "Choose a reason",
            "Withdrawing needs one of the reasons on the page. Nothing was changed.",
            code=ErrorCode.INVALID_INPUT,
        ) from None


@router.post("/documents/{job_id}/retract", response_class=HTMLResponse)
async def retract(
    request: Request,
    job_id: str,
    ctx: ClinicianContext,
    csrf_token: Annotated[str, Form(max_length=100)],
    reason: Annotated[str, Form(max_length=40)] = "",
    restore_previous: Annotated[str, Form(max_length=5)] = "",
) -> Response:
    """Withdraw a saved picture: the EHR's DocumentReference becomes entered-in-error, with its reason."""
    require(ctx, "DocumentReference", "update", "Withdrawing is not allowed for this launch")
    withdrawal = Withdrawal(
        job_id=job_id, reason=_checked_reason(reason), restore_previous=restore_previous == "yes"
    )
    ctx.patient_id()
    async with workflow_errors(ctx.db), ctx.fhir() as fhir:
        result = await retract_document(ctx.workflow(), fhir, withdrawal)
    return ctx.services.templates.TemplateResponse(
        request,
        "approved.html",
        {
            **clinician_chrome(ctx),
            "job_id": job_id,
            "fhir_document_id": result.fhir_document_id,
            "retracted": True,
            "already_retracted": result.already_retracted,
            "withdrawal": result,
        },
    )


@router.post("/drafts/{job_id}/discard")
async def discard(
    job_id: str,
    ctx: ClinicianContext,
    csrf_token: Annotated[str, Form(max_length=100)],
) -> Response:
    """Throw away a draft never approved; back to the workspace."""
    ctx.patient_id()
    async with workflow_errors(ctx.db):
        await discard_draft(ctx.workflow(), job_id)
    await ctx.db.commit()
    return RedirectResponse("/app?discarded=1", status_code=303)
