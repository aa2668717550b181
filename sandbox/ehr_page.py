"""The sandbox EHR page: pick a patient and a practitioner, launch CareCanvas inside an iframe."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlencode

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.templating import Jinja2Templates

from sandbox.auth.oauth import SmartAuthorizationServer

TEMPLATES = Jinja2Templates(directory=str(Path(__file__).resolve().parent / "templates"))


def app_launch_src(*, app_launch_url: str, fhir_base: str, launch_id: str) -> str:
    """The iframe src an EHR uses for a SMART EHR launch: `{launch URL}?iss=…&launch=…`."""
    separator = "&" if "?" in app_launch_url else "?"
    return f"{app_launch_url}{separator}{urlencode({'iss': fhir_base, 'launch': launch_id})}"


def ehr_routes(server: SmartAuthorizationServer) -> list[Route]:
    """GET /ehr shows the chart picker; POST /ehr/launch creates a launch and shows the app in an iframe."""

    def render(
        request: Request, *, status: int = 200, extra: dict[str, str | None] | None = None
    ) -> Response:
        directory = server.directory
        context = {
            "patients": directory.patients,
            "practitioners": directory.practitioners,
            "portal_url": server.config.portal_url,
            "launch_action": f"{server.config.issuer}/ehr/launch",
            "selected_patient": None,
            "selected_practitioner": directory.practitioners[0].id if directory.practitioners else None,
            "app_src": None,
            "message": None,
            **(extra or {}),
        }
        return TEMPLATES.TemplateResponse(request, "ehr.html", context, status_code=status)

    async def show(request: Request) -> Response:
        return render(request)

    async def launch(request: Request) -> Response:
        form = await request.form()
        patient_id = str(form.get("patient") or "")
        practitioner_id = str(form.get("practitioner") or "")
        selection: dict[str, str | None] = {
            "selected_patient": patient_id,
            "selected_practitioner": practitioner_id,
        }
        try:
            launch_id = server.create_launch(patient_id=patient_id, practitioner_id=practitioner_id)
        except ValueError:
            message = "Choose one listed patient and one practitioner."
            return render(request, status=400, extra={**selection, "message": message})
        app_launch_url = server.config.app_launch_url
        if not app_launch_url:
            message = "CareCanvas is not registered with this EHR yet (no launch URL)."
            return render(request, status=409, extra={**selection, "message": message})
        fhir_base = server.config.fhir_base
        src = app_launch_src(app_launch_url=app_launch_url, fhir_base=fhir_base, launch_id=launch_id)
        return render(request, extra={**selection, "app_src": src})

    return [Route("/ehr", show, methods=["GET"]), Route("/ehr/launch", launch, methods=["POST"])]
