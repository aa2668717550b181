"""The portrait reviewer's pages: the queue across patients, one draft with its notes, send back, approve.

A reviewer is either a SMART launch whose fhirUser is on `portrait_reviewers`, or a staff sign-in (OIDC,
`/reviewer/login`) whose roles claim holds one of `staff_oidc.reviewer_roles`. Both are checked again on
every request, so a role taken away applies at once. A staff reviewer works at every registered EHR; their
pages are top-level (never framed) and use the staff session's own cookie and CSRF token.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Form, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from sqlalchemy.ext.asyncio import AsyncSession

from fhir_adapters import GrantedScopes
from service.audit import AuditAction, AuditOutcome
from service.logging import bind_ehr
from service.services import Services
from service.sessions import SessionKind, WebSession
from service.staff_auth import StaffIdentity, reviewer_role_of
from service.web.context import (
    SESSION_ENDED_MESSAGE,
    DbDep,
    RequestContext,
    RequestIdDep,
    ServicesDep,
    check_csrf,
)
from service.web.errors import AppError, ErrorCode, session_ended
from service.web.security import cookie_name
from service.web.staff_context import (
    CONSOLE_CSP,
    clear_staff_cookie,
    load_staff_session,
    start_staff_sign_in,
)
from service.web.workflow_errors import workflow_errors
from service.workflows import compliance
from service.workflows.context import WorkflowContext
from service.workflows.reviewer import (
    NoteKind,
    QueueItem,
    Reviewer,
    ReviewStatus,
    decide,
    draft_ehr,
    review_detail,
    review_image,
    review_queue,
    reviewer_for,
)

router = APIRouter()
REVIEWER_LOGIN_PATH = "/reviewer/login"
NOT_A_REVIEWER = "You are not a portrait reviewer"


@dataclass
class ReviewerRequest:
    """A reviewer's request: by an EHR launch (`launch`) or by a staff sign-in (`staff_session`)."""

    services: Services
    db: AsyncSession
    reviewer: Reviewer
    csrf_token: str
    request_id: str | None
    launch: RequestContext | None = None
    staff_session: WebSession | None = field(default=None, repr=False)

    @property
    def is_staff(self) -> bool:
        return self.launch is None

    def ehr_names(self) -> list[str]:
        """The EHRs whose drafts this reviewer sees: the launch's, or every registered one for staff."""
        if self.launch is not None:
            return [self.launch.ehr.name]
        return [ehr.name for ehr in self.services.ehrs.all()]

    async def ehr_of(self, job_id: str) -> str:
        """The EHR of a draft in this reviewer's queue (a 404 for one that is not in it)."""
        if self.launch is not None:
            return self.launch.ehr.name
        name = await draft_ehr(self.db, job_id)
        await self.db.commit()  # a short look; the workflow's reads come after (SQLite: one writer)
        if name is None or name not in self.ehr_names():
            raise AppError(
                404, "No such portrait in the queue", "Go back to the queue.", code=ErrorCode.NOT_FOUND
            )
        return name

    def workflow(self, ehr_name: str) -> WorkflowContext:
        """The workflow context at one EHR: the launch's own, or the staff reviewer acting at that EHR."""
        if self.launch is not None:
            return self.launch.workflow()
        assert self.staff_session is not None  # noqa: S101 - a staff request always has its session
        return WorkflowContext(
            services=self.services,
            db=self.db,
            ehr=self.services.ehrs.by_name(ehr_name),
            actor=self.reviewer.reference,
            patient_id=None,
            encounter_id=None,
            session_id_hash=self.staff_session.id_hash,
            request_id=self.request_id,
            scopes=GrantedScopes.parse(None),
            role=f"portrait reviewer ({self.reviewer.role})",
            actor_display=self.reviewer.display,
        )

    def banner(self, item: QueueItem | None = None) -> Any:
        """The patient banner: the draft's patient on a draft; on the queue, the launch's patient (if any)."""
        if item is not None:
            return {"display_name": item.patient_name or item.patient_id}
        return self.launch.session.data.banner if self.launch is not None else None

    def page(self, request: Request, template: str, context: dict[str, Any]) -> Response:
        base = {"reviewer": self.reviewer, "csrf_token": self.csrf_token, "staff": self.is_staff}
        response: Response = self.services.templates.TemplateResponse(request, template, {**base, **context})
        return self.secured(response)

    def secured(self, response: Response) -> Response:
        if self.is_staff:
            response.headers["Content-Security-Policy"] = CONSOLE_CSP  # a staff page is never framed
        return response


async def _launch_session(request: Request, services: Services) -> WebSession | None:
    async with services.read_sessions()() as db:
        session = await services.sessions.load(db, request.cookies.get(cookie_name(services.settings)))
    if session is None or not session.authenticated or session.data.kind is not SessionKind.EHR:
        return None
    return session


def _staff_reviewer(
    services: Services, session: WebSession | None
) -> tuple[StaffIdentity | None, str | None]:
    """Who a staff session is and the reviewer role their roles give now (None: not a reviewer)."""
    oidc = services.settings.staff_oidc
    if oidc is None or session is None or session.data.staff is None:
        return None, None
    try:
        identity = compliance.StaffSessionData.from_dict(session.data.staff).identity
    except (KeyError, ValueError, TypeError):
        return None, None
    return identity, reviewer_role_of(identity, oidc)


def _staff_sign_in_on(services: Services) -> bool:
    oidc = services.settings.staff_oidc
    return oidc is not None and bool(oidc.reviewer_roles)


async def reviewer_context(
    request: Request, services: ServicesDep, db: DbDep, rid: RequestIdDep
) -> ReviewerRequest:
    """A launch whose fhirUser is on the reviewer list, or a staff session holding a reviewer role."""
    launch = await _launch_session(request, services)
    if launch is not None:
        reviewer = reviewer_for(services.settings, launch.data.fhir_user)
        if reviewer is not None:
            await check_csrf(request, launch)
            bind_ehr(launch.ehr_name)
            ctx = RequestContext(services=services, db=db, session=launch, request_id=rid)
            display = launch.data.user_display
            return ReviewerRequest(
                services=services,
                db=db,
                reviewer=Reviewer(reference=reviewer.reference, role=reviewer.role, display=display),
                csrf_token=launch.csrf_token,
                request_id=rid,
                launch=ctx,
            )
    staff = await load_staff_session(request, services) if services.settings.staff_oidc else None
    identity, role = _staff_reviewer(services, staff)
    if staff is not None and identity is not None and role is not None:
        await check_csrf(request, staff)
        return ReviewerRequest(
            services=services,
            db=db,
            reviewer=Reviewer(reference=identity.actor, role=role, display=identity.display),
            csrf_token=staff.csrf_token,
            request_id=rid,
            staff_session=staff,
        )
    if identity is not None:
        raise AppError(
            403,
            NOT_A_REVIEWER,
            f"You signed in as {identity.display}, but your account has none of the portrait reviewer "
            "roles. Ask your organisation's identity administrator if you should review portraits.",
            code=ErrorCode.NOT_ALLOWED,
        )
    if launch is not None:
        raise AppError(
            403,
            NOT_A_REVIEWER,
            "Only the artists and clinicians on the reviewer list can open the review queue.",
            code=ErrorCode.NOT_ALLOWED,
        )
    if request.method == "GET" and _staff_sign_in_on(services):
        # No session at all: a page visit goes to the staff sign-in, which comes back to the queue.
        raise HTTPException(
            status_code=303, headers={"Location": REVIEWER_LOGIN_PATH, "Cache-Control": "no-store"}
        )
    raise session_ended(SESSION_ENDED_MESSAGE)


ReviewerContext = Annotated[ReviewerRequest, Depends(reviewer_context)]
FILTERS = {"all": None, **{status.value: status for status in ReviewStatus}}


@router.get("/reviewer/login")
async def reviewer_login(services: ServicesDep, db: DbDep) -> Response:
    """Staff sign-in for reviewers: off to the identity provider, then back to the queue (a fixed path)."""
    if not _staff_sign_in_on(services):
        raise AppError(
            404,
            "Staff sign-in for reviewers is not switched on",
            "Open the review queue from the EHR instead, or ask your CareCanvas administrator.",
            code=ErrorCode.NOT_FOUND,
        )
    return await start_staff_sign_in(services, db, return_to="/reviewer")


@router.post("/reviewer/logout")
async def reviewer_logout(request: Request, rc: ReviewerContext) -> Response:
    """Sign a staff reviewer out (a launch reviewer's session ends with the EHR's)."""
    if rc.staff_session is None:
        raise AppError(400, "Nothing to sign out of", "Close CareCanvas in your EHR to end this session.")
    await compliance.record_sign_in(
        rc.services,
        rc.db,
        action=AuditAction.LOGOUT,
        outcome=AuditOutcome.SUCCESS,
        actor=rc.reviewer.reference,
        request_id=rc.request_id,
        detail={"page": "reviewer"},
    )
    await rc.services.sessions.end(rc.db, rc.staff_session)
    await rc.db.commit()
    response = rc.page(request, "reviewer_signed_out.html", {})
    clear_staff_cookie(response, rc.services.settings)
    return response


@router.get("/reviewer", response_class=HTMLResponse)
async def queue_page(
    request: Request, rc: ReviewerContext, show: Annotated[str, Query(max_length=16)] = "waiting"
) -> Response:
    if show not in FILTERS:
        raise AppError(400, "Not a queue filter", "Choose waiting, sent back, approved or all.")
    items: list[QueueItem] = []
    async with workflow_errors(rc.db):
        for ehr_name in rc.ehr_names():
            items += await review_queue(rc.workflow(ehr_name), rc.reviewer)
    await rc.db.commit()
    items.sort(key=lambda item: item.updated_at, reverse=True)
    wanted = FILTERS[show]
    counts = {status.value: sum(item.status is status for item in items) for status in ReviewStatus}
    return rc.page(
        request,
        "reviewer_queue.html",
        {
            "items": [item for item in items if wanted is None or item.status is wanted],
            "counts": counts,
            "total": len(items),
            "show": show,
            "banner": rc.banner(),
        },
    )


@router.get("/reviewer/{job_id}", response_class=HTMLResponse)
async def draft_page(request: Request, job_id: str, rc: ReviewerContext) -> Response:
    ctx = rc.workflow(await rc.ehr_of(job_id))
    async with workflow_errors(rc.db):
        detail = await review_detail(ctx, rc.reviewer, job_id)
    await rc.db.commit()
    return rc.page(
        request,
        "reviewer_draft.html",
        {"detail": detail, "banner": rc.banner(detail.item), "decided": request.query_params.get("done")},
    )


@router.get("/reviewer/{job_id}/image")
async def draft_image(job_id: str, rc: ReviewerContext) -> Response:
    ctx = rc.workflow(await rc.ehr_of(job_id))
    async with workflow_errors(rc.db):
        png = await review_image(ctx, rc.reviewer, job_id)
    await rc.db.commit()
    return rc.secured(Response(png, media_type="image/png", headers={"Cache-Control": "private, no-store"}))


ACTIONS = {"note": NoteKind.NOTE, "send-back": NoteKind.SEND_BACK, "approve": NoteKind.APPROVE}


@router.post("/reviewer/{job_id}/{action}")
async def reviewer_action(
    job_id: str,
    action: str,
    rc: ReviewerContext,
    csrf_token: Annotated[str, Form(max_length=100)],
    note: Annotated[str, Form(max_length=1000)] = "",
) -> Response:
    """Add a note, send back with a note, or approve; then back to the draft, which says what was done."""
    kind = ACTIONS.get(action)
    if kind is None:
        raise AppError(404, "No such action", "A reviewer can add a note, send back or approve.")
    ctx = rc.workflow(await rc.ehr_of(job_id))
    async with workflow_errors(rc.db):
        await decide(ctx, rc.reviewer, job_id=job_id, kind=kind, note=note)
    await rc.db.commit()
    return RedirectResponse(f"/reviewer/{job_id}?done={kind.value}", status_code=303)
