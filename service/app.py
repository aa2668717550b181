"""The composition root: `create_app(settings)` wires storage, keys, audit, FHIR, generation and the web."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import structlog
from fastapi import Depends, FastAPI, Request
from fastapi.staticfiles import StaticFiles

from service.api import install_api
from service.ehrs import EhrRegistry
from service.generation import readability
from service.logging import bind_path_fields
from service.metrics import record_checkpoint_round
from service.services import Services, build_services
from service.sessions import sweep_expired
from service.settings import Settings
from service.web import install_routes
from service.web.rate_limit import RateLimitMiddleware, too_many_jobs
from service.workflows.job_caps import TooManyJobsError

log = structlog.get_logger("carecanvas.app")

STATIC_DIR = Path(__file__).resolve().parent / "web" / "static"


async def checkpoint_periodically(
    services: Services, stop: asyncio.Event, *, every_seconds: float = 5.0
) -> None:
    """Signed checkpoints of the audit head go to a sink outside the database, so a cut tail is detected."""
    while True:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=every_seconds)
        try:
            async with services.sessionmaker() as db:
                await services.audit.maybe_checkpoint(db, every=1)
            if services.audit.checkpoints_enabled:
                record_checkpoint_round(ok=True)
        except Exception as error:  # a failed checkpoint must not stop the app; the next one retries
            record_checkpoint_round(ok=False)
            log.warning("audit checkpoint failed", error_type=type(error).__name__)
        if stop.is_set():
            return


async def sweep_periodically(services: Services, stop: asyncio.Event, *, every_seconds: float) -> None:
    """Expired sessions and spent launch states are deleted at start and then every `every_seconds`."""
    while not stop.is_set():
        try:
            async with services.sessionmaker() as db:
                await sweep_expired(db)
        except Exception as error:  # a failed sweep must not stop the app; the next one retries
            log.warning("session sweep failed", error_type=type(error).__name__)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=every_seconds)


async def _start_embedded_worker(services: Services, stop: asyncio.Event) -> asyncio.Task[None]:
    # Only embedded mode runs a pipeline in this process: the import (torch, diffusers) happens here, so a
    # `carecanvas serve` process never loads them.
    from service.runtime import start_embedded_worker

    return await start_embedded_worker(services, stop)


async def _log_fields(request: Request) -> None:
    # Async, so it runs in the request's own task: what it binds reaches every log line of the route.
    bind_path_fields(request.path_params)


def create_app(settings: Settings) -> FastAPI:
    """One app per settings object; the embedded worker starts with it when configured."""
    # Built once here (signing keys load once) and handed to both the web layer and the services.
    registry = EhrRegistry.from_settings(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        services = await build_services(settings, ehrs=registry)
        app.state.services = services
        # The reading-grade dictionaries load here, not inside the first request that grades a caption
        # (0.5-1 s with the event loop blocked, every request queued behind it).
        await asyncio.to_thread(readability.warm_up)
        stop = asyncio.Event()
        worker_task = await _start_embedded_worker(services, stop) if settings.embedded_worker else None
        checkpoints = asyncio.create_task(checkpoint_periodically(services, stop), name="audit-checkpoints")
        sweeps = (
            asyncio.create_task(
                sweep_periodically(services, stop, every_seconds=settings.session_sweep_seconds),
                name="session-sweeps",
            )
            if settings.session_sweep_seconds > 0
            else None
        )
        log.info("carecanvas ready")
        try:
            yield
        finally:
            stop.set()
            if worker_task is not None:
                await worker_task
            await checkpoints
            if sweeps is not None:
                await sweeps
            await services.aclose()

    app = FastAPI(
        title="CareCanvas",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        dependencies=[Depends(_log_fields)],
    )
    app.state.settings = settings
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    # Added before the web's middleware, so it runs inside the security headers (a 429 carries the CSP).
    app.add_middleware(RateLimitMiddleware, settings=settings)
    install_routes(app, settings, registry)
    install_api(app, settings)
    app.add_exception_handler(TooManyJobsError, too_many_jobs)
    return app
