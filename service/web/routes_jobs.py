"""Job progress: a page that follows the job over Server-Sent Events, and a JSON status for scripts."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response, StreamingResponse

from service.app import Services
from service.sessions import WebSession
from service.web.deps import ServicesDep, WebSessionDep
from service.web.errors import PageError

router = APIRouter()

FINAL_STATUSES = frozenset({"succeeded", "failed", "cancelled", "quarantined"})
SSE_POLL_SECONDS = 0.25
SSE_MAX_SECONDS = 600


async def owned_job_status(services: Services, session: WebSession, job_id: str) -> dict[str, object]:
    """A job is visible only to the session that started it (job ids are not secrets)."""
    job = await services.queue.get(job_id)
    if job is None or job.session_id_hash != session.id_hash:
        raise PageError(
            404, "No such illustration", "It may belong to another session. Start from the workspace."
        )
    return {
        "status": job.status,
        "step": job.progress_step or 0,
        "total": job.progress_total or 0,
        "error": job.error if job.status in {"failed", "quarantined"} else None,
    }


@router.get("/jobs/{job_id}", response_class=HTMLResponse)
async def job_page(request: Request, job_id: str, services: ServicesDep, session: WebSessionDep) -> Response:
    status = await owned_job_status(services, session, job_id)
    return services.templates.TemplateResponse(
        request,
        "job.html",
        {
            "job_id": job_id,
            "job": status,
            "csrf_token": session.csrf_token,
            "banner": session.data.get("banner"),
        },
    )


@router.get("/jobs/{job_id}/status")
async def job_status(job_id: str, services: ServicesDep, session: WebSessionDep) -> Response:
    return JSONResponse(await owned_job_status(services, session, job_id))


@router.get("/jobs/{job_id}/events")
async def job_events(job_id: str, services: ServicesDep, session: WebSessionDep) -> StreamingResponse:
    await owned_job_status(services, session, job_id)  # 404 before the stream starts

    async def stream() -> AsyncIterator[str]:
        last: dict[str, object] | None = None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + SSE_MAX_SECONDS
        while loop.time() < deadline:
            status = await owned_job_status(services, session, job_id)
            if status != last:
                yield f"data: {json.dumps(status)}\n\n"
                last = status
            if status["status"] in FINAL_STATUSES:
                return
            await asyncio.sleep(SSE_POLL_SECONDS)

    return StreamingResponse(stream(), media_type="text/event-stream", headers={"X-Accel-Buffering": "no"})


@router.post("/jobs/{job_id}/cancel")
async def cancel_job(
    request: Request, job_id: str, services: ServicesDep, session: WebSessionDep
) -> Response:
    """Cancel a queued job at once, or ask its worker to stop between steps; back to the job page."""
    form = await request.form()
    if not session.csrf_matches(str(form.get("csrf_token", ""))):
        raise PageError(403, "This form has expired", "Please reload the page and try again.")
    await owned_job_status(services, session, job_id)
    await services.queue.request_cancel(job_id)
    return RedirectResponse(f"/jobs/{job_id}", status_code=303)
