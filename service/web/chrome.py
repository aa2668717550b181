"""What every clinician page shows around its content: the patient banner, the visit line, the CSRF token."""

from __future__ import annotations

from typing import Any

from service.web.context import RequestContext


def clinician_chrome(ctx: RequestContext) -> dict[str, Any]:
    """The banner and visit kept in the session by the workspace (the same on every page)."""
    data = ctx.session.data
    return {"banner": data.banner, "encounter": data.visit, "csrf_token": ctx.csrf_token}
