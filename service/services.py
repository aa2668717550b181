"""What a request or the worker needs, built once per process: `Services` and `build_services(settings)`.

This module sits low on purpose: the web layer, the JSON API, the runtime and the CLI import it; it imports
none of them (the composition root `service.app` wires the web on top). It never imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
from fastapi.templating import Jinja2Templates
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from fhir_adapters import fhir_pool
from service import images
from service.audit import AuditLog
from service.crypto import Keyring
from service.db.engine import make_read_sessionmaker
from service.db.group_commit import GroupCommit
from service.ehr_profile import EhrProfiles
from service.ehrs import EhrRegistry
from service.generation.models import ModelRegistry
from service.generation.prompts import PromptLibrary, load_prompt_library
from service.jobs import TERMINAL_STATUSES, JobQueue, JobStatus
from service.metrics import metered_fhir_transport
from service.sessions import SessionStore
from service.settings import EhrSettings, Settings
from service.stores import open_audit_log, open_database, open_keyring

PROJECT_ROOT = Path(__file__).resolve().parent.parent
TEMPLATES_DIR = PROJECT_ROOT / "templates"
USER_AGENT = "CareCanvas/0.1"


def make_http_client(*, max_connections: int = 10, pool_wait_seconds: float = 5.0) -> httpx.AsyncClient:
    """For SMART discovery and token calls: TLS verified, redirects never followed, short timeouts."""
    return httpx.AsyncClient(
        follow_redirects=False,
        verify=True,
        timeout=httpx.Timeout(10.0, connect=5.0, pool=pool_wait_seconds),
        limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
        headers={"User-Agent": USER_AGENT},
        trust_env=False,
    )


@dataclass
class EhrPools:
    """The connection pools of one registered EHR, for the life of the app."""

    smart: httpx.AsyncClient
    fhir: httpx.AsyncClient


class EhrConnections:
    """One pool per registered EHR (SMART and FHIR), each with its own limit and wait timeout.

    A slow EHR fills only its own pool, so launches at another EHR never wait behind it. Pools are built
    once: a verifying httpx client loads the CA bundle each time it is built (~21 ms of blocked loop).
    """

    def __init__(self, ehrs: list[EhrSettings]) -> None:
        self._pools = {ehr.name: self._pools_for(ehr) for ehr in ehrs}

    @staticmethod
    def _pools_for(ehr: EhrSettings) -> EhrPools:
        timeout = httpx.Timeout(10.0, connect=5.0, pool=ehr.pool_wait_seconds)
        return EhrPools(
            smart=make_http_client(
                max_connections=ehr.max_connections, pool_wait_seconds=ehr.pool_wait_seconds
            ),
            # Metered: FHIR latency and errors by EHR (service.metrics), counted at the pool's transport.
            fhir=fhir_pool(
                timeout=timeout,
                max_connections=ehr.max_connections,
                transport=metered_fhir_transport(ehr.name, max_connections=ehr.max_connections),
            ),
        )

    def smart(self, ehr_name: str) -> httpx.AsyncClient:
        return self._pools[ehr_name].smart

    def fhir(self, ehr_name: str) -> httpx.AsyncClient:
        return self._pools[ehr_name].fhir

    def all_clients(self) -> list[httpx.AsyncClient]:
        return [client for pools in self._pools.values() for client in (pools.smart, pools.fhir)]

    async def aclose(self) -> None:
        for client in self.all_clients():
            await client.aclose()


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
    connections: EhrConnections
    # Outbound calls that belong to no registered EHR (the staff identity provider, for one).
    http: httpx.AsyncClient
    sessions: SessionStore
    profiles: EhrProfiles = field(default_factory=EhrProfiles)
    # None in production; tests may route FHIR calls through a transport that fakes 5xx/429 answers.
    fhir_transport: httpx.AsyncBaseTransport | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    # Sessions that only read (on SQLite a query_only pool that never waits for the writer lock).
    read_sessionmaker: async_sessionmaker[AsyncSession] | None = None
    # Short write units of concurrent requests in shared transactions (service.db.group_commit).
    _group_commit: GroupCommit | None = field(default=None, repr=False)

    @property
    def group_commit(self) -> GroupCommit:
        """The app's one group commit on the writing sessionmaker (made on first use)."""
        if self._group_commit is None:
            self._group_commit = GroupCommit(self.sessionmaker)
        return self._group_commit

    def read_sessions(self) -> async_sessionmaker[AsyncSession]:
        """For read-only work; the writing sessionmaker where none was given (services built by hand)."""
        return self.read_sessionmaker or self.sessionmaker

    async def aclose(self) -> None:
        if self._group_commit is not None:
            await self._group_commit.aclose()
        await self.queue.watch.aclose()
        await self.connections.aclose()
        await self.http.aclose()
        await self.engine.dispose()


def make_templates() -> Jinja2Templates:
    """The page templates, with the enums they compare against (never copies of their values)."""
    templates = Jinja2Templates(directory=TEMPLATES_DIR / "web")
    templates.env.globals.update(
        JobStatus=JobStatus,
        final_statuses=" ".join(sorted(status.value for status in TERMINAL_STATUSES)),
    )
    return templates


async def build_services(settings: Settings, *, ehrs: EhrRegistry | None = None) -> Services:
    """The one place the concrete stores, registries and pools are built (signing keys load once)."""
    images.set_max_pixels(settings.max_image_pixels)  # the pixel cap for every image this process decodes
    engine, sessionmaker = await open_database(settings)
    keyring = open_keyring(settings)
    registry = ehrs or EhrRegistry.from_settings(settings)
    read_sessionmaker = make_read_sessionmaker(engine)
    return Services(
        settings=settings,
        engine=engine,
        sessionmaker=sessionmaker,
        read_sessionmaker=read_sessionmaker,
        keyring=keyring,
        audit=open_audit_log(settings, keyring=keyring),
        queue=JobQueue(
            sessionmaker,
            keyring,
            lease_seconds=settings.job_lease_seconds,
            max_attempts=settings.job_max_attempts,
            read_sessionmaker=read_sessionmaker,
        ),
        ehrs=registry,
        models=ModelRegistry.from_dicts(settings.model_entries()),
        prompts=load_prompt_library(TEMPLATES_DIR / "prompts"),
        templates=make_templates(),
        connections=EhrConnections(registry.all()),
        http=make_http_client(),
        sessions=SessionStore(keyring=keyring, lifetime=timedelta(minutes=settings.session_minutes)),
        profiles=EhrProfiles(max_age_seconds=settings.capabilities_max_age_seconds),
    )
