"""Readable error pages: what went wrong and what to do, never a stack trace or patient data."""

from __future__ import annotations

import html

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, Response


class PageError(Exception):
    """Raised by routes and dependencies; rendered as templates/web/error.html with the given status."""

    def __init__(self, status: int, title: str, message: str) -> None:
        super().__init__(title)
        self.status = status
        self.title = title
        self.message = message


def install_error_pages(app: FastAPI) -> None:
    @app.exception_handler(PageError)
    async def _page_error(request: Request, error: PageError) -> Response:
        services = getattr(request.app.state, "services", None)
        if services is None:
            page = f"<h1>{html.escape(error.title)}</h1><p>{html.escape(error.message)}</p>"
            return HTMLResponse(page, status_code=error.status)
        return services.templates.TemplateResponse(
            request,
            "error.html",
            {"title": error.title, "message": error.message, "status": error.status},
            status_code=error.status,
        )
