"""The compliance console: staff sign-in (OIDC), audit search, drill-downs, reports, exports, verify.

Thin routes: each parses its input, calls one workflow (service.workflows.compliance, service.staff_auth)
and renders a page under templates/web/compliance/. Filters that may name a patient travel in POST bodies
and are kept server-side under an opaque id (post/redirect/get), so no patient reference enters a URL.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from typing import Annotated, Any

import structlog
from fastapi import APIRouter, Form, Path, Query, Request
from fastapi.responses import RedirectResponse, Response

from service.audit import AuditAction, AuditOutcome
from service.audit.reports import ReportKind
from service.audit.search import AuditQueryError, SortOrder
from service.services import Services
from service.web.context import DbDep, RequestIdDep, ServicesDep
from service.web.errors import AppError, ErrorCode
from service.web.staff_context import (
    CONSOLE_CSP,
    StaffContext,
    StaffRequest,
    clear_staff_cookie,
    console_settings,
    load_staff_session,
    set_staff_cookie,
    start_staff_sign_in,
)
from service.workflows import compliance
from service.workflows.compliance import ExportFormat, SavedQuery, SavedView

log = structlog.get_logger("carecanvas.compliance")
router = APIRouter(prefix="/compliance")

_QUERY_ID = Path(pattern=r"^[A-Za-z0-9_-]{8,32}$")
_REQUEST_ID = Path(pattern=r"^[A-Za-z0-9_.:-]{1,128}$")
FilterField = Annotated[str | None, Form(max_length=300)]


def render(
    services: Services, request: Request, template: str, context: dict[str, Any], *, status: int = 200
) -> Response:
    """A console page: never framed, never cached."""
    response: Response = services.templates.TemplateResponse(
        request, f"compliance/{template}", context, status_code=status
    )
    response.headers["Content-Security-Policy"] = CONSOLE_CSP
    return response


def page(
    ctx: StaffRequest, request: Request, template: str, context: dict[str, Any], *, status: int = 200
) -> Response:
    """A page for a signed-in officer (navigation, sign-out form with the CSRF token)."""
    base = {"identity": ctx.identity, "csrf_token": ctx.csrf_token, "actions": [a.value for a in AuditAction]}
    return render(ctx.services, request, template, {**base, **context}, status=status)


# ---- sign-in and sign-out ----------------------------------------------------------------------------


@router.get("/login")
async def login(services: ServicesDep, db: DbDep) -> Response:
    return await start_staff_sign_in(services, db, return_to="/compliance")


@router.get("/callback")
async def callback(
    request: Request,
    services: ServicesDep,
    db: DbDep,
    rid: RequestIdDep,
    code: Annotated[str | None, Query(max_length=4000)] = None,
    state: Annotated[str | None, Query(max_length=500)] = None,
    error: Annotated[str | None, Query(max_length=200)] = None,
) -> Response:
    oidc = console_settings(services)
    session = await load_staff_session(request, services)
    outcome = await compliance.finish_sign_in(
        services,
        db,
        session,
        oidc,
        compliance.SignInCallback(code=code, state=state, error=error),
        request_id=rid,
    )
    if outcome.cookie_value is not None:
        # outcome.return_to is one of staff_auth.RETURN_TARGETS (a fixed path), never from the request.
        response: Response = RedirectResponse(outcome.return_to, status_code=303)
        response.headers["Referrer-Policy"] = "no-referrer"
        set_staff_cookie(response, services.settings, outcome.cookie_value)
        return response
    if outcome.denied is not None:
        context = {"who": outcome.denied.display, "role": oidc.compliance_role, "claim": oidc.role_claim}
        if outcome.return_to == "/reviewer":
            context |= {"place": "the portrait review queue", "role": " or ".join(oidc.reviewer_roles)}
        response = render(services, request, "denied.html", context, status=403)
    else:
        response = render(services, request, "sign_in_failed.html", {"message": outcome.message}, status=400)
    clear_staff_cookie(response, services.settings)
    return response


@router.post("/logout")
async def logout(request: Request, ctx: StaffContext) -> Response:
    await compliance.record_sign_in(
        ctx.services,
        ctx.db,
        action=AuditAction.LOGOUT,
        outcome=AuditOutcome.SUCCESS,
        actor=ctx.identity.actor,
        request_id=ctx.request_id,
        detail={},
    )
    await ctx.services.sessions.end(ctx.db, ctx.session)
    await ctx.db.commit()
    response = render(ctx.services, request, "signed_out.html", {})
    clear_staff_cookie(response, ctx.services.settings)
    return response


# ---- search and drill-downs --------------------------------------------------------------------------


def _saved(ctx: StaffRequest, query_id: str, view: SavedView) -> SavedQuery:
    saved = ctx.staff.queries.get(query_id)
    if saved is None or saved.view is not view:
        raise AppError(
            404,
            "This search is no longer available",
            "Searches are kept for your signed-in session only. Please search again.",
            code=ErrorCode.NOT_FOUND,
        )
    return saved


async def _search_page(
    ctx: StaffRequest,
    request: Request,
    saved: SavedQuery,
    *,
    query_id: str | None,
    order: SortOrder,
    offset: int,
) -> Response:
    try:
        query = saved.audit_query(order=order, offset=offset)
    except AuditQueryError as problem:
        raise AppError(400, "This search cannot be shown", str(problem)) from None
    result = await compliance.search(ctx.console(), query)
    await ctx.db.commit()
    context = {"result": result, "filters": saved.filters, "query_id": query_id, "order": order.value}
    return page(ctx, request, "search.html", context)


@router.get("")
async def console_home(request: Request, ctx: StaffContext) -> Response:
    """The newest records, unfiltered, with the search form."""
    return await _search_page(
        ctx, request, SavedQuery(SavedView.SEARCH, {}), query_id=None, order=SortOrder.NEWEST, offset=0
    )


@router.post("/search")
async def submit_search(
    request: Request,
    ctx: StaffContext,
    patient: FilterField = None,
    actor: FilterField = None,
    action: FilterField = None,
    outcome: FilterField = None,
    ehr: FilterField = None,
    since: FilterField = None,
    until: FilterField = None,
    request_id: FilterField = None,
    view: Annotated[SavedView, Form()] = SavedView.SEARCH,
) -> Response:
    form = {
        "patient": patient,
        "actor": actor,
        "action": action,
        "outcome": outcome,
        "ehr": ehr,
        "since": since,
        "until": until,
        "request_id": request_id,
    }
    try:
        saved = compliance.saved_query(view, form)
    except AuditQueryError as problem:
        shown = {key: value for key, value in form.items() if value}
        return page(
            ctx,
            request,
            "search.html",
            {"result": None, "filters": shown, "problem": str(problem)},
            status=400,
        )
    query_id = ctx.staff.remember(saved)
    await ctx.save()
    await ctx.db.commit()
    return RedirectResponse(f"/compliance/{saved.view.value}/{query_id}", status_code=303)


@router.get("/search/{query_id}")
async def search_results(
    request: Request,
    ctx: StaffContext,
    query_id: Annotated[str, _QUERY_ID],
    order: SortOrder = SortOrder.NEWEST,
    offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
) -> Response:
    saved = _saved(ctx, query_id, SavedView.SEARCH)
    return await _search_page(ctx, request, saved, query_id=query_id, order=order, offset=offset)


@router.get("/search/{query_id}/export.{fmt}")
async def export(
    ctx: StaffContext, query_id: Annotated[str, _QUERY_ID], fmt: Annotated[ExportFormat, Path()]
) -> Response:
    saved = _saved(ctx, query_id, SavedView.SEARCH)
    try:
        query = saved.audit_query()
    except AuditQueryError as problem:
        raise AppError(400, "This search cannot be exported", str(problem)) from None
    file = await compliance.export(ctx.console(), query, fmt)
    await ctx.db.commit()
    disposition = f'attachment; filename="{file.filename}"'
    headers = {"Content-Disposition": disposition, "Content-Security-Policy": CONSOLE_CSP}
    return Response(file.body, media_type=file.media_type, headers=headers)


@router.get("/user/{query_id}")
async def user_drilldown(
    request: Request, ctx: StaffContext, query_id: Annotated[str, _QUERY_ID]
) -> Response:
    saved = _saved(ctx, query_id, SavedView.USER)
    drill = await compliance.user_drilldown(ctx.console(), saved.audit_query())
    await ctx.db.commit()
    return page(ctx, request, "user.html", {"drill": drill, "filters": saved.filters})


@router.get("/patient/{query_id}")
async def patient_drilldown(
    request: Request, ctx: StaffContext, query_id: Annotated[str, _QUERY_ID]
) -> Response:
    saved = _saved(ctx, query_id, SavedView.PATIENT)
    drill = await compliance.patient_drilldown(ctx.console(), saved.audit_query())
    await ctx.db.commit()
    return page(ctx, request, "patient.html", {"drill": drill, "filters": saved.filters})


@router.get("/timeline/{request_id}")
async def timeline(request: Request, ctx: StaffContext, request_id: Annotated[str, _REQUEST_ID]) -> Response:
    shown = await compliance.timeline(ctx.console(), request_id)
    await ctx.db.commit()
    return page(ctx, request, "timeline.html", {"timeline": shown})


@router.get("/session/{launch_seq}")
async def launch_session(
    request: Request, ctx: StaffContext, launch_seq: Annotated[int, Path(ge=1, le=2**62)]
) -> Response:
    try:
        shown = await compliance.launch_session_timeline(ctx.console(), launch_seq)
    except AuditQueryError as problem:
        raise AppError(404, "No such session", f"{problem}.", code=ErrorCode.NOT_FOUND) from None
    await ctx.db.commit()
    return page(ctx, request, "timeline.html", {"timeline": shown})


# ---- reports ---------------------------------------------------------------------------------------


@router.get("/reports")
async def reports(request: Request, ctx: StaffContext) -> Response:
    return page(ctx, request, "reports.html", {"rules": compliance.report_rules(ctx.services)})


def _day_start(day: date, services: Services) -> datetime:
    return datetime.combine(day, time(0), tzinfo=compliance.report_settings(services).zone).astimezone(UTC)


@router.get("/reports/{kind}")
async def report(
    request: Request,
    ctx: StaffContext,
    kind: ReportKind,
    since: Annotated[date | None, Query()] = None,
    until: Annotated[date | None, Query()] = None,
) -> Response:
    today = datetime.now(compliance.report_settings(ctx.services).zone).date()
    first = since or today - timedelta(days=7)
    last = until or today
    try:
        result = await compliance.report(
            ctx.console(),
            kind,
            since=_day_start(first, ctx.services),
            until=_day_start(last + timedelta(days=1), ctx.services),
        )
    except AuditQueryError as problem:
        raise AppError(400, "This report cannot be run", str(problem)) from None
    await ctx.db.commit()
    context = {"result": result, "since": first.isoformat(), "until": last.isoformat(), "kind": kind.value}
    return page(ctx, request, "report.html", context)


# ---- integrity -------------------------------------------------------------------------------------


@router.get("/integrity")
async def integrity(request: Request, ctx: StaffContext) -> Response:
    status = await compliance.integrity_status(ctx.console())
    return page(ctx, request, "integrity.html", {"status": status, "verified": None})


@router.post("/integrity/verify")
async def verify_now(request: Request, ctx: StaffContext) -> Response:
    verified = await compliance.verify_now(ctx.console())
    await ctx.db.commit()
    status = await compliance.integrity_status(ctx.console())
    return page(ctx, request, "integrity.html", {"status": status, "verified": verified})
