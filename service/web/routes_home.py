"""The front door: `/` leads to a page saying what CareCanvas is and where each user opens it; a favicon."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response

from service.web.context import ServicesDep

router = APIRouter()

_FAVICON = Path(__file__).resolve().parent / "static" / "favicon.ico"


@router.get("/", include_in_schema=False)
async def home() -> Response:
    # Nobody should land on a bare 404: CareCanvas is opened from an EHR, a portal or the console.
    return RedirectResponse("/welcome", status_code=303)


@router.get("/welcome", response_class=HTMLResponse, include_in_schema=False)
async def welcome(request: Request, services: ServicesDep) -> Response:
    settings = services.settings
    portal_ehrs = [ehr.name for ehr in services.ehrs.all() if ehr.portal_scopes]
    response: Response = services.templates.TemplateResponse(
        request,
        "welcome.html",
        {
            "demo_ehr_url": settings.demo_ehr_url,
            "console": settings.staff_oidc is not None,
            # Portrait reviewers who sign in as staff (the queue also opens from an EHR launch).
            "reviewer_sign_in": settings.staff_oidc is not None and bool(settings.staff_oidc.reviewer_roles),
            "portal_ehrs": portal_ehrs,
        },
    )
    return response


@router.get("/favicon.ico", include_in_schema=False)
async def favicon() -> Response:
    return FileResponse(
        _FAVICON, media_type="image/x-icon", headers={"Cache-Control": "public, max-age=86400"}
    )
