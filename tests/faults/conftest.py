"""Fault-test bed, built once: a private PostgreSQL cluster, a data dir with keys and the tiny model."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from faults_harness import FaultBed, PrivatePostgres, private_postgres

from service.audit.signing_key import generate_signing_key
from service.crypto.keyring import LocalKeyFileProvider
from service.db.engine import migrate
from service.generation.tiny import build_tiny_pipeline
from service.services import Services, build_services
from service.settings import Settings


@pytest.fixture(scope="session")
def fault_postgres() -> Iterator[PrivatePostgres]:
    with private_postgres() as cluster:
        yield cluster


async def prepared_services(data_dir: Path, database_url: str) -> Services:
    """Keys (made by build_services) and the tiny model exist before any worker starts: none races to."""
    settings = Settings(data_dir=data_dir, database_url=database_url, device="cpu")
    # What `carecanvas keys generate` and `carecanvas audit keygen` do for a new PostgreSQL installation.
    LocalKeyFileProvider.generate(settings.resolved_kek_file)
    generate_signing_key(settings.resolved_audit_signing_key_file)
    services = await build_services(settings)
    build_tiny_pipeline(settings.tiny_model_dir)
    return services


@pytest.fixture(scope="session")
async def fault_bed(
    fault_postgres: PrivatePostgres, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[FaultBed]:
    data_dir = tmp_path_factory.mktemp("fault-data")
    await migrate(fault_postgres.url)
    services = await prepared_services(data_dir, fault_postgres.url)
    try:
        yield FaultBed(
            postgres=fault_postgres,
            data_dir=data_dir,
            services=services,
            logs=tmp_path_factory.mktemp("fault-logs"),
        )
    finally:
        await services.aclose()
