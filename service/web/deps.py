"""Annotated dependencies: the app's services, a database session, the current web session."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.ext.asyncio import AsyncSession

from service.app import Services
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


async def get_web_session(request: Request, services: ServicesDep, store: SessionStoreDep) -> WebSession:
    """The launched session, or a page asking for a new launch (never a redirect loop).

    Loaded in a short transaction of its own: on SQLite every write transaction holds the database's
    writer lock from its start, so a request must not sit on one while it waits for the queue or the EHR.
    """
    async with services.sessionmaker() as db:
        session = await store.load(db, request.cookies.get(cookie_name(services.settings)))
        await db.commit()
    if session is None or not session.authenticated:
        raise PageError(
            401,
            "Your CareCanvas session has ended",
            "Please open CareCanvas again from the patient's chart in your EHR.",
        )
    return session


WebSessionDep = Annotated[WebSession, Depends(get_web_session)]


def request_id(request: Request) -> str | None:
    return getattr(request.state, "request_id", None)


RequestIdDep = Annotated[str | None, Depends(request_id)]
