"""Fixtures for the JSON API: the sandbox EHR, CareCanvas on embedded defaults, sessions and EHR tokens."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "e2e"))

from api_client import ApiSession, bearer_token, cookie_session
from harness import RunningApp, free_port, running_app

from sandbox.run import SandboxEHR
from service.cli import demo_settings
from service.ehrs import origin_of
from service.settings import Settings


@pytest.fixture(scope="session")
def api_port() -> int:
    return free_port()


@pytest.fixture(scope="session")
def sandbox(api_port: int) -> Iterator[SandboxEHR]:
    app_url = f"http://127.0.0.1:{api_port}"
    with SandboxEHR(app_launch_url=f"{app_url}/launch", redirect_uris=[f"{app_url}/callback"]) as ehr:
        yield ehr


@pytest.fixture(scope="session")
def api_settings(sandbox: SandboxEHR, api_port: int, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return demo_settings(
        data_dir=tmp_path_factory.mktemp("carecanvas-api"),
        fhir_base=sandbox.fhir_base,
        auth_base=sandbox.auth_base,
        ehr_origin=origin_of(sandbox.ehr_url),
        port=api_port,
    )


@pytest.fixture(scope="session")
def carecanvas(api_settings: Settings, api_port: int) -> Iterator[RunningApp]:
    with running_app(api_settings, port=api_port) as app:
        yield app


@pytest.fixture(scope="module")
def clinician(carecanvas: RunningApp, sandbox: SandboxEHR) -> Iterator[ApiSession]:
    """A launched clinician session (pat-1, prac-1) with the CSRF token its pages carry."""
    with cookie_session(carecanvas.url, sandbox) as session:
        yield session


@pytest.fixture(scope="module")
def ehr_token(carecanvas: RunningApp, sandbox: SandboxEHR) -> str:
    """A real access token from the sandbox's authorization server for pat-1 and prac-1."""
    return bearer_token(sandbox, carecanvas.url, patient="pat-1")
