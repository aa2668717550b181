"""Portraits: the patient's story (or the intake that gathers it), the likeness rule, variants, review."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Form, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.sse import EventSourceResponse

from service.documents import load_document
from service.generation.portrait_words import PORTRAIT_LANGUAGES
from service.generation.prompts import Depiction
from service.web.choices import (
    LANGUAGES,
    checked_portrait_language,
    checked_portrait_style,
)
from service.web.context import ClinicianContext
from service.web.errors import AppError, ErrorCode
from service.web.routes_review import checked_above_target, written_page
from service.web.workflow_errors import workflow_errors
from service.workflows.approve import ABOVE_TARGET_LABELS, write_back_reviewed_portrait
from service.workflows.intake import LIST_FIELDS, IntakeError, StoryIntake, write_story
from service.workflows.jobs import follow_many, owned_progress
from service.workflows.portrait import (
    MAX_VARIANTS,
    LikenessConsent,
    PortraitChoice,
    more_like_this,
    read_story_audited,
    start_portraits_from_story,
)
from service.workflows.review import GradedCaption
from service.workflows.reviewer import (
    notes_for,
    patient_draft,
    patient_draft_image,
    patient_reviews,
    review_item,
    send_for_review,
)

router = APIRouter()

JOB_ID = re.compile(r"[0-9a-f\-]{36}")
DEFAULT_VARIANTS = 4
MORE_VARIATIONS = 3
# "" (the field left out): as the patient's story says.
SHOW_PEOPLE: dict[str, bool | None] = {"yes": True, "no": False, "": None}


def _check_job_id(job_id: str) -> None:
    """A job id from the URL that is not one of ours is a 404 (nothing is looked up for it)."""
    if not JOB_ID.fullmatch(job_id):
        raise AppError(404, "No such portrait", "Start again from the portrait page.")


def _banner(ctx: ClinicianContext) -> Any:
    return ctx.session.data.banner


@router.get("/portraits", response_class=HTMLResponse)
async def portrait_page(request: Request, ctx: ClinicianContext) -> Response:
    ctx.patient_id()
    async with workflow_errors(ctx.db), ctx.fhir() as fhir:
        story = await read_story_audited(ctx.workflow(), fhir)
    async with workflow_errors(ctx.db):
        # This patient's drafts with the reviewers, from the database: seen in any session.
        reviews = await patient_reviews(ctx.workflow())
    await ctx.db.commit()
    services = ctx.services
    return services.templates.TemplateResponse(
        request,
        "portrait.html",
        {
            "story": story.story if story else None,
            "likeness": story.likeness.value if story else None,
            "people_allowed": story.people_allowed if story else False,
            "LikenessConsent": LikenessConsent,
            "styles": services.prompts.portrait_styles,
            "languages": {code: LANGUAGES[code] for code in PORTRAIT_LANGUAGES},
            "depiction_options": {k: v for k, v in Depiction.ALLOWED.items()},
            "max_variants": MAX_VARIANTS,
            "default_variants": DEFAULT_VARIANTS,
            "csrf_token": ctx.csrf_token,
            "banner": _banner(ctx),
            "can_write_story": ctx.allows("QuestionnaireResponse", "create"),
            "model": services.models.get(services.settings.default_model),
            "reviews": reviews,
        },
    )


@router.get("/portraits/drafts/{job_id}", response_class=HTMLResponse)
async def reviewed_draft_page(request: Request, job_id: str, ctx: ClinicianContext) -> Response:
    """One of this patient's portrait drafts with the reviewers' notes, in any session of this EHR."""
    _check_job_id(job_id)
    ctx.patient_id()
    async with workflow_errors(ctx.db):
        detail = await patient_draft(ctx.workflow(), job_id)
    await ctx.db.commit()
    return ctx.services.templates.TemplateResponse(
        request,
        "portrait_draft.html",
        {
            "detail": detail,
            "banner": _banner(ctx),
            "csrf_token": ctx.csrf_token,
            "can_write": ctx.allows("DocumentReference", "create"),
            "grade": GradedCaption.of(detail.caption, detail.language),
            "above_target_reasons": ABOVE_TARGET_LABELS,
        },
    )


@router.post("/portraits/drafts/{job_id}/approve", response_class=HTMLResponse)
async def write_back_reviewed_draft(
    request: Request,
    job_id: str,
    ctx: ClinicianContext,
    csrf_token: Annotated[str, Form(max_length=100)],
    above_target_reason: Annotated[str, Form(max_length=40)] = "",
) -> Response:
    """Save a reviewer-approved portrait to the chart from any clinician launch for its patient and EHR.

    Who may write a portrait draft back (issue 13): a draft, its review page and its approval belong to
    the session that made it (`/review/{id}`; anyone else gets a 404), so work nobody has vetted is never
    opened, changed or sent to the chart by another launch. A reviewer's approval ends that: the picture
    and its words are vetted, and the patient's next visit may be with another clinician, in another
    launch. So an approved draft is written back from here by any clinician launch for the same patient at
    the same EHR, with the words the reviewer approved (nothing is edited here; to change them, make a new
    version and send it again). Another patient's or another EHR's draft, and one no reviewer approved
    (waiting, sent back, never sent), is a 404 as before. The write is the approve path's own
    (`approve_and_write_back`): exactly once, audited, the Provenance naming this clinician and the reviewer.
    """
    _check_job_id(job_id)
    ctx.patient_id()
    if not ctx.allows("DocumentReference", "create"):
        raise AppError(
            403,
            "Write-back is not allowed for this launch",
            "The EHR did not grant CareCanvas permission for this. Ask your EHR team.",
            code=ErrorCode.NOT_ALLOWED,
        )
    above_target = checked_above_target(above_target_reason)
    async with workflow_errors(ctx.db), ctx.fhir() as fhir:
        result = await write_back_reviewed_portrait(ctx.workflow(), fhir, job_id, above_target=above_target)
    return written_page(request, ctx, job_id, result)


@router.get("/portraits/drafts/{job_id}/image")
async def reviewed_draft_image(job_id: str, ctx: ClinicianContext) -> Response:
    _check_job_id(job_id)
    ctx.patient_id()
    async with workflow_errors(ctx.db):
        png = await patient_draft_image(ctx.workflow(), job_id)
    await ctx.db.commit()
    return Response(png, media_type="image/png", headers={"Cache-Control": "private, no-store"})


def checked_portrait_choice(
    ctx: ClinicianContext,
    *,
    style: str,
    language: str,
    variants: int,
    depiction: dict[str, str],
    show_people: str,
    likeness_note: str,
) -> PortraitChoice:
    if show_people not in SHOW_PEOPLE:
        raise AppError(400, "Not a valid choice", "People in the picture: choose yes or no.")
    try:
        return PortraitChoice(
            style=checked_portrait_style(ctx.services.prompts, style),
            language=checked_portrait_language(language),
            depiction=Depiction(**depiction, show_people=SHOW_PEOPLE[show_people] is not False),
            variants=variants,
            people=SHOW_PEOPLE[show_people],
            likeness_note=likeness_note,
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
    show_people: Annotated[str, Form(max_length=5)] = "",
    likeness_note: Annotated[str, Form(max_length=1000)] = "",
    skin_tone: Annotated[str, Form(max_length=20)] = "varied",
    age_group: Annotated[str, Form(max_length=20)] = "varied",
    body_type: Annotated[str, Form(max_length=20)] = "varied",
    dress: Annotated[str, Form(max_length=20)] = "varied",
    setting: Annotated[str, Form(max_length=20)] = "varied",
) -> Response:
    depiction = {
        "skin_tone": skin_tone,
        "age_group": age_group,
        "body_type": body_type,
        "dress": dress,
        "setting": setting,
    }
    choice = checked_portrait_choice(
        ctx,
        style=style,
        language=language,
        variants=variants,
        depiction=depiction,
        show_people=show_people,
        likeness_note=likeness_note,
    )
    ctx.patient_id()
    async with workflow_errors(ctx.db), ctx.fhir() as fhir:
        job_ids = await start_portraits_from_story(ctx.workflow(), fhir, choice)
    await ctx.db.commit()
    return RedirectResponse(f"/portraits/variants?jobs={','.join(job_ids)}", status_code=303)


def checked_job_ids(jobs: str) -> list[str]:
    job_ids = [job_id for job_id in jobs.split(",") if job_id]
    if not 1 <= len(job_ids) <= MAX_VARIANTS or not all(JOB_ID.fullmatch(job_id) for job_id in job_ids):
        raise AppError(400, "Not a list of portraits", "Start again from the portrait page.")
    return job_ids


JobsQuery = Annotated[str, Query(max_length=40 * MAX_VARIANTS)]


@router.get("/portraits/variants", response_class=HTMLResponse)
async def variants_page(request: Request, ctx: ClinicianContext, jobs: JobsQuery) -> Response:
    job_ids = checked_job_ids(jobs)
    workflow = ctx.workflow()
    async with workflow_errors(ctx.db):
        progress = [
            await owned_progress(ctx.services.queue, session_id_hash=ctx.session.id_hash, job_id=job_id)
            for job_id in job_ids
        ]
        reviews = {job_id: await review_item(workflow, job_id) for job_id in job_ids}
        notes = {
            job_id: await notes_for(ctx.db, keyring=ctx.services.keyring, job_id=job_id) for job_id in job_ids
        }
        seeds = {job_id: await _seed(ctx, job_id) for job_id in job_ids}
    return ctx.services.templates.TemplateResponse(
        request,
        "portrait_variants.html",
        {
            "variants": [(job.job_id, job) for job in progress],
            "reviews": reviews,
            "notes": notes,
            "seeds": seeds,
            "finished": all(job.final for job in progress),
            "jobs": ",".join(job_ids),
            "csrf_token": ctx.csrf_token,
            "banner": _banner(ctx),
            "has_reviewers": bool(ctx.services.settings.portrait_reviewers),
            "more_count": MORE_VARIATIONS,
            "model": ctx.services.models.get(ctx.services.settings.default_model),
        },
    )


async def _seed(ctx: ClinicianContext, job_id: str) -> int | None:
    document = await load_document(ctx.db, keyring=ctx.services.keyring, job_id=job_id)
    return document.content.seed if document else None


@router.get("/portraits/variants/events", response_class=EventSourceResponse)
async def variants_events(ctx: ClinicianContext, jobs: JobsQuery) -> AsyncIterator[dict[str, object]]:
    """One stream for all variants (one connection, not one per variant): each change of any of them."""
    job_ids = checked_job_ids(jobs)
    queue, session = ctx.services.queue, ctx.session.id_hash
    async with workflow_errors(ctx.db):
        last = [await owned_progress(queue, session_id_hash=session, job_id=job_id) for job_id in job_ids]
    async for progress in follow_many(queue, session_id_hash=session, first=last):
        yield progress.to_dict()


@router.post("/portraits/{job_id}/more")
async def more_variations(
    job_id: str, ctx: ClinicianContext, csrf_token: Annotated[str, Form(max_length=100)]
) -> Response:
    """More like this one: variations from this variant's seed family."""
    _check_job_id(job_id)
    async with workflow_errors(ctx.db):
        job_ids = await more_like_this(ctx.workflow(), job_id=job_id, count=MORE_VARIATIONS)
    await ctx.db.commit()
    return RedirectResponse(f"/portraits/variants?jobs={','.join(job_ids)}", status_code=303)


@router.post("/portraits/{job_id}/send")
async def send_to_reviewer(
    job_id: str,
    ctx: ClinicianContext,
    csrf_token: Annotated[str, Form(max_length=100)],
    jobs: Annotated[str, Form(max_length=40 * MAX_VARIANTS)],
    note: Annotated[str, Form(max_length=1000)] = "",
) -> Response:
    """Put one finished variant in the reviewer's queue (again, after a send-back)."""
    await ctx.owned_job(job_id)
    back = ",".join(checked_job_ids(jobs))
    banner = _banner(ctx) or {}
    async with workflow_errors(ctx.db):
        await send_for_review(
            ctx.workflow(), job_id=job_id, patient_name=str(banner.get("display_name", "")), note=note
        )
    await ctx.db.commit()
    return RedirectResponse(f"/portraits/variants?jobs={back}#variant-{job_id}", status_code=303)


@router.get("/portraits/story", response_class=HTMLResponse)
async def intake_page(request: Request, ctx: ClinicianContext) -> Response:
    ctx.patient_id()
    return _intake_form(request, ctx, values={}, error=None)


def _intake_form(
    request: Request, ctx: ClinicianContext, *, values: dict[str, str], error: IntakeError | None
) -> Response:
    return ctx.services.templates.TemplateResponse(
        request,
        "portrait_story.html",
        {
            "values": values,
            "error": error,
            "csrf_token": ctx.csrf_token,
            "banner": _banner(ctx),
            "can_write_story": ctx.allows("QuestionnaireResponse", "create"),
        },
        status_code=400 if error else 200,
    )


@router.post("/portraits/story", response_class=HTMLResponse)
async def write_intake(
    request: Request,
    ctx: ClinicianContext,
    csrf_token: Annotated[str, Form(max_length=100)],
    places: Annotated[str, Form(max_length=2000)] = "",
    colours: Annotated[str, Form(max_length=2000)] = "",
    symbols: Annotated[str, Form(max_length=2000)] = "",
    avoid: Annotated[str, Form(max_length=2000)] = "",
    likeness_consent: Annotated[str, Form(max_length=5)] = "",
    story: Annotated[str, Form(max_length=4000)] = "",
) -> Response:
    """Write the story to the EHR, then go on to the portrait page, which reads it back from there."""
    ctx.patient_id()
    values = dict(
        zip(
            (*LIST_FIELDS, "likeness_consent", "story"),
            (places, colours, symbols, avoid, likeness_consent, story),
            strict=True,
        )
    )
    try:
        intake = StoryIntake.parse(values)
    except IntakeError as error:
        return _intake_form(request, ctx, values=values, error=error)
    async with workflow_errors(ctx.db), ctx.fhir() as fhir:
        await write_story(ctx.workflow(), fhir, intake)
    await ctx.db.commit()
    return RedirectResponse("/portraits?story=saved", status_code=303)
