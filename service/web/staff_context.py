"""The staff console's request context (`StaffContext`) and its own cookie, apart from every SMART session.

A staff session is a `SessionKind.STAFF` row in the same server-side store, under a cookie of its own, so a
clinician's or patient's launch cookie never reaches the console and a staff cookie never reaches the
clinician pages. The console is never framed (frame-ancestors 'none') and its cookie is SameSite=Lax:
it is a top-level page, and Lax still lets the identity provider's redirect back carry it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import structlog
from fastapi import Depends, HTTPException, Request, Response
from fastapi.responses import RedirectResponse
from sqlalchemy.ext.asyncio import AsyncSession

from service.services import Services
from service.sessions import SessionData, SessionKind, WebSession
from service.settings import Settings, StaffOidcSettings
from service.staff_auth import StaffIdentity, StaffSignInError, begin_sign_in, may_use_console
from service.web.context import DbDep, RequestIdDep, ServicesDep, check_csrf
from service.web.errors import AppError, ErrorCode
from service.workflows.compliance import ConsoleContext, StaffSessionData

SECURE_STAFF_COOKIE = "__Host-carecanvas-staff"
LOOPBACK_STAFF_COOKIE = "carecanvas_staff"
LOGIN_PATH = "/compliance/login"
CALLBACK_PATH = "/compliance/callback"  # every staff sign-in comes back here, whatever it was started for
log = structlog.get_logger("carecanvas.compliance")
CONSOLE_CSP = (
    "default-src 'self'; img-src 'self'; style-src 'self'; script-src 'self'; connect-src 'self'; "
    "form-action 'self'; base-uri 'none'; object-src 'none'; frame-ancestors 'none'"
)


def staff_cookie_name(settings: Settings) -> str:
    return SECURE_STAFF_COOKIE if settings.cookies_secure else LOOPBACK_STAFF_COOKIE


def set_staff_cookie(response: Response, settings: Settings, value: str) -> None:
    """`__Host-`, Secure, HttpOnly, SameSite=Lax over HTTPS; HttpOnly, SameSite=Lax on plain-http loopback."""
    response.set_cookie(
        staff_cookie_name(settings),
        value,
        max_age=settings.session_minutes * 60,
        path="/",
        secure=settings.cookies_secure,
        httponly=True,
        samesite="lax",
    )


def clear_staff_cookie(response: Response, settings: Settings) -> None:
    response.delete_cookie(
        staff_cookie_name(settings), path="/", secure=settings.cookies_secure, httponly=True, samesite="lax"
    )


def console_settings(services: Services) -> StaffOidcSettings:
    """The staff identity provider, or a 404 page where the console is switched off."""
    oidc = services.settings.staff_oidc
    if oidc is None:
        raise AppError(
            404,
            "The compliance console is not switched on",
            "This CareCanvas has no staff identity provider configured (setting CARECANVAS_STAFF_OIDC).",
            code=ErrorCode.NOT_FOUND,
        )
    return oidc


async def start_staff_sign_in(services: Services, db: AsyncSession, *, return_to: str) -> Response:
    """Off to the staff identity provider; the callback goes on to `return_to` (a fixed path, checked)."""
    oidc = console_settings(services)
    try:
        started = await begin_sign_in(
            oidc,
            http=services.http,
            redirect_uri=f"{services.settings.public_url}{CALLBACK_PATH}",
            return_to=return_to,
        )
    except StaffSignInError as failure:
        log.warning("staff identity provider unusable", reason=failure.reason.value)
        raise AppError(
            502,
            "The staff sign-in is not available",
            f"{failure} Please tell your CareCanvas administrator.",
            code=ErrorCode.SIGN_IN_FAILED,
        ) from None
    data = SessionData(kind=SessionKind.STAFF, pending=started.pending.to_dict())
    cookie_value, _ = await services.sessions.create(db, ehr_name=oidc.name, data=data)
    await db.commit()
    response = RedirectResponse(started.authorize_url, status_code=302)
    set_staff_cookie(response, services.settings, cookie_value)
    return response


async def load_staff_session(request: Request, services: Services) -> WebSession | None:
    """The staff session named by the staff cookie, if it is one (a short transaction of its own)."""
    async with services.sessionmaker() as db:
        session = await services.sessions.load(db, request.cookies.get(staff_cookie_name(services.settings)))
        await db.commit()
    if session is None or session.data.kind is not SessionKind.STAFF:
        return None
    return session


@dataclass
class StaffRequest:
    """One request of a signed-in compliance officer."""

    services: Services
    db: AsyncSession
    session: WebSession
    staff: StaffSessionData
    request_id: str | None

    @property
    def identity(self) -> StaffIdentity:
        return self.staff.identity

    @property
    def csrf_token(self) -> str:
        return self.session.csrf_token

    def console(self) -> ConsoleContext:
        return ConsoleContext(
            services=self.services, db=self.db, identity=self.identity, request_id=self.request_id
        )

    async def save(self) -> None:
        """Write the staff data (saved queries) back into the session, in this request's transaction."""
        self.session.data.staff = self.staff.to_dict()
        await self.services.sessions.save(self.db, self.session)


def _not_signed_in(request: Request) -> Exception:
    if request.method == "GET":
        # A page visit goes to the sign-in; nothing of the console is shown first.
        return HTTPException(status_code=303, headers={"Location": LOGIN_PATH, "Cache-Control": "no-store"})
    return AppError(
        401,
        "Please sign in to the compliance console",
        "Your staff session has ended or you are not signed in. Sign in again at /compliance/login.",
        code=ErrorCode.UNAUTHENTICATED,
    )


async def staff_context(
    request: Request, services: ServicesDep, db: DbDep, rid: RequestIdDep
) -> StaffRequest:
    oidc = console_settings(services)
    session = await load_staff_session(request, services)
    if session is None or session.data.staff is None:
        raise _not_signed_in(request)
    try:
        staff = StaffSessionData.from_dict(session.data.staff)
    except (KeyError, ValueError, TypeError):
        raise _not_signed_in(request) from None
    # Checked on every request too: a role taken away in the settings applies at once.
    if not may_use_console(staff.identity, oidc):
        raise AppError(
            403,
            "You do not have the compliance role",
            f"Your account has no '{oidc.compliance_role}' role, so the compliance console is closed to you.",
            code=ErrorCode.NOT_ALLOWED,
        )
    await check_csrf(request, session)
    return StaffRequest(services=services, db=db, session=session, staff=staff, request_id=rid)


StaffContext = Annotated[StaffRequest, Depends(staff_context)]
