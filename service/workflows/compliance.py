"""The compliance console's workflows: search, drill-downs, timelines, reports, exports and verify, audited.

Every search, view and export an officer makes appends its own audit record (``audit_access``) in the same
transaction; the searched patient is that record's patient, so a patient's history shows who looked them
up. Patient names are looked up per request from the banners CareCanvas keeps encrypted in live sessions;
nothing builds a plaintext index of names.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any
from zoneinfo import ZoneInfo

import structlog
from sqlalchemy.ext.asyncio import AsyncSession

from service.audit import AuditAction, AuditEntry, AuditOutcome, VerifyResult
from service.audit.reports import Report, ReportKind, ReportSettings, report_rule, run_report
from service.audit.search import (
    AuditPage,
    AuditQuery,
    AuditQueryError,
    PatientTouch,
    SortOrder,
    UserTouch,
    audit_access,
    canonical_patient,
    entries_to_balp_bundle,
    entries_to_balp_ndjson,
    entries_to_csv,
    export_entries,
    launch_timeline,
    parse_time,
    patients_touched_by,
    search_audit,
    session_timeline,
    users_who_touched,
)
from service.services import Services
from service.sessions import SessionData, SessionKind, SessionStore, WebSession
from service.settings import StaffOidcSettings
from service.staff_auth import (
    SignInFailure,
    StaffIdentity,
    StaffSignInError,
    check_pending,
    complete_sign_in,
    may_sign_in,
)

PAGE_SIZE = 50
UTC_ZONE = ZoneInfo("UTC")
MAX_SAVED_QUERIES = 50
# The filters an officer may set, as AuditQuery field names.
FILTER_NAMES = ("patient", "actor", "action", "outcome", "ehr", "since", "until", "request_id")

log = structlog.get_logger("carecanvas.compliance")


class SavedView(StrEnum):
    """Which page a saved query is for."""

    SEARCH = "search"
    USER = "user"  # the patients one user touched
    PATIENT = "patient"  # everyone who touched one patient


class ExportFormat(StrEnum):
    CSV = "csv"
    NDJSON = "ndjson"
    BUNDLE = "bundle"


@dataclass(frozen=True)
class SavedQuery:
    """Filters kept server-side (encrypted in the staff session), so patient references stay out of URLs."""

    view: SavedView
    filters: Mapping[str, str]

    def audit_query(
        self, *, order: SortOrder = SortOrder.NEWEST, offset: int = 0, limit: int = PAGE_SIZE
    ) -> AuditQuery:
        values: dict[str, Any] = dict(self.filters)
        for name in ("since", "until"):
            if name in values:
                values[name] = datetime.fromisoformat(values[name])
        return AuditQuery(**values, order=order, offset=offset, limit=limit)

    def to_dict(self) -> dict[str, Any]:
        return {"view": self.view.value, "filters": dict(self.filters)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SavedQuery:
        filters = {str(k): str(v) for k, v in dict(data.get("filters") or {}).items() if k in FILTER_NAMES}
        return cls(view=SavedView(data["view"]), filters=filters)


def saved_query(view: SavedView, form: Mapping[str, str | None]) -> SavedQuery:
    """Validate an officer's filters (AuditQueryError says what to change) and keep the non-empty ones."""
    raw = {name: (form.get(name) or "").strip() for name in FILTER_NAMES}
    values: dict[str, Any] = {name: value for name, value in raw.items() if value}
    for name in ("since", "until"):
        if name in values:
            # The form's times are UTC, like every time the console shows.
            values[name] = parse_time(name, values[name], UTC_ZONE)
    query = AuditQuery(**values)  # raises AuditQueryError with a readable message
    if view is SavedView.USER and query.actor is None:
        raise AuditQueryError("choose a user to see the patients they touched")
    if view is SavedView.PATIENT and query.patient is None:
        raise AuditQueryError("choose a patient to see everyone who touched them")
    return SavedQuery(view=view, filters=query.filters())


@dataclass
class StaffSessionData:
    """What a staff session keeps (serialised into the session's ``staff`` field): who, and saved queries."""

    identity: StaffIdentity
    queries: dict[str, SavedQuery] = field(default_factory=dict)

    def remember(self, query: SavedQuery) -> str:
        """Keep a query under a fresh opaque id; the oldest go once there are too many."""
        query_id = secrets.token_urlsafe(12)
        self.queries[query_id] = query
        while len(self.queries) > MAX_SAVED_QUERIES:
            del self.queries[next(iter(self.queries))]
        return query_id

    def to_dict(self) -> dict[str, Any]:
        return {
            "identity": self.identity.to_dict(),
            "queries": {key: query.to_dict() for key, query in self.queries.items()},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StaffSessionData:
        queries = {
            str(key): SavedQuery.from_dict(value) for key, value in dict(data.get("queries") or {}).items()
        }
        return cls(identity=StaffIdentity.from_dict(data["identity"]), queries=queries)


@dataclass
class ConsoleContext:
    """One officer's request: the app's services, the transaction, who is asking."""

    services: Services
    db: AsyncSession
    identity: StaffIdentity
    request_id: str | None

    async def record(
        self,
        action: AuditAction,
        *,
        query: AuditQuery | None,
        count: int,
        detail: Mapping[str, Any] | None = None,
    ) -> None:
        await audit_access(
            self.db,
            self.services.audit,
            action=action,
            actor=self.identity.actor,
            query=query,
            count=count,
            request_id=self.request_id,
            detail=detail,
        )


async def patient_names(
    sessions: SessionStore, db: AsyncSession, patients: Iterable[str | None]
) -> dict[str, str]:
    """Display names for the given patients from the banners stored (encrypted) in live sessions."""
    wanted: set[str] = set()
    for patient in patients:
        if patient:
            try:
                wanted.add(canonical_patient(patient))
            except AuditQueryError:
                continue
    if not wanted:
        return {}
    names: dict[str, str] = {}
    for data in await sessions.live_data(db):
        if not data.patient or not data.banner:
            continue
        try:
            reference = canonical_patient(data.patient)
        except AuditQueryError:
            continue
        name = data.banner.get("display_name")
        if reference in wanted and reference not in names and isinstance(name, str) and name.strip():
            names[reference] = name.strip()
    return names


@dataclass(frozen=True)
class Named:
    """Something to show with the patient names it mentions."""

    names: Mapping[str, str]

    def name_of(self, patient: str | None) -> str | None:
        if not patient:
            return None
        try:
            return self.names.get(canonical_patient(patient))
        except AuditQueryError:
            return None


@dataclass(frozen=True)
class SearchResult(Named):
    page: AuditPage


@dataclass(frozen=True)
class UserDrilldown(Named):
    actor: str
    patients: list[PatientTouch]


@dataclass(frozen=True)
class PatientDrilldown(Named):
    patient: str
    users: list[UserTouch]


@dataclass(frozen=True)
class Timeline(Named):
    heading: str
    explanation: str
    entries: list[AuditEntry]


@dataclass(frozen=True)
class ReportResult(Named):
    report: Report


@dataclass(frozen=True)
class ExportFile:
    body: str
    media_type: str
    filename: str
    count: int


async def search(ctx: ConsoleContext, query: AuditQuery) -> SearchResult:
    page = await search_audit(ctx.db, ctx.services.audit, query)
    await ctx.record(AuditAction.AUDIT_SEARCH, query=query, count=page.total, detail={"view": "search"})
    names = await patient_names(ctx.services.sessions, ctx.db, (entry.patient for entry in page.entries))
    return SearchResult(names=names, page=page)


async def user_drilldown(ctx: ConsoleContext, query: AuditQuery) -> UserDrilldown:
    if query.actor is None:
        raise AuditQueryError("choose a user to see the patients they touched")
    touches = await patients_touched_by(
        ctx.db, ctx.services.audit, query.actor, since=query.since, until=query.until
    )
    await ctx.record(
        AuditAction.AUDIT_SEARCH, query=query, count=len(touches), detail={"view": "patients_touched_by"}
    )
    names = await patient_names(ctx.services.sessions, ctx.db, (touch.patient for touch in touches))
    return UserDrilldown(names=names, actor=query.actor, patients=touches)


async def patient_drilldown(ctx: ConsoleContext, query: AuditQuery) -> PatientDrilldown:
    if query.patient is None:
        raise AuditQueryError("choose a patient to see everyone who touched them")
    touches = await users_who_touched(
        ctx.db, ctx.services.audit, query.patient, since=query.since, until=query.until
    )
    await ctx.record(
        AuditAction.AUDIT_SEARCH, query=query, count=len(touches), detail={"view": "users_who_touched"}
    )
    names = await patient_names(ctx.services.sessions, ctx.db, [query.patient])
    return PatientDrilldown(names=names, patient=query.patient, users=touches)


async def timeline(ctx: ConsoleContext, request_id: str) -> Timeline:
    entries = await session_timeline(ctx.db, ctx.services.audit, request_id)
    query = AuditQuery(request_id=request_id)
    await ctx.record(AuditAction.AUDIT_SEARCH, query=query, count=len(entries), detail={"view": "timeline"})
    names = await patient_names(ctx.services.sessions, ctx.db, (entry.patient for entry in entries))
    return Timeline(
        names=names,
        heading=f"Timeline of request {request_id}",
        explanation="Every record this request left, in the order they were written.",
        entries=entries,
    )


async def launch_session_timeline(ctx: ConsoleContext, launch_seq: int) -> Timeline:
    """One clinician session: its launch record and what that user did on that EHR until their next launch."""
    entries = await launch_timeline(ctx.db, ctx.services.audit, launch_seq)
    await ctx.record(
        AuditAction.AUDIT_SEARCH,
        query=None,
        count=len(entries),
        detail={"view": "launch_timeline", "launch_seq": launch_seq},
    )
    names = await patient_names(ctx.services.sessions, ctx.db, (entry.patient for entry in entries))
    return Timeline(
        names=names,
        heading=f"Session from launch record {launch_seq}",
        explanation=(
            "The launch and everything the same user did at the same EHR until their next launch there. "
            "Records carry no session id, so two tabs of one user at one EHR show as one session."
        ),
        entries=entries,
    )


def report_settings(services: Services) -> ReportSettings:
    return ReportSettings.from_settings(services.settings)


def report_rules(services: Services) -> list[Any]:
    """Every report's rule in words, for the reports index."""
    rules = report_settings(services)
    return [report_rule(kind, rules) for kind in ReportKind]


async def report(ctx: ConsoleContext, kind: ReportKind, *, since: datetime, until: datetime) -> ReportResult:
    result = await run_report(
        ctx.db, ctx.services.audit, kind, since=since, until=until, rules=report_settings(ctx.services)
    )
    query = AuditQuery(since=result.since, until=result.until)
    await ctx.record(AuditAction.AUDIT_SEARCH, query=query, count=result.total, detail={"report": kind.value})
    names = await patient_names(ctx.services.sessions, ctx.db, (row.patient for row in result.rows))
    return ReportResult(names=names, report=result)


async def export(ctx: ConsoleContext, query: AuditQuery, fmt: ExportFormat) -> ExportFile:
    """Exactly the filtered set (every page, oldest first, fixed at the chain head when it starts)."""
    entries = await export_entries(ctx.db, ctx.services.audit, query)
    settings = ctx.services.settings
    site = settings.site_name
    bases = {ehr.name: ehr.iss for ehr in ctx.services.ehrs.all()}
    if fmt is ExportFormat.CSV:
        file = ExportFile(
            entries_to_csv(entries), "text/csv; charset=utf-8", "carecanvas-audit.csv", len(entries)
        )
    elif fmt is ExportFormat.NDJSON:
        body = entries_to_balp_ndjson(entries, site=site, fhir_bases=bases)
        file = ExportFile(body, "application/fhir+ndjson", "carecanvas-audit.ndjson", len(entries))
    else:
        body = json.dumps(entries_to_balp_bundle(entries, site=site, fhir_bases=bases), separators=(",", ":"))
        file = ExportFile(body, "application/fhir+json", "carecanvas-audit-bundle.json", len(entries))
    await ctx.record(AuditAction.AUDIT_EXPORT, query=query, count=len(entries), detail={"format": fmt.value})
    return file


async def record_sign_in(
    services: Services,
    db: AsyncSession,
    *,
    action: AuditAction,
    outcome: AuditOutcome,
    actor: str | None,
    request_id: str | None,
    detail: Mapping[str, Any],
) -> None:
    """A staff sign-in, refusal, failure or sign-out, in the caller's transaction (no EHR, no patient)."""
    await services.audit.append(
        db,
        action=action,
        outcome=outcome,
        actor=actor,
        patient=None,
        ehr=None,
        resource=None,
        request_id=request_id,
        detail={"kind": "staff", **detail},
    )


@dataclass(frozen=True)
class IntegrityStatus:
    """The chain and its checkpoints at a glance (no verification: that is `verify_now`)."""

    chain_length: int
    last_checkpoint_seq: int | None
    last_checkpoint_time: str | None
    stored_at: str
    malformed_lines: int

    @property
    def not_anchored(self) -> int:
        return max(self.chain_length - (self.last_checkpoint_seq or 0), 0)


async def integrity_status(ctx: ConsoleContext) -> IntegrityStatus:
    head, _ = await ctx.services.audit.head(ctx.db)
    readout = await ctx.services.audit.checkpoint_readout()
    last = max((located.checkpoint for located in readout.checkpoints), key=lambda cp: cp.seq, default=None)
    return IntegrityStatus(
        chain_length=head,
        last_checkpoint_seq=last.seq if last else None,
        last_checkpoint_time=last.time if last else None,
        stored_at=readout.source,
        malformed_lines=len(readout.problems),
    )


async def verify_now(ctx: ConsoleContext) -> VerifyResult:
    """Verify the whole chain and every checkpoint; the verdict is itself audited."""
    result = await ctx.services.audit.verify(ctx.db)
    detail = {
        "ok": result.ok,
        "count": result.count,
        "first_bad_seq": result.first_bad_seq,
        "anchored_seq": result.anchored_seq,
    }
    await ctx.record(AuditAction.AUDIT_VERIFY, query=None, count=result.count, detail=detail)
    return result


@dataclass(frozen=True)
class SignInCallback:
    """What the identity provider sent back to /compliance/callback."""

    code: str | None
    state: str | None
    error: str | None


@dataclass(frozen=True)
class SignInOutcome:
    """Signed in (a new session's cookie value), denied (who lacked the role), or failed (why, in words)."""

    cookie_value: str | None = None
    denied: StaffIdentity | None = None
    message: str = ""
    return_to: str = "/compliance"  # where the sign-in was started for (one of staff_auth.RETURN_TARGETS)


async def finish_sign_in(
    services: Services,
    db: AsyncSession,
    session: WebSession | None,
    oidc: StaffOidcSettings,
    callback: SignInCallback,
    *,
    request_id: str | None,
) -> SignInOutcome:
    """Spend the pending sign-in (single use, own transaction), check the answer and the role; audited."""
    pending_raw = await _spend_pending(services, session)
    try:
        if callback.error:
            raise StaffSignInError(SignInFailure.PROVIDER_ERROR, "The identity provider did not sign you in.")
        pending = check_pending(pending_raw, callback.state)
        identity = await complete_sign_in(oidc, pending=pending, code=callback.code, http=services.http)
    except StaffSignInError as failure:
        detail = {"reason": failure.reason.value}
        await _close_sign_in(services, db, session, AuditOutcome.FAILURE, None, request_id, detail)
        log.warning("staff sign-in failed", reason=failure.reason.value)
        return SignInOutcome(message=str(failure))
    # The console's role, or a portrait reviewer's (each page checks its own role again on every request).
    if not may_sign_in(identity, oidc):
        detail = {
            "reason": "missing_role",
            "role_claim": oidc.role_claim,
            "required_role": oidc.compliance_role,
        }
        if oidc.reviewer_roles:
            detail["reviewer_roles"] = ", ".join(oidc.reviewer_roles)
        await _close_sign_in(services, db, session, AuditOutcome.DENIED, identity.actor, request_id, detail)
        return SignInOutcome(denied=identity, return_to=pending.return_to)
    # A new session id once signed in (no fixation of the pre-login id); the old row goes.
    signed_in = SessionData(kind=SessionKind.STAFF, staff=StaffSessionData(identity).to_dict())
    cookie_value, _ = await services.sessions.create(db, ehr_name=oidc.name, data=signed_in)
    detail = {"name": identity.display}
    await _close_sign_in(services, db, session, AuditOutcome.SUCCESS, identity.actor, request_id, detail)
    return SignInOutcome(cookie_value=cookie_value, return_to=pending.return_to)


async def _spend_pending(services: Services, session: WebSession | None) -> dict[str, Any] | None:
    if session is None:
        return None
    async with services.sessionmaker() as spend:
        pending_raw, session.data.pending = session.data.pending, None
        await services.sessions.save(spend, session)
        await spend.commit()
    return pending_raw


async def _close_sign_in(
    services: Services,
    db: AsyncSession,
    session: WebSession | None,
    outcome: AuditOutcome,
    actor: str | None,
    request_id: str | None,
    detail: dict[str, Any],
) -> None:
    await record_sign_in(
        services,
        db,
        action=AuditAction.LOGIN,
        outcome=outcome,
        actor=actor,
        request_id=request_id,
        detail=detail,
    )
    if session is not None:
        await services.sessions.end(db, session)
    await db.commit()
