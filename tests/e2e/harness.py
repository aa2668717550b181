"""Runs CareCanvas for a test: a real uvicorn server on a free loopback port, in a thread, stopped on exit."""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import uvicorn

from service.app import create_app
from service.services import Services
from service.settings import Settings


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class RunningApp:
    url: str
    app: Any
    loop: asyncio.AbstractEventLoop

    @property
    def services(self) -> Services:
        return self.app.state.services  # type: ignore[no-any-return]

    def call(self, coroutine: Any, timeout: float = 60) -> Any:
        """Run a coroutine on the app's own event loop (its database engine lives there)."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)


@contextlib.contextmanager
def running_app(settings: Settings, *, port: int) -> Iterator[RunningApp]:
    app = create_app(settings)
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_config=None, access_log=False, lifespan="on"
    )
    server = uvicorn.Server(config)
    loops: list[asyncio.AbstractEventLoop] = []

    def serve() -> None:
        loop = asyncio.new_event_loop()
        loops.append(loop)
        loop.run_until_complete(server.serve())
        loop.close()

    thread = threading.Thread(target=serve, name="carecanvas-test-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("CareCanvas did not start")
        time.sleep(0.05)
    try:
        yield RunningApp(url=f"http://127.0.0.1:{port}", app=app, loop=loops[0])
    finally:
        server.should_exit = True
        thread.join(timeout=30)


CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')
CONDITION = re.compile(r'name="condition_id" value="([^"]+)"')


def csrf_from(html: str) -> str:
    match = CSRF.search(html)
    assert match, "page has no CSRF token"
    return match.group(1)


@contextlib.contextmanager
def launch_session(
    app_url: str,
    sandbox: Any,
    *,
    patient: str = "pat-1",
    practitioner: str = "prac-1",
    encounter: str | None = "enc-1",
) -> Iterator[httpx.Client]:
    """A real EHR launch over HTTP: /launch → authorize → /callback; yields a client holding the session."""
    with httpx.Client(base_url=app_url, follow_redirects=False, timeout=30) as client:
        launch_id = sandbox.create_launch(patient, practitioner, encounter)
        started = client.get("/launch", params={"iss": sandbox.fhir_base, "launch": launch_id})
        assert started.status_code == 302, started.text
        authorized = httpx.get(started.headers["location"], follow_redirects=False, timeout=30)
        assert authorized.status_code in (302, 303), authorized.text
        callback = authorized.headers["location"]
        assert callback.startswith(f"{app_url}/callback")
        finished = client.get(callback.removeprefix(app_url))
        assert finished.status_code == 303, finished.text
        assert finished.headers["location"] == "/app"
        yield client


def wait_for_job(client: httpx.Client, job_id: str, *, timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = client.get(f"/jobs/{job_id}/status").json()
        if status["status"] in {"succeeded", "failed", "quarantined", "cancelled"}:
            return status  # type: ignore[no-any-return]
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} did not finish")


def generate_picture(
    client: httpx.Client, *, style: str = "flat_vector", language: str = "en"
) -> tuple[str, str]:
    """From the workspace of a launched session: a picture for the first active condition, waited for.

    Returns (job id, CSRF token); the job has succeeded.
    """
    workspace = client.get("/app")
    assert workspace.status_code == 200, workspace.text
    csrf = csrf_from(workspace.text)
    conditions = CONDITION.findall(workspace.text)
    assert conditions, "the workspace lists no active condition"
    created = client.post(
        "/illustrations",
        data={"condition_id": conditions[0], "style": style, "language": language, "csrf_token": csrf},
    )
    assert created.status_code == 303, created.text
    job_id = created.headers["location"].rsplit("/", 1)[1]
    finished = wait_for_job(client, job_id)
    assert finished["status"] == "succeeded", finished
    return job_id, csrf


def approve_picture(
    client: httpx.Client,
    job_id: str,
    csrf: str,
    *,
    caption: str = "A picture about your health.",
    alt_text: str = "A test drawing.",
) -> httpx.Response:
    """Approve a generated picture from its review page (writes it back to the EHR); asserts it was saved."""
    saved = client.post(
        f"/review/{job_id}/approve", data={"caption": caption, "alt_text": alt_text, "csrf_token": csrf}
    )
    assert saved.status_code == 200, saved.text
    return saved
