"""Fixtures: the sandbox EHR (real FHIR + SMART servers) and CareCanvas on embedded defaults, on loopback."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import RunningApp, free_port, running_app

from sandbox.run import SandboxEHR
from service.cli import demo_settings
from service.ehrs import origin_of


@pytest.fixture(scope="session")
def app_port() -> int:
    return free_port()


@pytest.fixture(scope="session")
def sandbox(app_port: int) -> Iterator[SandboxEHR]:
    app_url = f"http://127.0.0.1:{app_port}"
    with SandboxEHR(app_launch_url=f"{app_url}/launch", redirect_uris=[f"{app_url}/callback"]) as ehr:
        yield ehr


@pytest.fixture(scope="session")
def carecanvas(
    sandbox: SandboxEHR, app_port: int, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningApp]:
    data_dir: Path = tmp_path_factory.mktemp("carecanvas-data")
    settings = demo_settings(
        data_dir=data_dir,
        fhir_base=sandbox.fhir_base,
        auth_base=sandbox.auth_base,
        ehr_origin=origin_of(sandbox.ehr_url),
        port=app_port,
    ).model_copy(
        update={"portrait_reviewers": {"Practitioner/prac-3": "artist"}}
    )  # Sofia Lopez reviews portraits
    with running_app(settings, port=app_port) as app:
        yield app
