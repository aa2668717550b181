"""Runs CareCanvas for a test: a real uvicorn server on a free loopback port, in a thread, stopped on exit.

And the steps the Chromium tests share: the browser, the EHR launch form, the app's frame, axe-core."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from playwright.sync_api import Browser, Frame, Page, Playwright

from sandbox.run import SandboxEHR
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


AXE = Path(__file__).resolve().parent / "node" / "node_modules" / "axe-core" / "axe.min.js"
CHROMIUM_ARGS = [
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
    "--no-first-run",
    *(["--no-sandbox"] if os.geteuid() == 0 else []),
]


def launch_chromium(playwright: Playwright) -> Browser:
    """The system's headless Chromium with the flags every browser test uses."""
    return playwright.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=CHROMIUM_ARGS)


def new_page(browser: Browser, *, width: int = 1280, height: int = 900) -> Page:
    """A page in a new context; bypass_csp only so axe-core can be injected as a script tag (the app's
    CSP, script-src 'self', would block it)."""
    return browser.new_context(bypass_csp=True, viewport={"width": width, "height": height}).new_page()


def launch_in_ehr(page: Page, sandbox: SandboxEHR, patient: str, practitioner: str) -> None:
    """The sandbox EHR's launch form, clicked: CareCanvas opens in the EHR's iframe for this patient."""
    page.goto(sandbox.ehr_url)
    page.get_by_label(patient).check()
    page.get_by_label(re.compile(practitioner)).check()
    page.get_by_role("button", name="Launch CareCanvas").click()


def app_frame(page: Page, app_url: str, path: str) -> Frame:
    """The frame showing the app at `path` (a prefix), waited for up to 30 s."""
    for _ in range(300):
        for frame in page.frames:
            if frame.url.startswith(f"{app_url}{path}"):
                return frame
        page.wait_for_timeout(100)
    raise AssertionError(f"no frame at {path}; frames: {[f.url for f in page.frames]}")


def serious_violations(target: Page | Frame, *, iframes: bool = True) -> list[dict[str, Any]]:
    """axe-core's WCAG 2.1 A/AA (and best-practice) violations of impact serious or critical; with
    `iframes` False in this document alone (a framed app is checked in its own frame)."""
    target.add_script_tag(path=str(AXE))
    result: dict[str, Any] = target.evaluate(
        """async (iframes) => await axe.run(document, {
            runOnly: {type: 'tag', values: ['wcag2a', 'wcag2aa', 'wcag21a', 'wcag21aa', 'best-practice']},
            resultTypes: ['violations'],
            iframes,
        })""",
        iframes,
    )
    return [
        {"id": v["id"], "impact": v["impact"], "nodes": [n["target"] for n in v["nodes"]][:5]}
        for v in result["violations"]
        if v["impact"] in ("serious", "critical")
    ]


def assert_accessible(target: Page | Frame) -> None:
    """No axe-core violation of impact serious or critical."""
    violations = serious_violations(target)
    assert violations == [], f"{target.url}: {violations}"


def no_sideways_scroll(page: Page) -> bool:
    """The page fits the viewport's width (no horizontal scrolling on a phone)."""
    return bool(page.evaluate("document.documentElement.scrollWidth <= window.innerWidth"))


def tab_to(page: Page, target: Page | Frame, name: str, *, limit: int = 60) -> None:
    """Press Tab until the focused element in `target` has text or a label starting with `name` (keyboard)."""
    for _ in range(limit):
        page.keyboard.press("Tab")
        focused = target.evaluate(
            "() => { const e = document.activeElement; if (!e) return '';"
            " const label = e.labels && e.labels[0] ? e.labels[0].textContent : '';"
            " return (e.getAttribute('aria-label') || e.textContent || label || '').trim(); }"
        )
        if focused == name or (name and focused.startswith(name)):
            return
    raise AssertionError(f"Tab never reached {name!r}")
