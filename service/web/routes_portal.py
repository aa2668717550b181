"""The patient portal: standalone SMART launch (`launch/patient`) and the patient's approved pictures."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse, Response

from service.ehrs import UnregisteredIssuerError
from service.web.context import PortalContext, ServicesDep
from service.web.errors import AppError, ErrorCode
from service.web.routes_launch import not_registered, start_launch
from service.web.workflow_errors import workflow_errors
from service.workflows.portal import FHIR_ID, FileKind, list_portal_documents, read_portal_file

router = APIRouter()


@router.get("/portal/launch")
async def portal_launch(
    services: ServicesDep,
    ehr: Annotated[str | None, Query(max_length=100)] = None,
) -> Response:
    """Standalone patient launch: the EHR's sign-in page asks the patient who they are."""
    try:
        registered = services.ehrs.by_name(ehr or "")
    except UnregisteredIssuerError:
        raise not_registered() from None
    if not registered.portal_scopes:
        raise AppError(404, "No patient portal for this EHR", "Your care team has not turned the portal on.")
    return await start_launch(
        services=services,
        ehr=registered,
        registration=services.ehrs.registration(registered),
        launch=None,
        scopes=tuple(registered.portal_scopes),
        kind="portal",
    )


@router.get("/portal", response_class=HTMLResponse)
async def portal_home(request: Request, ctx: PortalContext) -> Response:
    ctx.patient_id()
    async with workflow_errors(ctx.db), ctx.fhir() as fhir:
        documents = await list_portal_documents(ctx.workflow(), fhir)
    await ctx.db.commit()
    return ctx.services.templates.TemplateResponse(
        request, "portal.html", {"documents": documents, "page_lang": "en", "csrf_token": ctx.csrf_token}
    )


@router.get("/portal/documents/{document_id}/{kind}")
async def portal_file(document_id: str, kind: str, ctx: PortalContext) -> Response:
    """The picture (PNG) or printable handout (PDF) of one of the signed-in patient's documents."""
    if kind not in {k.value for k in FileKind}:
        raise AppError(404, "No such file", "Files are the picture (png) or the handout (pdf).")
    if not FHIR_ID.fullmatch(document_id):
        raise AppError(
            404,
            "No such picture",
            "Go back to the portal page and choose a picture there.",
            code=ErrorCode.NOT_FOUND,
        )
    async with workflow_errors(ctx.db), ctx.fhir() as fhir:
        file = await read_portal_file(ctx.workflow(), fhir, document_id, FileKind(kind))
    await ctx.db.commit()
    headers = {"Cache-Control": "private, no-store"}
    if file.kind is FileKind.PDF:
        headers["Content-Disposition"] = 'inline; filename="carecanvas-handout.pdf"'
    return Response(file.content, media_type=file.kind.content_type, headers=headers)
