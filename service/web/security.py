"""Security headers, session cookies and CSRF for pages that live inside an EHR iframe."""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable

import structlog
from fastapi import Request, Response
from starlette.middleware.base import BaseHTTPMiddleware

from service.settings import Settings

log = structlog.get_logger("carecanvas.web")

SECURE_COOKIE_NAME = "__Host-carecanvas"
LOOPBACK_COOKIE_NAME = "carecanvas_session"


def cookie_name(settings: Settings) -> str:
    return SECURE_COOKIE_NAME if settings.cookies_secure else LOOPBACK_COOKIE_NAME


def set_session_cookie(response: Response, settings: Settings, value: str) -> None:
    """`__Host-`, Secure, HttpOnly, SameSite=None, Partitioned inside an EHR iframe over HTTPS.

    On plain-http loopback (the demo) browsers drop Secure cookies, so the cookie falls back to
    HttpOnly + SameSite=Lax: the sandbox EHR and the app are the same site (127.0.0.1), so it still
    travels inside the iframe.
    """
    max_age = settings.session_minutes * 60
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


class SecurityHeadersMiddleware(BaseHTTPMiddleware):
    """CSP with frame-ancestors limited to the registered EHR origins; no sniffing; no referrer leaks."""

    def __init__(self, app: object, *, frame_origins: Callable[[], list[str]]) -> None:
        super().__init__(app)  # type: ignore[arg-type]
        self._frame_origins = frame_origins

    async def dispatch(
        self, request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        request.state.request_id = secrets.token_hex(8)
        structlog.contextvars.bind_contextvars(request_id=request.state.request_id)
        try:
            response = await call_next(request)
        finally:
            structlog.contextvars.unbind_contextvars("request_id")
        ancestors = " ".join(["'self'", *self._frame_origins()])
        response.headers.setdefault(
            "Content-Security-Policy",
            "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
            f"connect-src 'self'; form-action 'self'; base-uri 'none'; object-src 'none'; "
            f"frame-ancestors {ancestors}",
        )
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "no-referrer")
        response.headers.setdefault("Cache-Control", "no-store")
        response.headers.setdefault("Cross-Origin-Opener-Policy", "same-origin-allow-popups")
        response.headers.setdefault("X-Request-Id", request.state.request_id)
        return response
