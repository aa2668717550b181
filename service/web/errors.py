"""Errors both faces share: a stable code, a status, a readable title and message; never a stack trace.

AppError(code, status, title, message)      raised by contexts, routes and the API
  ├── rendered as templates/web/error.html   for pages
  └── rendered as {"code", "title", "detail"} JSON (or a FHIR OperationOutcome) under /api/
FhirError (fhir_adapters.errors)            an EHR answer a route did not handle → `fhir_failure`
SessionExpiredError (service.fhir_access)   the EHR session ended → 401 `session_ended`
"""

from __future__ import annotations

import html
from collections.abc import Awaitable, Callable
from enum import StrEnum
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response

from fhir_adapters import FhirError, ForbiddenError, TemporaryFhirError
from service.fhir_access import SessionExpiredError

# (request, services) -> extra template values for an error page; services is typed Any: this module
# sits below service.services in the import graph.
PageExtras = Callable[[Request, Any], Awaitable[dict[str, Any]]]

API_PREFIX = "/api/"


class ErrorCode(StrEnum):
    """Stable reasons a caller may branch on (the message text may change; these do not)."""

    SESSION_ENDED = "session_ended"
    WRONG_SESSION_KIND = "wrong_session_kind"
    CSRF_FAILED = "csrf_failed"
    CROSS_SITE = "cross_site"
    NO_PATIENT = "no_patient"
    NOT_FOUND = "not_found"
    INVALID_INPUT = "invalid_input"
    NOT_ALLOWED = "not_allowed"
    NOT_READY = "not_ready"
    CONFLICT = "conflict"
    NOT_REGISTERED = "ehr_not_registered"
    SIGN_IN_FAILED = "sign_in_failed"
    EHR_FORBIDDEN = "ehr_forbidden"
    EHR_UNAVAILABLE = "ehr_unavailable"
    EHR_ERROR = "ehr_error"
    EHR_TOO_LARGE = "ehr_too_large"  # the EHR refuses the write-back's size: retrying never helps
    NO_ORGANIZATION = "no_organization"  # no organization for the document's custodian (US Core)
    TOO_LARGE = "request_too_large"
    UNAUTHENTICATED = "unauthenticated"
    RATE_LIMITED = "rate_limited"
    TOO_MANY_JOBS = "too_many_jobs"
    ABOVE_READING_TARGET = "above_reading_target"  # approve anyway needs one of the offered reasons
    PORTRAIT_NOT_REVIEWED = "portrait_not_reviewed"  # reviewers are on and none approved this portrait
    UNKNOWN_TOPIC = "unknown_topic"  # a topic override that names no handout topic
    TOPIC_ALREADY_MATCHED = "topic_already_matched"  # a topic override for a condition with its own topic


class AppError(Exception):
    """Raised by contexts, routes and dependencies; each face renders it its own way."""

    def __init__(self, status: int, title: str, message: str, *, code: ErrorCode | None = None) -> None:
        super().__init__(title)
        self.status = status
        self.title = title
        self.message = message
        self.code = code or _default_code(status)


# The pages' historical name for it.
PageError = AppError


def _default_code(status: int) -> ErrorCode:
    return {
        400: ErrorCode.INVALID_INPUT,
        401: ErrorCode.SESSION_ENDED,
        403: ErrorCode.NOT_ALLOWED,
        404: ErrorCode.NOT_FOUND,
        409: ErrorCode.CONFLICT,
        413: ErrorCode.TOO_LARGE,
        429: ErrorCode.RATE_LIMITED,
        502: ErrorCode.EHR_ERROR,
        503: ErrorCode.EHR_UNAVAILABLE,
    }.get(status, ErrorCode.INVALID_INPUT)


def fhir_failure(error: FhirError) -> AppError:
    """Say plainly what the EHR answered; the OperationOutcome text is the EHR's own and safe to show."""
    if isinstance(error, ForbiddenError):
        return AppError(
            403,
            "The EHR did not allow this",
            "Your launch does not give CareCanvas access to that.",
            code=ErrorCode.EHR_FORBIDDEN,
        )
    if isinstance(error, TemporaryFhirError):
        return AppError(
            503,
            "The EHR is not answering right now",
            "Please try again in a minute. Nothing was changed.",
            code=ErrorCode.EHR_UNAVAILABLE,
        )
    return AppError(
        502,
        "The EHR answered with an error",
        error.diagnostics or "The EHR gave no reason.",
        code=ErrorCode.EHR_ERROR,
    )


fhir_failure_page = fhir_failure


def session_ended(message: str) -> AppError:
    return AppError(401, "Your CareCanvas session has ended", message, code=ErrorCode.SESSION_ENDED)


def wants_fhir(request: Request) -> bool:
    return "application/fhir+json" in request.headers.get("accept", "")


def error_json(request: Request, error: AppError) -> Response:
    """The API's error body: JSON with a stable code, or an OperationOutcome where FHIR is asked for."""
    if wants_fhir(request):
        outcome = {
            "resourceType": "OperationOutcome",
            "issue": [
                {
                    "severity": "error",
                    "code": "processing",
                    "details": {"coding": [{"code": error.code.value}], "text": error.title},
                    "diagnostics": error.message,
                }
            ],
        }
        return JSONResponse(outcome, status_code=error.status, media_type="application/fhir+json")
    body = {"code": error.code.value, "title": error.title, "detail": error.message}
    return JSONResponse(body, status_code=error.status)


def _problem(item: dict[str, object]) -> str:
    location = item.get("loc") or ()
    field = ".".join(str(part) for part in list(location)[1:]) if isinstance(location, (list, tuple)) else ""
    return f"{field or 'body'}: {item.get('msg', 'invalid')}"


def install_error_pages(app: FastAPI, *, page_extras: PageExtras | None = None) -> None:
    """AppError, an ended EHR session and any EHR error a route did not handle become pages or JSON.

    ``page_extras`` adds to an error page what the signed-in user's other pages show (service.web.context
    gives a clinician's patient banner and the way back); passed in, as that module imports this one.
    """

    @app.exception_handler(SessionExpiredError)
    async def _session_expired(request: Request, error: SessionExpiredError) -> Response:
        return await _app_error(request, session_ended(str(error)))

    @app.exception_handler(FhirError)
    async def _fhir_error(request: Request, error: FhirError) -> Response:
        return await _app_error(request, fhir_failure(error))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, error: RequestValidationError) -> Response:
        # Field names and reasons only: never the submitted values (they may be patient text).
        problems = "; ".join(_problem(item) for item in error.errors()[:10])
        return await _app_error(
            request, AppError(422, "The request is not valid", problems or "invalid input")
        )

    @app.exception_handler(AppError)
    async def _app_error(request: Request, error: AppError) -> Response:
        if request.url.path.startswith(API_PREFIX):
            return error_json(request, error)
        services = getattr(request.app.state, "services", None)
        if services is None:
            page = f"<h1>{html.escape(error.title)}</h1><p>{html.escape(error.message)}</p>"
            return HTMLResponse(page, status_code=error.status)
        extras = (
            await page_extras(request, services) if page_extras is not None and error.status != 401 else {}
        )
        page_response: Response = services.templates.TemplateResponse(
            request,
            "error.html",
            {
                "title": error.title,
                "message": error.message,
                "status": error.status,
                "code": error.code,
                **extras,
            },
            status_code=error.status,
        )
        return page_response
