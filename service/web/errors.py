"""Readable error pages: what went wrong and what to do, never a stack trace or patient data."""

from __future__ import annotations

import html

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, Response

from fhir_adapters import FhirError, ForbiddenError, TemporaryFhirError
from service.fhir_access import SessionExpiredError


class PageError(Exception):
    """Raised by routes and dependencies; rendered as templates/web/error.html with the given status."""

    def __init__(self, status: int, title: str, message: str) -> None:
        super().__init__(title)
        self.status = status
        self.title = title
        self.message = message


def fhir_failure_page(error: FhirError) -> PageError:
    """Say plainly what the EHR answered; the OperationOutcome text is the EHR's own and safe to show."""
    if isinstance(error, ForbiddenError):
        return PageError(
            403, "The EHR did not allow this", "Your launch does not give CareCanvas access to that."
        )
    if isinstance(error, TemporaryFhirError):
        return PageError(
            503, "The EHR is not answering right now", "Please try again in a minute. Nothing was changed."
        )
    return PageError(502, "The EHR answered with an error", error.diagnostics or "The EHR gave no reason.")


def install_error_pages(app: FastAPI) -> None:
    """PageError, an ended EHR session and any EHR error a route did not handle itself become pages."""

    @app.exception_handler(SessionExpiredError)
    async def _session_expired(request: Request, error: SessionExpiredError) -> Response:
        return await _page_error(request, PageError(401, "Your CareCanvas session has ended", str(error)))

    @app.exception_handler(FhirError)
    async def _fhir_error(request: Request, error: FhirError) -> Response:
        return await _page_error(request, fhir_failure_page(error))

    @app.exception_handler(PageError)
    async def _page_error(request: Request, error: PageError) -> Response:
        services = getattr(request.app.state, "services", None)
        if services is None:
            page = f"<h1>{html.escape(error.title)}</h1><p>{html.escape(error.message)}</p>"
            return HTMLResponse(page, status_code=error.status)
        return services.templates.TemplateResponse(
            request,
            "error.html",
            {"title": error.title, "message": error.message, "status": error.status},
            status_code=error.status,
        )
