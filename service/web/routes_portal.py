"""The patient portal: standalone SMART launch (`launch/patient`) and the patient's approved pictures."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse, Response

from service.ehrs import UnregisteredIssuerError
from service.web.context import PortalContext, ServicesDep
from service.web.errors import AppError, ErrorCode
from service.web.routes_launch import start_launch
from service.web.workflow_errors import workflow_errors
from service.workflows.portal import FHIR_ID, FileKind, load_portal_page, read_portal_file

router = APIRouter()


@router.get("/portal/launch")
async def portal_launch(
    services: ServicesDep,
    ehr: Annotated[str | None, Query(max_length=100)] = None,
) -> Response:
    """Standalone patient launch: the EHR's sign-in page asks the patient who they are."""
    with_portal = [registered for registered in services.ehrs.all() if registered.portal_scopes]
    if ehr is None and len(with_portal) == 1:
        ehr = with_portal[0].name  # the one portal there is: no need to ask
    try:
        registered = services.ehrs.by_name(ehr or "")
    except UnregisteredIssuerError:
        raise AppError(
            404,
            "We could not find your patient portal",
            "Please open your pictures from the link in your patient portal, or ask your care team for it.",
            code=ErrorCode.NOT_FOUND,
        ) from None
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
        page = await load_portal_page(ctx.workflow(), fhir)
    await ctx.db.commit()
    return ctx.services.templates.TemplateResponse(
        request,
        "portal.html",
        {
            "page": page,
            "words": page.words,
            "page_lang": page.words.lang,
            "page_dir": page.words.direction,
            "csrf_token": ctx.csrf_token,
        },
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
    # The name says what the file is when the patient saves it (ASCII only: it is built from a slug).
    headers = {
        "Cache-Control": "private, no-store",
        "Content-Disposition": f'inline; filename="{file.filename}"',
    }
    return Response(file.content, media_type=file.kind.content_type, headers=headers)
