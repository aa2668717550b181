"""Annotated dependencies: the app's services, a database session, the current web session."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Annotated, Any

from fastapi import Depends, Request
from sqlalchemy.ext.asyncio import AsyncSession

from fhir_adapters import FhirClient
from service.app import Services
from service.fhir_access import open_fhir
from service.sessions import SessionStore, WebSession
from service.web.errors import PageError
from service.web.security import cookie_name


def get_services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


ServicesDep = Annotated[Services, Depends(get_services)]


async def get_db(services: ServicesDep) -> AsyncIterator[AsyncSession]:
    async with services.sessionmaker() as db:
        yield db


DbDep = Annotated[AsyncSession, Depends(get_db)]


def get_session_store(services: ServicesDep) -> SessionStore:
    return services.sessions


SessionStoreDep = Annotated[SessionStore, Depends(get_session_store)]


SESSION_ENDED = (
    "Your CareCanvas session has ended",
    "Please open CareCanvas again from the patient's chart in your EHR.",
)


async def load_launched_session(request: Request, services: Services, store: SessionStore) -> WebSession:
    """The launched session, or a 401 page asking for a new launch (never a redirect, so never a loop).

    Loaded in a short transaction of its own: on SQLite every write transaction holds the database's
    writer lock from its start, so a request must not sit on one while it waits for the queue or the EHR.
    """
    async with services.sessionmaker() as db:
        session = await store.load(db, request.cookies.get(cookie_name(services.settings)))
        await db.commit()
    if session is None or not session.authenticated:
        raise PageError(401, *SESSION_ENDED)
    return session


async def get_web_session(request: Request, services: ServicesDep, store: SessionStoreDep) -> WebSession:
    """A clinician's session from an EHR launch; portal (patient) sessions get no clinician pages."""
    session = await load_launched_session(request, services, store)
    if session.data.get("kind") == "portal":
        raise PageError(
            403,
            "This page is for clinicians",
            "You signed in through the patient portal. Your pictures are on the portal page.",
        )
    return session


WebSessionDep = Annotated[WebSession, Depends(get_web_session)]


async def get_portal_session(request: Request, services: ServicesDep, store: SessionStoreDep) -> WebSession:
    """A patient's (or related person's) session from the portal's standalone launch."""
    session = await load_launched_session(request, services, store)
    if session.data.get("kind") != "portal":
        raise PageError(
            403,
            "This page is for patients",
            "The patient portal needs a sign-in through the portal (standalone launch).",
        )
    return session


PortalSessionDep = Annotated[WebSession, Depends(get_portal_session)]


def request_id(request: Request) -> str | None:
    return getattr(request.state, "request_id", None)


RequestIdDep = Annotated[str | None, Depends(request_id)]


def session_fhir(
    services: Services, session: WebSession, store: SessionStore, db: AsyncSession
) -> FhirClient:
    """A FHIR client acting for this launched session at its EHR (tokens refreshed and saved back)."""
    return open_fhir(
        session=session,
        store=store,
        db=db,
        registration=services.ehrs.registration(services.ehrs.by_name(session.ehr_name)),
        http=services.http,
        transport=services.fhir_transport,
    )


async def audit_touch(
    services: Services,
    db: AsyncSession,
    session: WebSession,
    *,
    action: str,
    outcome: str,
    patient: str | None,
    resource: str | None,
    request_id: str | None,
    detail: Mapping[str, Any] | None,
) -> None:
    """An audit record for this session's user and EHR, in the caller's transaction (fail closed)."""
    await services.audit.append(
        db,
        action=action,
        outcome=outcome,
        actor=session.data.get("fhir_user"),
        patient=patient,
        ehr=session.ehr_name,
        resource=resource,
        request_id=request_id,
        detail=detail,
    )
