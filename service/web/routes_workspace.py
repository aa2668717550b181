"""The clinician's workspace: patient banner, active conditions, the generate form and earlier documents."""

from __future__ import annotations

import contextlib
import dataclasses
import re
from typing import Annotated, Any

import structlog
from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from sqlalchemy.ext.asyncio import AsyncSession

from fhir_adapters import (
    FhirError,
    ForbiddenError,
    GrantedScopes,
    NotFoundError,
    summarize_condition,
    summarize_encounter,
    summarize_patient,
)
from fhir_adapters.conditions import UNSPECIFIED_CONDITION
from service.app import Services
from service.audit import AuditAction
from service.documents import STATUS_LABELS, documents_by_identifier, history_from_search
from service.fhir_access import SessionExpiredError
from service.generation.prompts import Depiction
from service.sessions import WebSession
from service.web.deps import (
    DbDep,
    RequestIdDep,
    ServicesDep,
    SessionStoreDep,
    WebSessionDep,
    audit_touch,
    session_fhir,
)
from service.web.errors import PageError, fhir_failure_page
from service.workflows.approve import IDENTIFIER_SYSTEM
from service.workflows.illustrate import (
    ConditionNotFoundError,
    IllustrationChoice,
    WrongPatientError,
    start_illustration,
)

log = structlog.get_logger("carecanvas.workspace")
router = APIRouter()

LANGUAGES = {"en": "English", "es": "Español"}
FHIR_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")


@router.get("/app", response_class=HTMLResponse)
async def workspace(
    request: Request,
    services: ServicesDep,
    db: DbDep,
    store: SessionStoreDep,
    session: WebSessionDep,
    request_id: RequestIdDep,
) -> Response:
    ehr = services.ehrs.by_name(session.ehr_name)
    patient_id = session.patient_id
    if not patient_id:
        raise PageError(400, "No patient in context", "Open CareCanvas from a patient's chart.")
    token = session.data["token_set"]
    patient_resource = None
    encounter_resource = None
    encounter_id = session.data.get("encounter")
    history_raw: list[dict[str, Any]] | None = None
    history_error: FhirError | None = None
    try:
        async with session_fhir(services, session, store, db) as fhir:
            if token.get("need_patient_banner", True):
                patient_resource = await fhir.read("Patient", patient_id)
            conditions_raw = await fhir.search(
                "Condition", {"patient": patient_id, "clinical-status": "active", "_count": "50"}
            )
            if encounter_id:
                # The visit from the launch, shown beside the banner; a missing one costs nothing else.
                with contextlib.suppress(NotFoundError, ForbiddenError):
                    encounter_resource = await fhir.read("Encounter", encounter_id)
            if _can_search_documents(token):
                # A failed history search must not cost the clinician the workspace: say so instead.
                try:
                    history_raw = await fhir.search(
                        "DocumentReference",
                        {"patient": patient_id, "identifier": f"{IDENTIFIER_SYSTEM}|", "_count": "50"},
                    )
                except FhirError as error:
                    history_error = error
    except FhirError as error:
        await _audit_failure(services, db, session, resource="Condition", request_id=request_id, error=error)
        raise fhir_failure_page(error) from error
    # Audited after the EHR answered (never holding the database's write lock across EHR calls) and
    # before anything is shown: if the audit record cannot be written, nothing is shown.
    if patient_resource is not None:
        await audit_touch(
            services,
            db,
            session,
            action=AuditAction.FHIR_READ,
            outcome="success",
            patient=patient_id,
            resource="Patient",
            request_id=request_id,
            detail=None,
        )
    if encounter_resource is not None:
        await audit_touch(
            services,
            db,
            session,
            action=AuditAction.FHIR_READ,
            outcome="success",
            patient=patient_id,
            resource="Encounter",
            request_id=request_id,
            detail=None,
        )
    await audit_touch(
        services,
        db,
        session,
        action=AuditAction.FHIR_SEARCH,
        outcome="success",
        patient=patient_id,
        resource="Condition",
        request_id=request_id,
        detail={"count": len(conditions_raw)},
    )
    history = []
    if history_raw is not None or history_error is not None:
        await audit_touch(
            services,
            db,
            session,
            action=AuditAction.FHIR_SEARCH,
            outcome="success" if history_error is None else "failure",
            patient=patient_id,
            resource="DocumentReference",
            request_id=request_id,
            detail={"count": len(history_raw)}
            if history_raw is not None
            else {"status": _status(history_error)},
        )
    if history_raw is not None:
        identifiers = [
            str(item.get("value"))
            for resource in history_raw
            for item in resource.get("identifier") or []
            if isinstance(item, dict) and item.get("system") == IDENTIFIER_SYSTEM
        ]
        local = await documents_by_identifier(
            db, keyring=services.keyring, ehr_name=ehr.name, identifiers=identifiers
        )
        history = history_from_search(history_raw, identifier_system=IDENTIFIER_SYSTEM, local=local)
    banner = summarize_patient(patient_resource) if patient_resource is not None else None
    if banner is not None:
        # Kept (encrypted, in the server-side session) so the job and review pages show the same banner
        # without reading the Patient again.
        session.data["banner"] = dataclasses.asdict(banner)
        await store.save(db, session)
    await db.commit()
    conditions = [summarize_condition(resource) for resource in conditions_raw]
    conditions = [condition for condition in conditions if condition.is_active]
    can_write = _can_write_back(token)
    return services.templates.TemplateResponse(
        request,
        "workspace.html",
        {
            "banner": banner,
            "encounter": summarize_encounter(encounter_resource) if encounter_resource is not None else None,
            "conditions": conditions,
            "styles": services.prompts.styles,
            "languages": LANGUAGES,
            "csrf_token": session.csrf_token,
            "can_write": can_write,
            "model": services.models.get(services.settings.default_model),
            "history": history,
            "history_unavailable": history_error is not None,
            "status_labels": STATUS_LABELS,
            "can_update": _can_update_documents(token),
            "unspecified_text": UNSPECIFIED_CONDITION,
        },
    )


async def _audit_failure(
    services: Services,
    db: AsyncSession,
    session: WebSession,
    *,
    resource: str,
    request_id: str | None,
    error: FhirError,
) -> None:
    await db.rollback()
    await audit_touch(
        services,
        db,
        session,
        action=AuditAction.FHIR_SEARCH,
        outcome="failure",
        patient=session.patient_id,
        resource=resource,
        request_id=request_id,
        detail={"status": error.status},
    )
    await db.commit()


def _status(error: FhirError | None) -> int | None:
    return error.status if error is not None else None


def _can_write_back(token: dict[str, object]) -> bool:
    return GrantedScopes.parse(str(token.get("scope", ""))).allows("DocumentReference", "create")


def _can_search_documents(token: dict[str, object]) -> bool:
    return GrantedScopes.parse(str(token.get("scope", ""))).allows("DocumentReference", "search")


def _can_update_documents(token: dict[str, object]) -> bool:
    return GrantedScopes.parse(str(token.get("scope", ""))).allows("DocumentReference", "update")


@router.post("/illustrations")
async def create_illustration(
    services: ServicesDep,
    db: DbDep,
    store: SessionStoreDep,
    session: WebSessionDep,
    request_id: RequestIdDep,
    condition_id: Annotated[str, Form(max_length=64)],
    style: Annotated[str, Form(max_length=40)],
    language: Annotated[str, Form(max_length=5)],
    csrf_token: Annotated[str, Form(max_length=100)],
    depiction: Annotated[str, Form(max_length=40)] = "varied",
) -> Response:
    if not session.csrf_matches(csrf_token):
        raise PageError(403, "This form has expired", "Please go back, reload the page and try again.")
    if not FHIR_ID.fullmatch(condition_id):
        raise PageError(400, "Not a valid condition id", "Pick a condition from the list on the page.")
    if language not in LANGUAGES:
        raise PageError(400, "Unknown language", f"Choose one of: {', '.join(LANGUAGES.values())}.")
    if style not in {preset.name for preset in services.prompts.styles}:
        raise PageError(400, "Unknown style", "Choose one of the styles offered on the page.")
    try:
        chosen_depiction = Depiction.from_choice(depiction)
    except ValueError as error:
        raise PageError(400, "Unknown depiction", str(error)) from error
    patient_id = session.patient_id
    if not patient_id:
        raise PageError(400, "No patient in context", "Open CareCanvas from a patient's chart.")
    ehr = services.ehrs.by_name(session.ehr_name)
    model = services.models.get(services.settings.default_model)
    try:
        async with session_fhir(services, session, store, db) as fhir:
            job_id = await start_illustration(
                db=db,
                fhir=fhir,
                queue=services.queue,
                audit=services.audit,
                keyring=services.keyring,
                library=services.prompts,
                model=model,
                choice=IllustrationChoice(
                    condition_id=condition_id, style=style, language=language, depiction=chosen_depiction
                ),
                patient_id=patient_id,
                encounter_id=session.data.get("encounter"),
                actor=session.data.get("fhir_user"),
                ehr_name=ehr.name,
                session_id_hash=session.id_hash,
                request_id=request_id,
            )
    except ConditionNotFoundError as error:
        await db.rollback()
        raise PageError(404, "Condition not found", str(error)) from error
    except WrongPatientError as error:
        await db.rollback()
        raise PageError(403, "Not this patient's record", str(error)) from error
    except SessionExpiredError as error:
        await db.rollback()
        raise PageError(401, "Your CareCanvas session has ended", str(error)) from error
    except FhirError as error:
        await db.rollback()
        raise fhir_failure_page(error) from error
    await db.commit()
    return RedirectResponse(f"/jobs/{job_id}", status_code=303)
