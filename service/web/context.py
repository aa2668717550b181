"""Request-scoped contexts as `Annotated` dependencies: who is asking, their database session, EHR and audit.

    ClinicianContext   an EHR launch (clinician pages and the API); CSRF checked on unsafe methods
    PortalContext      a patient's portal launch
    RequestContext     what both share: services, db, the web session, request id, FHIR, audit, scopes

A route takes one context, parses its own input, calls one workflow and renders. Domain code gets a
`WorkflowContext` (service.workflows.context) from `ctx.workflow()`, never a FastAPI object.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Request
from sqlalchemy.ext.asyncio import AsyncSession

from fhir_adapters import FhirClient, GrantedScopes
from fhir_adapters.scopes import Interaction
from service.audit import AuditAction, AuditOutcome
from service.fhir_access import open_fhir
from service.logging import bind_ehr
from service.services import Services
from service.sessions import SessionKind, WebSession
from service.settings import EhrSettings
from service.web.errors import AppError, ErrorCode, session_ended
from service.web.security import UNSAFE_METHODS, cookie_name
from service.web.workflow_errors import app_error_for
from service.workflows.context import WorkflowContext
from service.workflows.errors import WorkflowError
from service.workflows.jobs import JobProgress, owned_progress

CSRF_HEADER = "x-csrf-token"
CSRF_FIELD = "csrf_token"
SESSION_ENDED_MESSAGE = "Please open CareCanvas again from the patient's chart in your EHR."
# A patient has no EHR chart: their way back is the portal.
PORTAL_SESSION_ENDED_MESSAGE = (
    "You were signed out, to keep your record safe. To see your pictures again, open them from your "
    "patient portal."
)


def get_services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


ServicesDep = Annotated[Services, Depends(get_services)]


async def get_db(services: ServicesDep) -> AsyncIterator[AsyncSession]:
    async with services.sessionmaker() as db:
        yield db


DbDep = Annotated[AsyncSession, Depends(get_db)]


def request_id(request: Request) -> str | None:
    return getattr(request.state, "request_id", None)


RequestIdDep = Annotated[str | None, Depends(request_id)]


@dataclass
class RequestContext:
    """One request of one signed-in session."""

    services: Services
    db: AsyncSession
    session: WebSession
    request_id: str | None

    @property
    def ehr(self) -> EhrSettings:
        return self.services.ehrs.by_name(self.session.ehr_name)

    @property
    def scopes(self) -> GrantedScopes:
        return self.session.data.scopes

    @property
    def csrf_token(self) -> str:
        return self.session.csrf_token

    @property
    def fhir_user(self) -> str | None:
        return self.session.data.fhir_user

    def patient_id(self) -> str:
        """The launch's patient; every clinician and portal action needs one."""
        patient = self.session.patient_id
        if not patient:
            raise AppError(
                400,
                "No patient in context",
                "Open CareCanvas from a patient's chart.",
                code=ErrorCode.NO_PATIENT,
            )
        return patient

    def allows(self, resource_type: str, interaction: Interaction) -> bool:
        return self.scopes.allows(resource_type, interaction)

    def fhir(self) -> FhirClient:
        """A FHIR client for this session at its EHR, over the EHR's shared pool (tokens refreshed, saved)."""
        services = self.services
        return open_fhir(
            session=self.session,
            store=services.sessions,
            sessionmaker=services.sessionmaker,
            registration=services.ehrs.registration(self.ehr),
            smart_http=services.connections.smart(self.session.ehr_name),
            fhir_http=None if services.fhir_transport else services.connections.fhir(self.session.ehr_name),
            transport=services.fhir_transport,
            capabilities=services.profiles.capabilities(self.session.ehr_name),
        )

    async def owned_job(self, job_id: str) -> JobProgress:
        """This session's job (a 404 for anyone else's), resolved before any page, answer or stream starts."""
        try:
            return await owned_progress(
                self.services.queue, session_id_hash=self.session.id_hash, job_id=job_id
            )
        except WorkflowError as error:
            raise app_error_for(error) from error

    def workflow(self) -> WorkflowContext:
        return WorkflowContext(
            services=self.services,
            db=self.db,
            ehr=self.ehr,
            actor=self.session.data.fhir_user,
            patient_id=self.session.patient_id,
            encounter_id=self.session.data.encounter,
            session_id_hash=self.session.id_hash,
            request_id=self.request_id,
            scopes=self.scopes,
            role=self.session.data.role,
            actor_display=self.session.data.user_display,
            patient_display=(self.session.data.banner or {}).get("display_name"),
        )

    async def audit(
        self,
        action: AuditAction,
        outcome: AuditOutcome = AuditOutcome.SUCCESS,
        *,
        resource: str | None = None,
        detail: Mapping[str, Any] | None = None,
        patient: str | None = None,
    ) -> None:
        """An audit record for this session's user and EHR, in this request's transaction (fail closed)."""
        await self.workflow().audit(action, outcome, resource=resource, detail=detail, patient=patient)


async def _load_session(request: Request, services: Services) -> WebSession | None:
    # A read session: on SQLite it neither takes nor waits for the writer lock, so a burst of requests does
    # not queue behind the worker's writes just to learn who is asking. An expired or unreadable row that
    # load() marks for deletion is left to the expiry sweep (this session never commits).
    async with services.read_sessions()() as db:
        return await services.sessions.load(db, request.cookies.get(cookie_name(services.settings)))


async def error_page_extras(request: Request, services: Services) -> dict[str, Any]:
    """On an error page of a signed-in clinician: the patient banner and the way back to the workspace."""
    try:
        session = await _load_session(request, services)
    except Exception:  # an error page must render even when the database is what failed
        return {}
    if session is None or not session.authenticated or session.data.kind is not SessionKind.EHR:
        return {}
    return {"banner": session.data.banner, "encounter": session.data.visit, "back_url": "/app"}


async def _csrf_candidate(request: Request) -> str | None:
    header = request.headers.get(CSRF_HEADER)
    if header is not None:
        return header
    if request.headers.get("content-type", "").startswith(
        ("application/x-www-form-urlencoded", "multipart/form-data")
    ):
        form = await request.form()  # parsed once; Starlette caches it for the route's Form fields
        value = form.get(CSRF_FIELD)
        return value if isinstance(value, str) else None
    return None


async def check_csrf(request: Request, session: WebSession) -> None:
    """Unsafe methods carry the session's CSRF token (form field or X-CSRF-Token header)."""
    if request.method not in UNSAFE_METHODS:
        return
    if not session.csrf_matches(await _csrf_candidate(request)):
        raise AppError(
            403,
            "This form has expired",
            "Please go back, reload the page and try again.",
            code=ErrorCode.CSRF_FAILED,
        )


async def _context(
    request: Request, services: Services, db: AsyncSession, rid: str | None, kind: SessionKind
) -> RequestContext:
    session = await _load_session(request, services)
    if session is None or not session.authenticated:
        raise session_ended(
            PORTAL_SESSION_ENDED_MESSAGE if kind is SessionKind.PORTAL else SESSION_ENDED_MESSAGE
        )
    if session.data.kind is not kind:
        raise _wrong_kind(kind)
    await check_csrf(request, session)
    bind_ehr(session.ehr_name)
    return RequestContext(services=services, db=db, session=session, request_id=rid)


def _wrong_kind(wanted: SessionKind) -> AppError:
    if wanted is SessionKind.PORTAL:
        return AppError(
            403,
            "This page is for patients",
            "The patient portal needs a sign-in through the portal (standalone launch).",
            code=ErrorCode.WRONG_SESSION_KIND,
        )
    return AppError(
        403,
        "This page is for clinicians",
        "You signed in through the patient portal. Your pictures are on the portal page.",
        code=ErrorCode.WRONG_SESSION_KIND,
    )


async def clinician_context(
    request: Request, services: ServicesDep, db: DbDep, rid: RequestIdDep
) -> RequestContext:
    return await _context(request, services, db, rid, SessionKind.EHR)


async def portal_context(
    request: Request, services: ServicesDep, db: DbDep, rid: RequestIdDep
) -> RequestContext:
    return await _context(request, services, db, rid, SessionKind.PORTAL)


async def any_launch_context(
    request: Request, services: ServicesDep, db: DbDep, rid: RequestIdDep
) -> RequestContext:
    """A clinician's or a patient's session: for what both may do (sign out)."""
    session = await _load_session(request, services)
    if session is None or not session.authenticated or session.data.kind is SessionKind.STAFF:
        raise session_ended(SESSION_ENDED_MESSAGE)
    await check_csrf(request, session)
    bind_ehr(session.ehr_name)
    return RequestContext(services=services, db=db, session=session, request_id=rid)


ClinicianContext = Annotated[RequestContext, Depends(clinician_context)]
LaunchContext = Annotated[RequestContext, Depends(any_launch_context)]
PortalContext = Annotated[RequestContext, Depends(portal_context)]
