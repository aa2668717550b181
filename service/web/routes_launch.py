"""SMART EHR launch: `/launch` (the launch URL an EHR registers) and `/callback` (the redirect URI)."""

from __future__ import annotations

from typing import Annotated

import structlog
from fastapi import APIRouter, Query, Request
from fastapi.responses import RedirectResponse, Response

from fhir_adapters import FhirError, SmartError
from service.audit import AuditAction
from service.ehrs import UnregisteredIssuerError
from service.web.deps import DbDep, RequestIdDep, ServicesDep, SessionStoreDep
from service.web.errors import PageError
from service.web.security import cookie_name, set_session_cookie
from service.workflows.launch import LaunchStateError, begin_launch, complete_launch

log = structlog.get_logger("carecanvas.launch")
router = APIRouter()


@router.get("/launch")
async def launch(
    services: ServicesDep,
    db: DbDep,
    store: SessionStoreDep,
    iss: Annotated[str | None, Query()] = None,
    launch: Annotated[str | None, Query()] = None,
) -> Response:
    try:
        ehr = services.ehrs.by_iss(iss)
    except UnregisteredIssuerError:
        # No outbound request at all for an unknown iss: it could point anywhere (SSRF).
        raise PageError(
            400,
            "This EHR is not registered",
            "CareCanvas was opened from an EHR it does not know. Ask your EHR team to register CareCanvas "
            "(see docs/integrating.md); nothing was contacted.",
        ) from None
    if not launch:
        raise PageError(400, "Missing launch context", "Open CareCanvas from a patient's chart in your EHR.")
    registration = services.ehrs.registration(ehr)
    try:
        started = await begin_launch(
            registration=registration, launch=launch, http=services.http, scopes=ehr.scopes
        )
    except (SmartError, FhirError) as error:
        log.warning("smart discovery refused", ehr=ehr.name, error_type=type(error).__name__)
        raise PageError(
            502,
            "The EHR's sign-in settings could not be used",
            "CareCanvas could not read or trust the EHR's SMART configuration, so it did not continue. "
            "Please tell your EHR integration team.",
        ) from error
    cookie_value, _ = await store.create(db, ehr_name=ehr.name, data=started.session_data)
    await db.commit()
    response = RedirectResponse(started.authorize_url, status_code=302)
    set_session_cookie(response, services.settings, cookie_value)
    return response


@router.get("/callback")
async def callback(
    request: Request,
    services: ServicesDep,
    db: DbDep,
    store: SessionStoreDep,
    request_id: RequestIdDep,
    code: Annotated[str | None, Query()] = None,
    state: Annotated[str | None, Query()] = None,
    error: Annotated[str | None, Query()] = None,
    error_description: Annotated[str | None, Query()] = None,
) -> Response:
    session = await store.load(db, request.cookies.get(cookie_name(services.settings)))
    if session is None:
        raise PageError(400, "Sign-in could not be completed", "Please launch CareCanvas again from the EHR.")
    if error:
        session.data.pop("pending", None)
        await store.save(db, session)
        await db.commit()
        raise PageError(
            400,
            "The EHR did not allow the sign-in",
            f"The EHR answered: {error_description or error}. "
            "Please launch CareCanvas again or ask your EHR team.",
        )
    ehr = services.ehrs.by_name(session.ehr_name)
    registration = services.ehrs.registration(ehr)
    try:
        token_set, _config = await complete_launch(
            registration=registration, session_data=session.data, code=code, state=state, http=services.http
        )
    except LaunchStateError as failure:
        await store.save(db, session)  # the pending state is spent either way
        await db.commit()
        raise PageError(400, "Sign-in could not be completed", str(failure)) from failure
    except SmartError as failure:
        await store.save(db, session)
        await db.commit()
        log.warning("token exchange refused", ehr=ehr.name, error_type=type(failure).__name__)
        raise PageError(
            400,
            "Sign-in could not be completed",
            "The EHR's answer to the sign-in could not be verified. Please launch CareCanvas again.",
        ) from failure
    session.data["token_set"] = token_set.to_dict()
    session.data["patient"] = token_set.patient
    session.data["encounter"] = token_set.encounter
    session.data["fhir_user"] = token_set.fhir_user
    await store.save(db, session)
    await services.audit.append(
        db,
        action=AuditAction.LAUNCH,
        outcome="success",
        actor=token_set.fhir_user,
        patient=token_set.patient,
        ehr=ehr.name,
        resource=None,
        request_id=request_id,
        detail={"scope": " ".join(sorted(token_set.scopes.raw))},
    )
    await db.commit()
    # 303 to a clean URL: the code leaves the address bar, and no-referrer keeps it out of later requests.
    response = RedirectResponse("/app", status_code=303)
    response.headers["Referrer-Policy"] = "no-referrer"
    return response
