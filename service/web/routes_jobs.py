"""Job progress: a page that follows the job over Server-Sent Events, a JSON status, and cancel."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.sse import EventSourceResponse

from service.web.context import ClinicianContext
from service.workflows.jobs import JobProgress, follow

router = APIRouter()


async def job_progress(job_id: str, ctx: ClinicianContext) -> JobProgress:
    """This session's job (404 for anyone else's), resolved before any page or stream starts."""
    return await ctx.owned_job(job_id)


OwnedJob = Annotated[JobProgress, Depends(job_progress)]


@router.get("/jobs/{job_id}", response_class=HTMLResponse)
async def job_page(request: Request, job: OwnedJob, ctx: ClinicianContext) -> Response:
    return ctx.services.templates.TemplateResponse(
        request,
        "job.html",
        {"job_id": job.job_id, "job": job, "csrf_token": ctx.csrf_token, "banner": ctx.session.data.banner},
    )


@router.get("/jobs/{job_id}/status")
async def job_status(job: OwnedJob) -> Response:
    return JSONResponse(job.to_dict())


@router.get("/jobs/{job_id}/events", response_class=EventSourceResponse)
async def job_events(job: OwnedJob, ctx: ClinicianContext) -> AsyncIterator[dict[str, object]]:
    async for progress in follow(ctx.services.queue, session_id_hash=ctx.session.id_hash, first=job):
        yield progress.to_dict()


@router.post("/jobs/{job_id}/cancel")
async def cancel_job(job: OwnedJob, ctx: ClinicianContext) -> Response:
    """Cancel a queued job at once, or ask its worker to stop between steps; back to the job page."""
    await ctx.services.queue.request_cancel(job.job_id)
    return RedirectResponse(f"/jobs/{job.job_id}", status_code=303)
