"""The composition root: `create_app(settings)` wires storage, keys, audit, FHIR, generation and the web."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import structlog
from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from service.audit import AuditLog
from service.crypto import Keyring
from service.ehrs import EhrRegistry
from service.generation.models import ModelRegistry
from service.generation.prompts import PromptLibrary, load_prompt_library
from service.jobs import JobQueue
from service.sessions import SessionStore
from service.settings import Settings
from service.stores import open_audit_log, open_database, open_keyring

log = structlog.get_logger("carecanvas.app")

PROJECT_ROOT = Path(__file__).resolve().parent.parent
TEMPLATES_DIR = PROJECT_ROOT / "templates"
STATIC_DIR = Path(__file__).resolve().parent / "web" / "static"


@dataclass
class Services:
    """Everything a request or the worker needs, built once per app."""

    settings: Settings
    engine: AsyncEngine
    sessionmaker: async_sessionmaker[AsyncSession]
    keyring: Keyring
    audit: AuditLog
    queue: JobQueue
    ehrs: EhrRegistry
    models: ModelRegistry
    prompts: PromptLibrary
    templates: Jinja2Templates
    http: httpx.AsyncClient
    sessions: SessionStore
    # None in production; tests may route FHIR calls through a transport that fakes 5xx/429 answers.
    fhir_transport: httpx.AsyncBaseTransport | None = None
    extras: dict[str, Any] = field(default_factory=dict)


def make_http_client() -> httpx.AsyncClient:
    """For SMART discovery and token calls: TLS verified, redirects never followed, short timeouts."""
    return httpx.AsyncClient(
        follow_redirects=False,
        verify=True,
        timeout=httpx.Timeout(10.0, connect=5.0),
        limits=httpx.Limits(max_connections=10, max_keepalive_connections=5),
        headers={"User-Agent": "CareCanvas/0.1"},
    )


async def build_services(settings: Settings) -> Services:
    engine, sessionmaker = await open_database(settings)
    keyring = open_keyring(settings)
    return Services(
        settings=settings,
        engine=engine,
        sessionmaker=sessionmaker,
        keyring=keyring,
        audit=open_audit_log(settings, keyring=keyring),
        queue=JobQueue(
            sessionmaker,
            keyring,
            lease_seconds=settings.job_lease_seconds,
            max_attempts=settings.job_max_attempts,
        ),
        ehrs=EhrRegistry.from_settings(settings),
        models=ModelRegistry.from_dicts(settings.model_entries()),
        prompts=load_prompt_library(TEMPLATES_DIR / "prompts"),
        templates=Jinja2Templates(directory=TEMPLATES_DIR / "web"),
        http=make_http_client(),
        sessions=SessionStore(keyring=keyring, lifetime=timedelta(minutes=settings.session_minutes)),
    )


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
        except Exception as error:  # a failed checkpoint must not stop the app; the next one retries
            log.warning("audit checkpoint failed", error_type=type(error).__name__)
        if stop.is_set():
            return


def create_app(settings: Settings) -> FastAPI:
    """One app per settings object; the embedded worker starts with it when configured."""
    from service.web import install_routes  # the web layer imports the app's types, not the reverse

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        services = await build_services(settings)
        app.state.services = services
        stop = asyncio.Event()
        worker_task = None
        if settings.embedded_worker:
            from service.runtime import start_embedded_worker

            worker_task = await start_embedded_worker(services, stop)
        checkpoints = asyncio.create_task(checkpoint_periodically(services, stop), name="audit-checkpoints")
        log.info("carecanvas ready")
        try:
            yield
        finally:
            stop.set()
            if worker_task is not None:
                await worker_task
            await checkpoints
            await services.http.aclose()
            await services.engine.dispose()

    app = FastAPI(title="CareCanvas", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.settings = settings
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    install_routes(app, settings)
    return app


async def open_services_for_cli(settings: Settings) -> Services:
    """The CLI uses the same wiring as the app (so `audit verify` sees what the demo wrote)."""
    return await build_services(settings)
