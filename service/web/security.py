"""Security headers, session cookies and CSRF for pages that live inside an EHR iframe."""

from __future__ import annotations

import secrets
from collections.abc import Callable
from urllib.parse import urlsplit

import structlog
from fastapi import Request, Response
from fastapi.responses import HTMLResponse
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.settings import Settings
from service.web.errors import API_PREFIX, AppError, ErrorCode, error_json

log = structlog.get_logger("carecanvas.web")

SECURE_COOKIE_NAME = "__Host-carecanvas"
LOOPBACK_COOKIE_NAME = "carecanvas_session"
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
# Sec-Fetch-Site values a state-changing request may carry: our own pages, or typed by the user.
ALLOWED_FETCH_SITES = frozenset({"same-origin", "none"})


def app_origin(settings: Settings) -> str:
    parts = urlsplit(settings.public_url)
    return f"{parts.scheme}://{parts.netloc}".lower()


def cross_site_reason(request: Request, settings: Settings) -> str | None:
    """Why a state-changing request looks cross-site (None when it does not).

    Browsers send Sec-Fetch-Site on every request, and it is authoritative when present. Origin is
    checked too, except that our pages' `Referrer-Policy: no-referrer` makes browsers send `Origin: null`
    on their own POSTs (Fetch standard), so "null" is accepted only when Sec-Fetch-Site says same-origin.
    A request with neither header (a script, curl) still has to carry the session's CSRF token, which
    the routes check.
    """
    if request.method not in UNSAFE_METHODS:
        return None
    if request.url.path.startswith("/api/") and request.headers.get("authorization", "").startswith(
        "Bearer "
    ):
        # A bearer token is never sent by a browser on its own (unlike a cookie), so such a request cannot be
        # forged by another site; the API checks the token itself.
        return None
    fetch_site = request.headers.get("sec-fetch-site")
    if fetch_site is not None and fetch_site.lower() not in ALLOWED_FETCH_SITES:
        return "sec-fetch-site"
    origin = request.headers.get("origin")
    if origin is None or origin.lower() == app_origin(settings):
        return None
    if origin == "null" and fetch_site is not None and fetch_site.lower() == "same-origin":
        return None
    return "origin"


def cookie_name(settings: Settings) -> str:
    return SECURE_COOKIE_NAME if settings.cookies_secure else LOOPBACK_COOKIE_NAME


def set_session_cookie(
    response: Response, settings: Settings, value: str, *, max_age: int | None = None
) -> None:
    """`__Host-`, Secure, HttpOnly, SameSite=None, Partitioned inside an EHR iframe over HTTPS.

    On plain-http loopback (the demo) browsers drop Secure cookies, so the cookie falls back to
    HttpOnly + SameSite=Lax: the sandbox EHR and the app are the same site (127.0.0.1), so it still
    travels inside the iframe. `max_age` (seconds) defaults to the session's lifetime; a launch in flight
    uses a shorter one.
    """
    max_age = settings.session_minutes * 60 if max_age is None else max_age
    if settings.cookies_secure:
        response.headers.append(
            "Set-Cookie",
            f"{SECURE_COOKIE_NAME}={value}; Path=/; Max-Age={max_age}; "
            "Secure; HttpOnly; SameSite=None; Partitioned",
        )
    else:
        response.set_cookie(
            LOOPBACK_COOKIE_NAME, value, max_age=max_age, path="/", httponly=True, samesite="lax"
        )


def clear_session_cookie(response: Response, settings: Settings) -> None:
    if settings.cookies_secure:
        response.headers.append(
            "Set-Cookie",
            f"{SECURE_COOKIE_NAME}=; Path=/; Max-Age=0; Secure; HttpOnly; SameSite=None; Partitioned",
        )
    else:
        response.delete_cookie(LOOPBACK_COOKIE_NAME, path="/")


def log_cookie_mode(settings: Settings) -> None:
    if not settings.cookies_secure:
        log.warning(
            "plain-http public URL: the session cookie falls back to HttpOnly SameSite=Lax without "
            "Secure/Partitioned (fine on loopback for the demo, never in production)"
        )


class SecurityHeadersMiddleware:
    """CSP with frame-ancestors limited to the registered EHR origins; no sniffing; no referrer leaks.

    Plain ASGI (not Starlette's BaseHTTPMiddleware): the request runs in the caller's task and a streamed
    answer (SSE) goes straight through, instead of through a task group and a memory stream per request.
    """

    def __init__(self, app: ASGIApp, *, frame_origins: Callable[[], list[str]]) -> None:
        self.app = app
        self._frame_origins = frame_origins

    def _headers(self, request_id: str) -> tuple[tuple[str, str], ...]:
        ancestors = " ".join(["'self'", *self._frame_origins()])
        return (
            (
                "Content-Security-Policy",
                "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
                f"connect-src 'self'; form-action 'self'; base-uri 'none'; object-src 'none'; "
                f"frame-ancestors {ancestors}",
            ),
            ("X-Content-Type-Options", "nosniff"),
            ("Referrer-Policy", "no-referrer"),
            ("Cache-Control", "no-store"),
            ("Cross-Origin-Opener-Policy", "same-origin-allow-popups"),
            ("X-Request-Id", request_id),
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = secrets.token_hex(8)
        scope.setdefault("state", {})["request_id"] = request_id
        defaults = self._headers(request_id)

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in defaults:  # a route's own value wins (setdefault)
                    if name not in headers:
                        headers.append(name, value)
            await send(message)

        structlog.contextvars.bind_contextvars(request_id=request_id)
        try:
            request = Request(scope, receive)
            refused = cross_site_reason(request, request.app.state.settings)
            if refused is not None:
                log.warning("cross-site request refused", method=request.method, reason=refused)
                await _cross_site_page(request)(scope, receive, send_with_headers)
            else:
                await self.app(scope, receive, send_with_headers)
        finally:
            structlog.contextvars.unbind_contextvars("request_id")


def _cross_site_page(request: Request) -> Response:
    title = "This request came from another site"
    message = (
        "CareCanvas only accepts changes sent from its own pages. Go back to CareCanvas, reload the page "
        "and try again."
    )
    if request.url.path.startswith(API_PREFIX):
        return error_json(request, AppError(403, title, message, code=ErrorCode.CROSS_SITE))
    services = getattr(request.app.state, "services", None)
    if services is None:
        return HTMLResponse(f"<h1>{title}</h1><p>{message}</p>", status_code=403)
    response: Response = services.templates.TemplateResponse(
        request, "error.html", {"title": title, "message": message, "status": 403}, status_code=403
    )
    return response
