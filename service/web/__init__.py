"""The web layer: thin FastAPI routes over the workflows, server-rendered pages."""

from __future__ import annotations

from fastapi import FastAPI

from service.settings import Settings
from service.web.errors import install_error_pages
from service.web.security import SecurityHeadersMiddleware, log_cookie_mode


def install_routes(app: FastAPI, settings: Settings) -> None:
    from service.ehrs import EhrRegistry
    from service.web import (
        routes_jobs,
        routes_jwks,
        routes_launch,
        routes_ops,
        routes_portal,
        routes_review,
        routes_workspace,
    )

    registry = EhrRegistry.from_settings(settings)
    frame_origins = registry.frame_origins()
    app.add_middleware(SecurityHeadersMiddleware, frame_origins=lambda: frame_origins)
    install_error_pages(app)
    routers = (routes_launch, routes_jwks, routes_portal, routes_workspace, routes_jobs, routes_review)
    for module in (*routers, routes_ops):
        app.include_router(module.router)
    app.include_router(__import__("service.web.routes_portrait", fromlist=["router"]).router)
    log_cookie_mode(settings)
