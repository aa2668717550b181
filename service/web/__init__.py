"""The web layer: thin FastAPI routes over the workflows, server-rendered pages."""

from __future__ import annotations

from fastapi import FastAPI

from service.ehrs import EhrRegistry
from service.settings import Settings
from service.web import (
    routes_compliance,
    routes_documents,
    routes_home,
    routes_jobs,
    routes_jwks,
    routes_launch,
    routes_ops,
    routes_portal,
    routes_portrait,
    routes_review,
    routes_reviewer,
    routes_workspace,
)
from service.web.context import error_page_extras
from service.web.errors import install_error_pages
from service.web.security import SecurityHeadersMiddleware, log_cookie_mode

ROUTERS = (
    routes_home,
    routes_launch,
    routes_jwks,
    routes_portal,
    routes_workspace,
    routes_jobs,
    routes_review,
    routes_documents,
    routes_portrait,
    routes_reviewer,
    routes_ops,
    routes_compliance,
)


def install_routes(app: FastAPI, settings: Settings, registry: EhrRegistry) -> None:
    frame_origins = registry.frame_origins()
    app.add_middleware(SecurityHeadersMiddleware, frame_origins=lambda: frame_origins)
    install_error_pages(app, page_extras=error_page_extras)
    for module in ROUTERS:
        app.include_router(module.router)
    log_cookie_mode(settings)
