"""Portraits: the patient's story from the EHR, style and depiction chosen by the reviewer, N variants."""

from __future__ import annotations

import re
from typing import Annotated

from fastapi import APIRouter, Form, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from fhir_adapters import FhirError
from service.audit import AuditAction
from service.generation.prompts import Depiction
from service.web.deps import (
    DbDep,
    RequestIdDep,
    ServicesDep,
    SessionStoreDep,
    WebSessionDep,
    audit_touch,
    session_fhir,
)
from service.web.errors import PageError, fhir_failure_page
from service.web.routes_jobs import owned_job_status
from service.web.routes_workspace import LANGUAGES
from service.workflows.portrait import (
    MAX_VARIANTS,
    NoStoryError,
    PatientStory,
    PortraitChoice,
    read_patient_story,
    start_portrait_variants,
)

router = APIRouter()

JOB_ID = re.compile(r"[0-9a-f\-]{36}")
DEFAULT_VARIANTS = 4


async def _read_story(
    services: ServicesDep, db: DbDep, store: SessionStoreDep, session: WebSessionDep, request_id: str | None
) -> PatientStory | None:
    """Read over FHIR first, then audit (never holding the database's write lock across an EHR call)."""
    patient_id = session.patient_id
    if not patient_id:
        raise PageError(400, "No patient in context", "Open CareCanvas from a patient's chart.")
    story: PatientStory | None = None
    outcome, status = "success", None
    try:
        async with session_fhir(services, session, store, db) as fhir:
            story = await read_patient_story(fhir=fhir, patient_id=patient_id)
    except NoStoryError:
        story = None
    except FhirError as error:
        outcome, status = "failure", error.status
        await db.rollback()
        await _audit_story_read(services, db, session, request_id, outcome=outcome, detail={"status": status})
        raise fhir_failure_page(error) from error
    await _audit_story_read(
        services, db, session, request_id, outcome=outcome, detail={"found": story is not None}
    )
    return story


async def _audit_story_read(
    services: ServicesDep,
    db: DbDep,
    session: WebSessionDep,
    request_id: str | None,
    *,
    outcome: str,
    detail: dict[str, object],
) -> None:
    await audit_touch(
        services,
        db,
        session,
        action=AuditAction.FHIR_SEARCH,
        outcome=outcome,
        patient=session.patient_id,
        resource="QuestionnaireResponse",
        request_id=request_id,
        detail=detail,
    )
    await db.commit()


@router.get("/portraits", response_class=HTMLResponse)
async def portrait_page(
    request: Request,
    services: ServicesDep,
    db: DbDep,
    store: SessionStoreDep,
    session: WebSessionDep,
    request_id: RequestIdDep,
) -> Response:
    story = await _read_story(services, db, store, session, request_id)
    return services.templates.TemplateResponse(
        request,
        "portrait.html",
        {
            "story": story.story if story else None,
            "styles": services.prompts.styles,
            "languages": LANGUAGES,
            "depiction_options": Depiction.ALLOWED,
            "max_variants": MAX_VARIANTS,
            "default_variants": DEFAULT_VARIANTS,
            "csrf_token": session.csrf_token,
            "model": services.models.get(services.settings.default_model),
        },
    )


@router.post("/portraits")
async def create_portraits(
    services: ServicesDep,
    db: DbDep,
    store: SessionStoreDep,
    session: WebSessionDep,
    request_id: RequestIdDep,
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
    if not session.csrf_matches(csrf_token):
        raise PageError(403, "This form has expired", "Please go back, reload the page and try again.")
    if language not in LANGUAGES:
        raise PageError(400, "Unknown language", f"Choose one of: {', '.join(LANGUAGES.values())}.")
    if style not in {preset.name for preset in services.prompts.styles}:
        raise PageError(400, "Unknown style", "Choose one of the styles offered on the page.")
    try:
        choice = PortraitChoice(
            style=style,
            language=language,
            depiction=Depiction(
                skin_tone=skin_tone,
                age_group=age_group,
                body_type=body_type,
                dress=dress,
                setting=setting,
                show_people=show_people != "no",
            ),
            variants=variants,
        )
    except ValueError as error:
        raise PageError(400, "Not a valid choice", str(error)) from error
    # The story is read again from the EHR: the form never carries the patient's words.
    story = await _read_story(services, db, store, session, request_id)
    if story is None:
        raise PageError(404, "No portrait story", "This patient has no completed portrait story yet.")
    patient_id = session.patient_id
    assert patient_id is not None  # noqa: S101 - _read_story refuses sessions without a patient
    job_ids = await start_portrait_variants(
        db=db,
        queue=services.queue,
        audit=services.audit,
        keyring=services.keyring,
        library=services.prompts,
        model=services.models.get(services.settings.default_model),
        story=story,
        choice=choice,
        patient_id=patient_id,
        encounter_id=session.data.get("encounter"),
        actor=session.data.get("fhir_user"),
        ehr_name=session.ehr_name,
        session_id_hash=session.id_hash,
        request_id=request_id,
    )
    await db.commit()
    return RedirectResponse(f"/portraits/variants?jobs={','.join(job_ids)}", status_code=303)


@router.get("/portraits/variants", response_class=HTMLResponse)
async def variants_page(
    request: Request,
    services: ServicesDep,
    session: WebSessionDep,
    jobs: Annotated[str, Query(max_length=40 * MAX_VARIANTS)],
) -> Response:
    job_ids = [job_id for job_id in jobs.split(",") if job_id]
    if not 1 <= len(job_ids) <= MAX_VARIANTS or not all(JOB_ID.fullmatch(job_id) for job_id in job_ids):
        raise PageError(400, "Not a list of portraits", "Start again from the portrait page.")
    statuses = [(job_id, await owned_job_status(services, session, job_id)) for job_id in job_ids]
    finished = all(
        status["status"] in {"succeeded", "failed", "cancelled", "quarantined"} for _, status in statuses
    )
    return services.templates.TemplateResponse(
        request,
        "portrait_variants.html",
        {
            "variants": statuses,
            "finished": finished,
            "jobs": ",".join(job_ids),
            "model": services.models.get(services.settings.default_model),
        },
    )
