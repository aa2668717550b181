"""Portraits: the patient's story from the EHR, style and depiction chosen by the reviewer, N variants."""

from __future__ import annotations

import re
from typing import Annotated

from fastapi import APIRouter, Form, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from service.generation.prompts import Depiction
from service.web.choices import LANGUAGES, checked_language, checked_portrait_style
from service.web.context import ClinicianContext
from service.web.errors import AppError, ErrorCode
from service.web.workflow_errors import workflow_errors
from service.workflows.jobs import owned_progress
from service.workflows.portrait import (
    MAX_VARIANTS,
    PortraitChoice,
    read_story_audited,
    start_portraits_from_story,
)

router = APIRouter()

JOB_ID = re.compile(r"[0-9a-f\-]{36}")
DEFAULT_VARIANTS = 4


@router.get("/portraits", response_class=HTMLResponse)
async def portrait_page(request: Request, ctx: ClinicianContext) -> Response:
    ctx.patient_id()
    async with workflow_errors(ctx.db), ctx.fhir() as fhir:
        story = await read_story_audited(ctx.workflow(), fhir)
    await ctx.db.commit()
    services = ctx.services
    return services.templates.TemplateResponse(
        request,
        "portrait.html",
        {
            "story": story.story if story else None,
            "styles": services.prompts.portrait_styles,
            "languages": LANGUAGES,
            "depiction_options": Depiction.ALLOWED,
            "max_variants": MAX_VARIANTS,
            "default_variants": DEFAULT_VARIANTS,
            "csrf_token": ctx.csrf_token,
            "model": services.models.get(services.settings.default_model),
        },
    )


def checked_portrait_choice(
    ctx: ClinicianContext, *, style: str, language: str, variants: int, depiction: dict[str, str]
) -> PortraitChoice:
    try:
        return PortraitChoice(
            style=checked_portrait_style(ctx.services.prompts, style),
            language=checked_language(language),
            depiction=Depiction(
                skin_tone=depiction["skin_tone"],
                age_group=depiction["age_group"],
                body_type=depiction["body_type"],
                dress=depiction["dress"],
                setting=depiction["setting"],
                show_people=depiction["show_people"] != "no",
            ),
            variants=variants,
        )
    except ValueError as error:
        raise AppError(400, "Not a valid choice", str(error), code=ErrorCode.INVALID_INPUT) from error


@router.post("/portraits")
async def create_portraits(
    ctx: ClinicianContext,
    style: Annotated[str, Form(max_length=40)],
    language: Annotated[str, Form(max_length=5)],
    csrf_token: Annotated[str, Form(max_length=100)],
    variants: Annotated[int, Form()] = DEFAULT_VARIANTS,
    show_people: Annotated[str, Form(max_length=5)] = "yes",
    skin_tone: Annotated[str, Form(max_length=20)] = "varied",
    age_group: Annotated[str, Form(max_length=20)] = "varied",
    body_type: Annotated[str, Form(max_length=20)] = "varied",
    dress: Annotated[str, Form(max_length=20)] = "varied",
    setting: Annotated[str, Form(max_length=20)] = "varied",
) -> Response:
    depiction = {
        "show_people": show_people,
        "skin_tone": skin_tone,
        "age_group": age_group,
        "body_type": body_type,
        "dress": dress,
        "setting": setting,
    }
    choice = checked_portrait_choice(
        ctx, style=style, language=language, variants=variants, depiction=depiction
    )
    ctx.patient_id()
    async with workflow_errors(ctx.db), ctx.fhir() as fhir:
        job_ids = await start_portraits_from_story(ctx.workflow(), fhir, choice)
    await ctx.db.commit()
    return RedirectResponse(f"/portraits/variants?jobs={','.join(job_ids)}", status_code=303)


@router.get("/portraits/variants", response_class=HTMLResponse)
async def variants_page(
    request: Request,
    ctx: ClinicianContext,
    jobs: Annotated[str, Query(max_length=40 * MAX_VARIANTS)],
) -> Response:
    job_ids = [job_id for job_id in jobs.split(",") if job_id]
    if not 1 <= len(job_ids) <= MAX_VARIANTS or not all(JOB_ID.fullmatch(job_id) for job_id in job_ids):
        raise AppError(400, "Not a list of portraits", "Start again from the portrait page.")
    async with workflow_errors(ctx.db):
        progress = [
            await owned_progress(ctx.services.queue, session_id_hash=ctx.session.id_hash, job_id=job_id)
            for job_id in job_ids
        ]
    return ctx.services.templates.TemplateResponse(
        request,
        "portrait_variants.html",
        {
            "variants": [(job.job_id, job) for job in progress],
            "finished": all(job.final for job in progress),
            "jobs": ",".join(job_ids),
            "model": ctx.services.models.get(ctx.services.settings.default_model),
        },
    )
