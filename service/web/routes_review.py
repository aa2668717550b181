"""Review and chart actions: approve and write back, make a new version of a saved picture, withdraw it."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from fhir_adapters import FhirError, GrantedScopes
from service.audit import AuditAction
from service.documents import load_document
from service.fhir_access import SessionExpiredError
from service.generation.prompts import Depiction
from service.generation.readability import caption_grade
from service.jobs import JobNotFoundError
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
from service.web.routes_workspace import (
    LANGUAGES,
    _can_update_documents,
    _can_write_back,
)
from service.workflows.approve import (
    ApprovalInProgressError,
    AttachmentOverrides,
    NotReadyError,
    WriteBackFailedError,
    approve_and_write_back,
    practitioner_id_from,
)
from service.workflows.illustrate import ConditionNotFoundError, WrongPatientError
from service.workflows.regenerate import NotReplaceableError, start_regeneration
from service.workflows.retract import retract_document

router = APIRouter()


@router.get("/review/{job_id}", response_class=HTMLResponse)
async def review_page(
    request: Request,
    job_id: str,
    services: ServicesDep,
    db: DbDep,
    session: WebSessionDep,
    request_id: RequestIdDep,
) -> Response:
    status = await owned_job_status(services, session, job_id)
    document = await load_document(db, keyring=services.keyring, job_id=job_id)
    if document is None:
        raise PageError(404, "No such illustration", "Start again from the workspace.")
    model = services.models.get(document.content["model"])
    await audit_touch(
        services,
        db,
        session,
        action=AuditAction.VIEW,
        outcome="success",
        patient=document.content["patient_id"],
        resource="DocumentDraft",
        request_id=request_id,
        detail={"job_id": job_id},
    )
    await db.commit()
    grade = caption_grade(document.content["caption"], document.content["language"])
    return services.templates.TemplateResponse(
        request,
        "review.html",
        {
            "job_id": job_id,
            "job": status,
            "banner": session.data.get("banner"),
            "document": document,
            "content": document.content,
            "caption_grade": grade,
            "caption_too_hard": grade > 6.0,
            "model": model,
            "csrf_token": session.csrf_token,
            "can_write": _can_write_back(session.data["token_set"]),
        },
    )


@router.get("/artifacts/{job_id}/{kind}")
async def artifact(
    job_id: str,
    kind: str,
    services: ServicesDep,
    db: DbDep,
    session: WebSessionDep,
    request_id: RequestIdDep,
) -> Response:
    if kind not in ("png", "preview"):
        raise PageError(404, "No such file", "Only the picture and its progress preview are served here.")
    status = await owned_job_status(services, session, job_id)
    if kind == "png" and status["status"] != "succeeded":
        raise PageError(404, "Not ready", "The image is not finished yet.")
    try:
        png = await services.queue.read_artifact(job_id, kind)
    except JobNotFoundError:
        raise PageError(404, "Not ready", "There is no preview yet.") from None
    await audit_touch(
        services,
        db,
        session,
        action=AuditAction.VIEW,
        outcome="success",
        patient=session.patient_id,
        resource="Image" if kind == "png" else "Preview",
        request_id=request_id,
        detail={"job_id": job_id},
    )
    await db.commit()
    return Response(png, media_type="image/png", headers={"Cache-Control": "private, no-store"})


@router.post("/review/{job_id}/approve", response_class=HTMLResponse)
async def approve(
    request: Request,
    job_id: str,
    services: ServicesDep,
    db: DbDep,
    store: SessionStoreDep,
    session: WebSessionDep,
    request_id: RequestIdDep,
    caption: Annotated[str, Form(max_length=2000)],
    alt_text: Annotated[str, Form(max_length=1000)],
    csrf_token: Annotated[str, Form(max_length=100)],
) -> Response:
    if not session.csrf_matches(csrf_token):
        raise PageError(403, "This form has expired", "Please reload the page and try again.")
    await owned_job_status(services, session, job_id)
    token = session.data["token_set"]
    if not _can_write_back(token):
        raise PageError(
            403,
            "Write-back is not allowed for this launch",
            "The EHR did not grant CareCanvas permission to save documents. Ask your EHR team.",
        )
    practitioner_id = practitioner_id_from(session.data.get("fhir_user"))
    if practitioner_id is None:
        raise PageError(403, "Only clinicians can approve", "Approval needs a practitioner's launch.")
    ehr = services.ehrs.by_name(session.ehr_name)
    try:
        async with session_fhir(services, session, store, db) as fhir:
            result = await approve_and_write_back(
                db=db,
                fhir=fhir,
                queue=services.queue,
                audit=services.audit,
                keyring=services.keyring,
                models=services.models,
                job_id=job_id,
                caption=caption,
                alt_text=alt_text,
                practitioner_id=practitioner_id,
                organization_id=ehr.organization_id,
                attachment_overrides=AttachmentOverrides.from_registration(ehr),
                may_update_documents=_can_update_documents(token),
                may_create_binaries=GrantedScopes.parse(str(token.get("scope", ""))).allows(
                    "Binary", "create"
                ),
                ehr_name=ehr.name,
                request_id=request_id,
                page_size=ehr.handout_page_size,
            )
    except NotReadyError as error:
        raise PageError(409, "Not ready to approve", str(error)) from error
    except ApprovalInProgressError as error:
        raise PageError(409, "Being saved right now", str(error)) from error
    except WriteBackFailedError as error:
        if error.retryable:
            raise PageError(503, "The EHR did not answer in time", str(error)) from error
        raise PageError(502, "The EHR did not accept the document", str(error)) from error
    return services.templates.TemplateResponse(
        request,
        "approved.html",
        {
            "job_id": job_id,
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
    services: ServicesDep,
    db: DbDep,
    store: SessionStoreDep,
    session: WebSessionDep,
    request_id: RequestIdDep,
    csrf_token: Annotated[str, Form(max_length=100)],
    style: Annotated[str, Form(max_length=40)] = "",
    language: Annotated[str, Form(max_length=5)] = "",
    depiction: Annotated[str, Form(max_length=40)] = "varied",
) -> Response:
    """A new version of a saved picture; approving it replaces the old document in the chart."""
    if not session.csrf_matches(csrf_token):
        raise PageError(403, "This form has expired", "Please go back, reload the page and try again.")
    if language and language not in LANGUAGES:
        raise PageError(400, "Unknown language", f"Choose one of: {', '.join(LANGUAGES.values())}.")
    if style and style not in {preset.name for preset in services.prompts.styles}:
        raise PageError(400, "Unknown style", "Choose one of the styles offered on the page.")
    try:
        chosen_depiction = Depiction.from_choice(depiction)
    except ValueError as error:
        raise PageError(400, "Unknown depiction", str(error)) from error
    patient_id = session.patient_id
    if not patient_id:
        raise PageError(400, "No patient in context", "Open CareCanvas from a patient's chart.")
    ehr = services.ehrs.by_name(session.ehr_name)
    try:
        async with session_fhir(services, session, store, db) as fhir:
            new_job_id = await start_regeneration(
                db=db,
                fhir=fhir,
                queue=services.queue,
                audit=services.audit,
                keyring=services.keyring,
                library=services.prompts,
                model=services.models.get(services.settings.default_model),
                previous_job_id=job_id,
                style=style or None,
                language=language or None,
                depiction=chosen_depiction,
                patient_id=patient_id,
                encounter_id=session.data.get("encounter"),
                actor=session.data.get("fhir_user"),
                ehr_name=ehr.name,
                session_id_hash=session.id_hash,
                request_id=request_id,
            )
    except NotReplaceableError as error:
        await db.rollback()
        raise PageError(404, "No such saved picture", str(error)) from error
    except (ConditionNotFoundError, WrongPatientError) as error:
        await db.rollback()
        raise PageError(404, "Condition not found", str(error)) from error
    except SessionExpiredError as error:
        await db.rollback()
        raise PageError(401, "Your CareCanvas session has ended", str(error)) from error
    except FhirError as error:
        await db.rollback()
        raise fhir_failure_page(error) from error
    await db.commit()
    return RedirectResponse(f"/jobs/{new_job_id}", status_code=303)


@router.post("/documents/{job_id}/retract", response_class=HTMLResponse)
async def retract(
    request: Request,
    job_id: str,
    services: ServicesDep,
    db: DbDep,
    store: SessionStoreDep,
    session: WebSessionDep,
    request_id: RequestIdDep,
    csrf_token: Annotated[str, Form(max_length=100)],
) -> Response:
    """Withdraw a saved picture: the EHR's DocumentReference becomes entered-in-error."""
    if not session.csrf_matches(csrf_token):
        raise PageError(403, "This form has expired", "Please go back, reload the page and try again.")
    token = session.data["token_set"]
    if not _can_update_documents(token):
        raise PageError(
            403,
            "Withdrawing is not allowed for this launch",
            "The EHR did not grant CareCanvas permission to change documents. Ask your EHR team.",
        )
    if practitioner_id_from(session.data.get("fhir_user")) is None:
        raise PageError(403, "Only clinicians can withdraw", "Withdrawing needs a practitioner's launch.")
    patient_id = session.patient_id
    if not patient_id:
        raise PageError(400, "No patient in context", "Open CareCanvas from a patient's chart.")
    ehr = services.ehrs.by_name(session.ehr_name)
    try:
        async with session_fhir(services, session, store, db) as fhir:
            result = await retract_document(
                db=db,
                fhir=fhir,
                audit=services.audit,
                keyring=services.keyring,
                job_id=job_id,
                patient_id=patient_id,
                actor=session.data.get("fhir_user"),
                ehr_name=ehr.name,
                request_id=request_id,
            )
    except NotReplaceableError as error:
        await db.rollback()
        raise PageError(404, "No such saved picture", str(error)) from error
    return services.templates.TemplateResponse(
        request,
        "approved.html",
        {
            "job_id": job_id,
            "fhir_document_id": result.fhir_document_id,
            "retracted": True,
            "already_retracted": result.already_retracted,
        },
    )
