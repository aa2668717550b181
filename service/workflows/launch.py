"""SMART launch: begin (discovery, PKCE, state) and complete (state check, code exchange, id_token)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal
from urllib.parse import urlsplit

import httpx
from sqlalchemy.ext.asyncio import AsyncSession

from fhir_adapters import (
    EhrRegistration,
    PendingAuthorization,
    SmartConfiguration,
    SmartError,
    StateError,
    TokenSet,
    begin_authorization,
    check_state,
    discover,
    exchange_code,
)
from fhir_adapters.scopes import scope_syntax_from_capabilities, scopes_in_syntax
from service.audit import AuditAction, AuditOutcome
from service.services import Services
from service.sessions import PendingLaunch, SessionData, SessionKind, spend_launch_state

# A pending authorization older than this is refused: the user must launch again.
PENDING_MAX_AGE = timedelta(minutes=10)

LaunchKind = Literal["ehr", "portal"]
Role = Literal["clinician", "patient", "related-person"]
_ROLES: dict[str, Role] = {
    "Practitioner": "clinician",
    "PractitionerRole": "clinician",
    "Patient": "patient",
    "RelatedPerson": "related-person",
}
_FHIR_USER = re.compile(r"(?:^|/)(?P<type>[A-Z][A-Za-z]+)/(?P<id>[A-Za-z0-9\-.]{1,64})$")

# smart_style_url: only these keys are kept, each value matched in full against a strict pattern, so an
# EHR's style document can never inject CSS (no url(), no braces, no semicolons, no comments).
_COLOR = (
    r"#[0-9A-Fa-f]{3,8}|rgba?\(\s*\d{1,3}\s*,\s*\d{1,3}\s*,\s*\d{1,3}\s*(?:,\s*(?:0|1|0?\.\d{1,3})\s*)?\)"
)
_LENGTH = r"\d{1,3}(?:\.\d{1,2})?(?:px|rem|em)"
_FONT_NAME = r"(?:-?[A-Za-z][A-Za-z0-9 \-]{0,40}|\"[A-Za-z][A-Za-z0-9 \-]{0,40}\")"
_FONT = rf"{_FONT_NAME}(?:\s*,\s*{_FONT_NAME}){{0,7}}"
STYLE_PATTERNS: dict[str, re.Pattern[str]] = {
    "color_background": re.compile(_COLOR),
    "color_text": re.compile(_COLOR),
    "color_highlight": re.compile(_COLOR),
    "color_error": re.compile(_COLOR),
    "color_success": re.compile(_COLOR),
    "dim_border_radius": re.compile(_LENGTH),
    "dim_font_size": re.compile(_LENGTH),
    "dim_spacing_size": re.compile(_LENGTH),
    "font_family_body": re.compile(_FONT),
    "font_family_heading": re.compile(_FONT),
}
_MAX_STYLE_BYTES = 20_000


class LaunchStateError(Exception):
    """The callback's `state` is missing, wrong, reused or expired; no token request was made."""


class LaunchUserError(PermissionError):
    """The signed-in user cannot use this kind of launch (e.g. a clinician on the patient portal)."""


@dataclass(frozen=True)
class StartedLaunch:
    authorize_url: str
    # Sealed into the browser's cookie by the route (service.sessions.PendingLaunchSeal); no row yet.
    launch: PendingLaunch


async def begin_launch(
    *,
    registration: EhrRegistration,
    ehr_name: str,
    launch: str | None,
    http: httpx.AsyncClient,
    scopes: tuple[str, ...],
    kind: LaunchKind = "ehr",
) -> StartedLaunch:
    """Discover the EHR's endpoints and build the authorize redirect and the pending launch to seal.

    `launch` is the EHR's launch id for an EHR launch and None for a standalone (portal) launch.
    """
    config = await discover(registration.iss, http=http, registration=registration)
    pending = begin_authorization(
        registration=registration,
        config=config,
        redirect_uri=registration.redirect_uri,
        launch=launch,
        # v2 scopes (patient/Condition.rs) where the server advertises permission-v2, else their v1 forms.
        scopes=scopes_in_syntax(scopes, scope_syntax_from_capabilities(config.capabilities)),
    )
    # The authorize URL (with the EHR's launch id) is not needed at the callback: left out of the cookie.
    pending_data = {**pending.to_dict(), "url": ""}
    smart_config = config_to_dict(config)
    # Only the scopes CareCanvas asks for matter later; a long scopes_supported list would not fit a cookie.
    smart_config["scopes_supported"] = [s for s in config.scopes_supported if s in set(pending.scopes)]
    return StartedLaunch(
        authorize_url=pending.url,
        launch=PendingLaunch(
            ehr_name=ehr_name, kind=SessionKind(kind), pending=pending_data, smart_config=smart_config
        ),
    )


async def complete_launch(
    *,
    registration: EhrRegistration,
    pending_raw: dict[str, Any] | None,
    smart_config: dict[str, Any],
    code: str | None,
    state: str | None,
    http: httpx.AsyncClient,
) -> tuple[TokenSet, SmartConfiguration]:
    """Check state (the caller already spent it: single use), exchange the code.

    The id_token is verified by `exchange_code`; a missing one is refused when `openid` was asked for.
    """
    if not pending_raw or not code:
        raise LaunchStateError("This sign-in link is not valid any more. Please launch CareCanvas again.")
    pending = PendingAuthorization.from_dict(pending_raw)
    try:
        check_state(pending, state, max_age=PENDING_MAX_AGE)
    except StateError as error:
        raise LaunchStateError(
            "This sign-in link is not valid any more. Please launch CareCanvas again."
        ) from error
    config = config_from_dict(smart_config)
    token_set = await exchange_code(
        registration=registration, config=config, code=code, pending=pending, http=http
    )
    if "openid" in pending.scopes and token_set.id_token_claims is None:
        raise SmartError("the EHR did not return the id_token it was asked for", error="invalid_token")
    return token_set, config


def config_to_dict(config: SmartConfiguration) -> dict[str, Any]:
    return {
        "fhir_base": config.fhir_base,
        "issuer": config.issuer,
        "authorization_endpoint": config.authorization_endpoint,
        "token_endpoint": config.token_endpoint,
        "jwks_uri": config.jwks_uri,
        "capabilities": list(config.capabilities),
        "code_challenge_methods_supported": list(config.code_challenge_methods_supported),
        "scopes_supported": list(config.scopes_supported),
        "grant_types_supported": list(config.grant_types_supported),
        "token_endpoint_auth_methods_supported": list(config.token_endpoint_auth_methods_supported),
    }


def config_from_dict(data: dict[str, Any]) -> SmartConfiguration:
    """The configuration checked at launch, as stored (encrypted) in the session; not fetched again."""
    return SmartConfiguration(
        fhir_base=data["fhir_base"],
        issuer=data["issuer"],
        authorization_endpoint=data["authorization_endpoint"],
        token_endpoint=data["token_endpoint"],
        jwks_uri=data["jwks_uri"],
        capabilities=tuple(data["capabilities"]),
        code_challenge_methods_supported=tuple(data["code_challenge_methods_supported"]),
        scopes_supported=tuple(data["scopes_supported"]),
        grant_types_supported=tuple(data["grant_types_supported"]),
        token_endpoint_auth_methods_supported=tuple(data["token_endpoint_auth_methods_supported"]),
    )


def role_for(*, kind: LaunchKind, fhir_user: str | None, patient: str | None) -> Role:
    """Map `fhirUser` to a role and check it fits the launch; raise LaunchUserError when it does not."""
    match = _FHIR_USER.search(fhir_user or "")
    role = _ROLES.get(match["type"]) if match else None
    if role is None:
        raise LaunchUserError(
            "The EHR did not say who signed in as a Practitioner, Patient or RelatedPerson, "
            "so CareCanvas cannot decide what to show."
        )
    if kind == "ehr" and role != "clinician":
        raise LaunchUserError("CareCanvas opened from the chart is for clinicians. Patients use the portal.")
    if kind == "portal":
        if role == "clinician":
            raise LaunchUserError(
                "The patient portal is for patients. Clinicians open CareCanvas from the chart."
            )
        if not patient:
            raise LaunchUserError("The EHR did not say which patient's record to show.")
        if match and role == "patient" and match["id"] != patient:
            raise LaunchUserError("The signed-in patient is not the patient whose record was chosen.")
    return role


def style_fetch_allowed(style_url: str, *, registration: EhrRegistration, config: SmartConfiguration) -> bool:
    """Only fetch styles from the EHR's own origins (the FHIR base, its sign-in server, auth_origins)."""
    parts = urlsplit(style_url)
    if parts.scheme not in ("https", "http") or not parts.hostname or parts.username or parts.password:
        return False
    allowed = {_origin(registration.iss), _origin(config.authorization_endpoint)}
    allowed.update(_origin(origin) for origin in registration.auth_origins)
    return _origin(style_url) in allowed


def safe_style(document: object) -> dict[str, str]:
    """The style values that match their strict pattern in full; everything else is dropped."""
    if not isinstance(document, dict):
        return {}
    kept: dict[str, str] = {}
    for name, pattern in STYLE_PATTERNS.items():
        value = document.get(name)
        if isinstance(value, str) and len(value) <= 200 and pattern.fullmatch(value.strip()):
            kept[name] = value.strip()
    return kept


async def fetch_smart_style(
    style_url: str | None,
    *,
    registration: EhrRegistration,
    config: SmartConfiguration,
    http: httpx.AsyncClient,
) -> dict[str, str]:
    """Fetch the EHR's style document server-side; any problem means "no EHR styling", never an error."""
    if not style_url or not style_fetch_allowed(style_url, registration=registration, config=config):
        return {}
    try:
        response = await http.get(style_url, headers={"Accept": "application/json"}, follow_redirects=False)
    except httpx.HTTPError:
        return {}
    if response.status_code != 200 or len(response.content) > _MAX_STYLE_BYTES:
        return {}
    try:
        return safe_style(json.loads(response.content))
    except (ValueError, UnicodeDecodeError):
        return {}


def style_css(style: dict[str, str]) -> str:
    """CSS custom properties for the pages (`--smart-color-background`, ...); values were validated."""
    lines = [f"  --smart-{name.replace('_', '-')}: {value};" for name, value in safe_style(style).items()]
    if not lines:
        return "/* no EHR style for this session */\n"
    rules = [":root {", *lines, "}"]
    mapping = {
        "color_background": ("body", "background"),
        "color_text": ("body", "color"),
        "font_family_body": ("body", "font-family"),
        "font_family_heading": ("h1, h2, h3", "font-family"),
        "color_highlight": (".app-header, button.primary", "background"),
    }
    for name, (selector, prop) in mapping.items():
        if name in style and STYLE_PATTERNS[name].fullmatch(style[name]):
            rules.append(f"{selector} {{ {prop}: var(--smart-{name.replace('_', '-')}); }}")
    return "\n".join(rules) + "\n"


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}".lower()


@dataclass(frozen=True)
class CallbackAnswer:
    """What came back to the redirect URI, and the pending launch the browser's cookie held (if any)."""

    launch: PendingLaunch | None
    code: str | None
    state: str | None


@dataclass(frozen=True)
class FinishedLaunch:
    """The new session's cookie value and kind: the session row exists only from here on."""

    cookie_value: str
    kind: SessionKind


async def spend_pending(services: Services, launch: PendingLaunch | None) -> dict[str, Any] | None:
    """The pending authorization, spent once: a second callback with the same state gets None.

    Committed in a transaction of its own before any EHR call, so the state is single use even when two
    callbacks race (or a copied cookie is replayed) and no write lock is held meanwhile.
    """
    if launch is None:
        return None
    state = str(launch.pending.get("state") or "")
    if not state:
        return None
    keep_until = datetime.now(UTC) + PENDING_MAX_AGE
    if not await spend_launch_state(services.sessionmaker, state, keep_until=keep_until):
        return None
    return launch.pending


async def finish_launch(
    services: Services,
    db: AsyncSession,
    answer: CallbackAnswer,
    *,
    request_id: str | None,
) -> FinishedLaunch:
    """Spend the pending state, exchange the code, check the user may use this launch, create the session.

    Raises LaunchStateError (no, wrong, reused or expired state; no token request made), SmartError (the
    EHR's answer could not be verified) or LaunchUserError (this user may not use this launch; the refusal
    is audited and committed first). No session row is written unless all of that succeeds.
    """
    launch = answer.launch
    pending_raw = await spend_pending(services, launch)
    if launch is None or pending_raw is None:
        raise LaunchStateError("This sign-in link is not valid any more. Please launch CareCanvas again.")
    kind: LaunchKind = "portal" if launch.kind is SessionKind.PORTAL else "ehr"
    ehr = services.ehrs.by_name(launch.ehr_name)
    registration = services.ehrs.registration(ehr)
    http = services.connections.smart(ehr.name)
    token_set, config = await complete_launch(
        registration=registration,
        pending_raw=pending_raw,
        smart_config=launch.smart_config,
        code=answer.code,
        state=answer.state,
        http=http,
    )

    async def audit(outcome: AuditOutcome, detail: dict[str, Any]) -> None:
        await services.audit.append(
            db,
            action=AuditAction.LAUNCH,
            outcome=outcome,
            actor=token_set.fhir_user,
            patient=token_set.patient,
            ehr=ehr.name,
            resource=None,
            request_id=request_id,
            detail={"kind": kind, "encounter": token_set.encounter, **detail},
        )

    try:
        role = role_for(kind=kind, fhir_user=token_set.fhir_user, patient=token_set.patient)
    except LaunchUserError:
        await audit(AuditOutcome.DENIED, {})
        await db.commit()
        raise
    style = await fetch_smart_style(
        token_set.smart_style_url, registration=registration, config=config, http=http
    )
    cookie_value = await _keep_tokens(services, db, launch, token_set, role=role, style=style)
    await audit(AuditOutcome.SUCCESS, {"role": role, "scope": " ".join(sorted(token_set.scopes.raw))})
    await db.commit()
    await services.sessions.maybe_sweep(db, every_seconds=services.settings.session_sweep_seconds)
    return FinishedLaunch(cookie_value=cookie_value, kind=launch.kind)


async def _keep_tokens(
    services: Services,
    db: AsyncSession,
    launch: PendingLaunch,
    token_set: TokenSet,
    *,
    role: Role,
    style: dict[str, str],
) -> str:
    """The launch's tokens and context go into a new server-side session (encrypted); never to the browser.

    A fresh session id (not derived from the pending cookie), so a planted cookie cannot fix the session.
    """
    data = SessionData(
        kind=launch.kind,
        smart_config=launch.smart_config,
        token_set=token_set.to_dict(),
        patient=token_set.patient,
        encounter=token_set.encounter,
        fhir_user=token_set.fhir_user,
        role=role,
        style=style,
    )
    cookie_value, _ = await services.sessions.create(db, ehr_name=launch.ehr_name, data=data)
    return cookie_value
