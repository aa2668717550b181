"""Review: see the image with its caption and alt text, edit them, approve and write back to the EHR."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, Response

from fhir_adapters import AttachmentPolicy, FhirError
from service.audit import AuditAction
from service.documents import load_document
from service.fhir_access import SessionExpiredError, open_fhir
from service.generation.readability import caption_grade
from service.web.deps import DbDep, RequestIdDep, ServicesDep, SessionStoreDep, WebSessionDep
from service.web.errors import PageError
from service.web.routes_jobs import owned_job_status
from service.web.routes_workspace import _can_write_back, fhir_failure_page
from service.workflows.approve import (
    NotReadyError,
    WriteBackFailedError,
    approve_and_write_back,
    practitioner_id_from,
)

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
    await services.audit.append(
        db,
        action=AuditAction.VIEW,
        outcome="success",
        actor=session.data.get("fhir_user"),
        patient=document.content["patient_id"],
        ehr=session.ehr_name,
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
            "document": document,
            "content": document.content,
            "caption_grade": grade,
            "caption_too_hard": grade > 6.0,
            "model": model,
            "csrf_token": session.csrf_token,
            "can_write": _can_write_back(session.data["token_set"]),
            "style_url": session.data["token_set"].get("smart_style_url"),
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
    if kind != "png":
        raise PageError(404, "No such file", "Only the PNG image is served here.")
    status = await owned_job_status(services, session, job_id)
    if status["status"] != "succeeded":
        raise PageError(404, "Not ready", "The image is not finished yet.")
    png = await services.queue.read_artifact(job_id, "png")
    await services.audit.append(
        db,
        action=AuditAction.VIEW,
        outcome="success",
        actor=session.data.get("fhir_user"),
        patient=session.patient_id,
        ehr=session.ehr_name,
        resource="Image",
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
    registration = services.ehrs.registration(ehr)
    policy = AttachmentPolicy(
        accept_images=ehr.accept_images if ehr.accept_images is not None else True,
        max_inline_bytes=ehr.max_inline_bytes,
    )
    try:
        async with open_fhir(
            session=session,
            store=store,
            db=db,
            registration=registration,
            http=services.http,
            transport=services.fhir_transport,
        ) as fhir:
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
                attachment_policy=policy,
                ehr_name=ehr.name,
                request_id=request_id,
            )
    except NotReadyError as error:
        raise PageError(409, "Not ready to approve", str(error)) from error
    except WriteBackFailedError as error:
        raise PageError(502, "The EHR did not accept the document", str(error)) from error
    except SessionExpiredError as error:
        raise PageError(401, "Your CareCanvas session has ended", str(error)) from error
    except FhirError as error:
        raise fhir_failure_page(error) from error
    return services.templates.TemplateResponse(
        request,
        "approved.html",
        {
            "job_id": job_id,
            "fhir_document_id": result.fhir_document_id,
            "already_written": result.already_written,
            "style_url": token.get("smart_style_url"),
        },
    )
