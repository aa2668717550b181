"""The versioned JSON API (`/api/v1`): the second thin face over the same workflows as the pages."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.api.auth import BearerVerifier
from service.api.limits import BodyLimitMiddleware
from service.api.openapi import build_openapi, docs_page
from service.api.routes import API_BASE, router
from service.settings import Settings
from service.web.errors import AppError, ErrorCode, error_json


def _not_routed(request: Request, error: StarletteHTTPException) -> AppError:
    if error.status_code == 405:
        return AppError(
            405, "Method not allowed", "This path does not take that method.", code=ErrorCode.NOT_FOUND
        )
    return AppError(
        error.status_code, "Not found", "There is no such API operation.", code=ErrorCode.NOT_FOUND
    )


def install_api(app: FastAPI, settings: Settings) -> None:
    """Routes, the body cap, the bearer verifier, the OpenAPI document and its docs page."""
    app.include_router(router)
    app.state.api_bearer = BearerVerifier()
    app.add_middleware(BodyLimitMiddleware, prefix=API_BASE + "/")
    cached: dict[str, dict[str, Any]] = {}

    def document() -> dict[str, Any]:
        if "openapi" not in cached:
            cached["openapi"] = build_openapi(settings)
        return cached["openapi"]

    @app.get(f"{API_BASE}/openapi.json", include_in_schema=False)
    async def openapi_json() -> Response:
        return JSONResponse(document())

    @app.get(f"{API_BASE}/docs", include_in_schema=False)
    async def docs() -> Response:
        return HTMLResponse(docs_page(document()))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, error: StarletteHTTPException) -> Response:
        # Unrouted API paths answer in the API's error shape; pages keep FastAPI's default.
        if request.url.path.startswith("/api/"):
            return error_json(request, _not_routed(request, error))
        return await http_exception_handler(request, error)
