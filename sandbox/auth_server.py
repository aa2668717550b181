"""The sandbox SMART authorization server as an ASGI app (Starlette): discovery, authorize, token, JWKS."""

from __future__ import annotations

import time
from typing import Any

from authlib.oauth2.rfc6749 import OAuth2Error
from joserfc import jwt
from joserfc.errors import JoseError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route

from sandbox.auth.config import (
    DEMO_CLIENT_ID,
    FOREIGN_ISSUER,
    FOREIGN_TOKEN_ENDPOINT,
    AuthServerConfig,
    ClientRegistration,
    Misbehaviour,
    demo_client,
)
from sandbox.auth.data import load_directory
from sandbox.auth.oauth import FormOAuth2Request, SmartAuthorizationServer
from sandbox.auth.store import AuthStore
from sandbox.chart import chart_routes
from sandbox.ehr_page import TEMPLATES, ehr_routes
from sandbox.keys import public_jwks
from sandbox.staff_oidc import STAFF_PATH, StaffOidcConfig, StaffOpenIDProvider, staff_routes

__all__ = [
    "DEMO_CLIENT_ID",
    "AuthServerConfig",
    "ClientRegistration",
    "Misbehaviour",
    "SmartAuthorizationServer",
    "create_auth_app",
    "demo_client",
    "smart_configuration",
]

SMART_CAPABILITIES = [
    "launch-ehr",
    "launch-standalone",
    "client-public",
    "client-confidential-symmetric",
    "client-confidential-asymmetric",
    "context-ehr-patient",
    "context-ehr-encounter",
    "context-standalone-patient",
    "permission-v1",
    "permission-v2",
    "permission-patient",
    "permission-user",
    "permission-offline",
    "permission-online",
    "sso-openid-connect",
    "context-banner",
    "context-style",
    "authorize-post",
]
SCOPES_SUPPORTED = [
    "openid",
    "fhirUser",
    "profile",
    "launch",
    "launch/patient",
    "launch/encounter",
    "offline_access",
    "online_access",
    "patient/*.rs",
    "patient/*.cruds",
    "user/*.rs",
    "user/*.cruds",
    "system/*.rs",
    "patient/*.read",
    "patient/*.*",
    "user/*.read",
    "user/*.*",
    "system/*.read",
]
STYLE = {
    "color_background": "#f5f7fa",
    "color_error": "#a61b1b",
    "color_highlight": "#0b5cad",
    "color_modal_backdrop": "rgba(31, 41, 51, 0.5)",
    "color_success": "#1d7a46",
    "color_text": "#1f2933",
    "dim_border_radius": "6px",
    "dim_font_size": "16px",
    "dim_spacing_size": "16px",
    "font_family_body": 'system-ui, -apple-system, "Segoe UI", Roboto, sans-serif',
    "font_family_heading": 'system-ui, -apple-system, "Segoe UI", Roboto, sans-serif',
}
# Public, non-secret documents other origins (the app's browser code) may fetch.
PUBLIC_HEADERS = {"Access-Control-Allow-Origin": "*", "Cache-Control": "no-cache"}


def smart_configuration(config: AuthServerConfig) -> dict[str, Any]:
    """The `.well-known/smart-configuration` document, honouring the discovery misbehaviour switches."""
    switches = config.misbehave
    token_endpoint = FOREIGN_TOKEN_ENDPOINT if switches.foreign_token_endpoint else config.token_endpoint
    return {
        "issuer": FOREIGN_ISSUER if switches.foreign_issuer else config.issuer,
        "jwks_uri": config.jwks_uri,
        "authorization_endpoint": config.authorization_endpoint,
        "token_endpoint": token_endpoint,
        "introspection_endpoint": config.introspection_endpoint,
        "grant_types_supported": ["authorization_code", "refresh_token", "client_credentials"],
        "scopes_supported": SCOPES_SUPPORTED,
        "response_types_supported": ["code"],
        "code_challenge_methods_supported": ["S256"],
        "token_endpoint_auth_methods_supported": ["none", "client_secret_basic", "private_key_jwt"],
        "token_endpoint_auth_signing_alg_values_supported": ["RS384", "ES384"],
        "capabilities": SMART_CAPABILITIES,
    }


def openid_configuration(config: AuthServerConfig) -> dict[str, Any]:
    """OpenID Provider metadata (same endpoints), for clients that log users in with plain OIDC."""
    document = smart_configuration(config)
    document.update(
        {
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["RS256"],
            "claims_supported": ["iss", "sub", "aud", "exp", "iat", "auth_time", "nonce", "fhirUser"],
        }
    )
    return document


def create_auth_app(config: AuthServerConfig, *, staff: StaffOidcConfig | None = None) -> Starlette:
    """Build the authorization server, EHR page and staff OpenID Provider (`app.state.server`, `.staff`)."""
    if not any(client.client_id == DEMO_CLIENT_ID for client in config.clients):
        config.clients = [*config.clients, demo_client()]
    directory = load_directory(config.data_file)
    server = SmartAuthorizationServer(config=config, store=AuthStore(), directory=directory)

    async def smart_config(request: Request) -> Response:
        return JSONResponse(smart_configuration(config), headers=PUBLIC_HEADERS)

    async def openid_config(request: Request) -> Response:
        return JSONResponse(openid_configuration(config), headers=PUBLIC_HEADERS)

    async def jwks(request: Request) -> Response:
        return JSONResponse(public_jwks(config.signing_key), headers=PUBLIC_HEADERS)

    async def style(request: Request) -> Response:
        return JSONResponse(STYLE, headers=PUBLIC_HEADERS)

    async def authorize(request: Request) -> Response:
        oauth_request = await _oauth_request(request)
        try:
            grant = server.get_consent_grant(oauth_request)
        except OAuth2Error as error:
            return _authorize_error(request, server, oauth_request, error)
        context = oauth_request.smart_context
        if context is None:
            return _patient_picker(request, server, oauth_request)
        _status, body, headers = server.create_authorization_response(
            request=oauth_request, grant_user=context, grant=grant
        )
        location = dict(headers).get("Location")
        if location:
            return RedirectResponse(location, status_code=302, headers={"Cache-Control": "no-store"})
        # Only reachable when the launch expired between the two validations: no redirect target is known.
        shown = {"error": body.get("error"), "description": body.get("error_description")}
        return TEMPLATES.TemplateResponse(request, "error.html", shown, status_code=400)

    async def token(request: Request) -> Response:
        oauth_request = await _oauth_request(request)
        status, body, headers = server.create_token_response(oauth_request)
        return JSONResponse(body, status_code=status, headers=dict(headers))

    async def introspect(request: Request) -> Response:
        # RFC 7662 wants an authenticated caller; on this loopback-only sandbox any caller may ask.
        form = await request.form()
        answer = _introspect(server, str(form.get("token") or ""))
        return JSONResponse(answer, headers={"Cache-Control": "no-store"})

    async def home(request: Request) -> Response:
        return RedirectResponse(config.ehr_url, status_code=302)

    routes = [
        Route("/", home),
        Route("/.well-known/smart-configuration", smart_config),
        Route("/.well-known/openid-configuration", openid_config),
        Route("/jwks.json", jwks),
        Route("/smart-style.json", style),
        Route("/authorize", authorize, methods=["GET", "POST"]),
        Route("/token", token, methods=["POST"]),
        Route("/introspect", introspect, methods=["POST"]),
        *ehr_routes(server),
        *chart_routes(server, TEMPLATES),
    ]
    staff_provider = StaffOpenIDProvider(staff or StaffOidcConfig(issuer=f"{config.issuer}{STAFF_PATH}"))
    app = Starlette(routes=[*routes, Mount(STAFF_PATH, routes=staff_routes(staff_provider, TEMPLATES))])
    app.state.server = server
    app.state.staff = staff_provider
    return app


async def _oauth_request(request: Request) -> FormOAuth2Request:
    form_items: list[tuple[str, str]] = []
    if request.method == "POST":
        form = await request.form()
        form_items = [(key, value) for key, value in form.multi_items() if isinstance(value, str)]
    return FormOAuth2Request(
        method=request.method,
        uri=str(request.url),
        headers=request.headers,
        query=list(request.query_params.multi_items()),
        form=form_items,
    )


def _authorize_error(
    request: Request, server: SmartAuthorizationServer, oauth_request: FormOAuth2Request, error: OAuth2Error
) -> Response:
    if error.redirect_uri:
        # The client and its redirect URI are known good: tell the client (error, description, state).
        error.state = oauth_request.payload.state
        _status, _body, headers = server.handle_error_response(oauth_request, error)
        location = dict(headers)["Location"]
        return RedirectResponse(location, status_code=302, headers={"Cache-Control": "no-store"})
    # Unknown client or redirect URI: never redirect to an unverified address (RFC 6749 §4.1.2.1).
    context = {"error": error.error, "description": error.description}
    return TEMPLATES.TemplateResponse(request, "error.html", context, status_code=400)


def _patient_picker(
    request: Request, server: SmartAuthorizationServer, oauth_request: FormOAuth2Request
) -> Response:
    params = [(key, value) for key, values in oauth_request.payload.datalist.items() for value in values]
    context = {
        "patients": server.directory.patients,
        "params": [(key, value) for key, value in params if key != "selected_patient"],
        "authorize_action": server.config.authorization_endpoint,
    }
    no_store = {"Cache-Control": "no-store"}
    return TEMPLATES.TemplateResponse(request, "pick_patient.html", context, headers=no_store)


def _introspect(server: SmartAuthorizationServer, token: str) -> dict[str, Any]:
    """RFC 7662 answer for an access token (a JWT of ours) or a refresh token."""
    inactive = {"active": False}
    if not token:
        return inactive
    refresh = server.store.get_refresh(token)
    if refresh is not None:
        if refresh.is_revoked() or refresh.is_expired():
            return inactive
        return {"active": True, "token_type": "refresh_token", "client_id": refresh.client_id}
    try:
        claims = jwt.decode(token, server.config.signing_key, algorithms=["RS256"]).claims
    except (JoseError, ValueError):
        return inactive
    record = server.store.get_access(str(claims.get("jti", "")))
    if record is None or record.revoked or time.time() >= record.expires_at:
        return inactive
    return {"active": True, "token_type": "Bearer", **record.claims}
