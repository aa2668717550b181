"""SMART launch: `/launch` (the launch URL an EHR registers), `/callback` (the redirect URI), `/style.css`."""

from __future__ import annotations

import re
from typing import Annotated

import structlog
from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from fhir_adapters import DiscoveryError, DiscoveryProblem, EhrRegistration, FhirError, SmartError
from service.audit import AuditAction
from service.ehrs import UnregisteredIssuerError
from service.services import Services
from service.sessions import PendingLaunchTooLargeError, SessionKind
from service.settings import EhrSettings
from service.web.context import DbDep, LaunchContext, RequestIdDep, ServicesDep
from service.web.errors import PageError
from service.web.security import clear_session_cookie, cookie_name, set_session_cookie
from service.workflows.launch import (
    PENDING_MAX_AGE,
    CallbackAnswer,
    LaunchKind,
    LaunchStateError,
    LaunchUserError,
    StartedLaunch,
    begin_launch,
    finish_launch,
    spend_pending,
    style_css,
)

log = structlog.get_logger("carecanvas.launch")
router = APIRouter()

# OAuth error codes are short ASCII words (RFC 6749 §4.1.2.1); anything else is not shown verbatim.
_OAUTH_ERROR_CODE = re.compile(r"[a-z_]{1,64}")
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f\u200b-\u200f\u202a-\u202e\u2066-\u2069]")
_MAX_DESCRIPTION = 300


def not_registered() -> PageError:
    return PageError(
        400,
        "This EHR is not registered",
        "CareCanvas was opened from an EHR it does not know. Ask your EHR team to register CareCanvas "
        "(see docs/integrating.md); nothing was contacted.",
    )


def discovery_failure_page(error: SmartError | FhirError | PendingLaunchTooLargeError) -> PageError:
    """Readable, without echoing what the EHR sent (it may be hostile); decided on the problem code."""
    problem = error.problem if isinstance(error, DiscoveryError) else DiscoveryProblem.UNREADABLE
    if problem is DiscoveryProblem.ORIGIN_NOT_ALLOWED:
        reason = (
            "Its SMART configuration names a sign-in server that is not one of the addresses registered "
            "for this EHR, so CareCanvas did not send anyone there."
        )
    elif problem is DiscoveryProblem.NO_PKCE:
        reason = "Its SMART configuration does not offer PKCE (S256), which CareCanvas requires."
    else:
        reason = "Its SMART configuration could not be read or trusted."
    return PageError(
        502,
        "The EHR's sign-in settings could not be used",
        f"{reason} Please tell your EHR integration team.",
    )


async def start_launch(
    *,
    services: Services,
    ehr: EhrSettings,
    registration: EhrRegistration,
    launch: str | None,
    scopes: tuple[str, ...],
    kind: LaunchKind,
) -> Response:
    """Discovery, then the redirect with the pending launch sealed into the cookie: no database row."""
    try:
        started: StartedLaunch = await begin_launch(
            registration=registration,
            ehr_name=ehr.name,
            launch=launch,
            http=services.connections.smart(ehr.name),
            scopes=scopes,
            kind=kind,
        )
        cookie_value = services.sessions.seal_pending(started.launch)
    except (SmartError, FhirError, PendingLaunchTooLargeError) as error:
        log.warning("smart discovery refused", ehr=ehr.name, error_type=type(error).__name__)
        raise discovery_failure_page(error) from error
    response = RedirectResponse(started.authorize_url, status_code=302)
    set_session_cookie(
        response, services.settings, cookie_value, max_age=int(PENDING_MAX_AGE.total_seconds())
    )
    return response


@router.get("/launch")
async def launch(
    services: ServicesDep,
    iss: Annotated[str | None, Query(max_length=2000)] = None,
    launch: Annotated[str | None, Query(max_length=2000)] = None,
) -> Response:
    try:
        ehr = services.ehrs.by_iss(iss)
    except UnregisteredIssuerError:
        # No outbound request at all for an unknown iss: it could point anywhere (SSRF).
        raise not_registered() from None
    if not launch:
        raise PageError(400, "Missing launch context", "Open CareCanvas from a patient's chart in your EHR.")
    return await start_launch(
        services=services,
        ehr=ehr,
        registration=services.ehrs.registration(ehr),
        launch=launch,
        scopes=tuple(ehr.scopes),
        kind="ehr",
    )


def _readable_oauth_error(error: str, description: str | None) -> str:
    code = error if _OAUTH_ERROR_CODE.fullmatch(error) else "an unknown error"
    text = _UNPRINTABLE.sub("", description or "").strip()[:_MAX_DESCRIPTION]
    return f"{text} ({code})" if text else code


@router.get("/callback")
async def callback(
    request: Request,
    services: ServicesDep,
    db: DbDep,
    request_id: RequestIdDep,
    code: Annotated[str | None, Query(max_length=4000)] = None,
    state: Annotated[str | None, Query(max_length=500)] = None,
    error: Annotated[str | None, Query(max_length=200)] = None,
    error_description: Annotated[str | None, Query(max_length=2000)] = None,
) -> Response:
    pending = services.sessions.open_pending(request.cookies.get(cookie_name(services.settings)))
    if pending is None:
        raise PageError(400, "Sign-in could not be completed", "Please launch CareCanvas again from the EHR.")
    if error:
        await spend_pending(services, pending)  # the EHR refused: this launch is over
        raise PageError(
            400,
            "The EHR did not allow the sign-in",
            f"The EHR answered: {_readable_oauth_error(error, error_description)}. "
            "Please launch CareCanvas again or ask your EHR team.",
        )
    try:
        finished = await finish_launch(
            services,
            db,
            CallbackAnswer(launch=pending, code=code, state=state),
            request_id=request_id,
        )
    except LaunchStateError as failure:
        raise PageError(400, "Sign-in could not be completed", str(failure)) from failure
    except LaunchUserError as refused:
        raise PageError(403, "CareCanvas cannot be used with this sign-in", str(refused)) from refused
    except SmartError as failure:
        log.warning("token exchange refused", ehr=pending.ehr_name, error_type=type(failure).__name__)
        raise PageError(
            400,
            "Sign-in could not be completed",
            "The EHR's answer to the sign-in could not be verified, so CareCanvas did not use it. "
            "Please launch CareCanvas again; if this keeps happening, tell your EHR integration team.",
        ) from failure
    # 303 to a clean URL: the code leaves the address bar, and no-referrer keeps it out of later requests.
    target = "/portal" if finished.kind is SessionKind.PORTAL else "/app"
    response = RedirectResponse(target, status_code=303)
    response.headers["Referrer-Policy"] = "no-referrer"
    set_session_cookie(response, services.settings, finished.cookie_value)
    return response


@router.get("/style.css")
async def session_style(request: Request, services: ServicesDep) -> Response:
    """The EHR's smart_style_url values for this session as CSS custom properties (CSP: style-src 'self')."""
    async with services.sessionmaker() as db:
        session = await services.sessions.load(db, request.cookies.get(cookie_name(services.settings)))
        await db.commit()
    css = style_css(session.data.style if session is not None else {})
    return Response(css, media_type="text/css", headers={"Cache-Control": "private, no-store"})


@router.post("/logout", response_class=HTMLResponse)
async def logout(request: Request, ctx: LaunchContext) -> Response:
    """End the server-side session (its tokens go with it) and forget the cookie; audited."""
    await ctx.audit(AuditAction.LOGOUT, detail={"kind": ctx.session.data.kind.value})
    await ctx.services.sessions.end(ctx.db, ctx.session)
    await ctx.db.commit()
    response = ctx.services.templates.TemplateResponse(request, "signed_out.html", {})
    clear_session_cookie(response, ctx.services.settings)
    response.headers["Cache-Control"] = "no-store"
    return response
