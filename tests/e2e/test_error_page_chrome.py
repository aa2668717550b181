"""A clinician's error page keeps the chrome of their other pages: the patient banner and the way back to the
workspace; a page for an ended session, a patient or nobody shows neither."""

from __future__ import annotations

import re

import httpx
from harness import RunningApp, launch_session

from sandbox.run import SandboxEHR


def banner_of(page: str) -> str | None:
    found = re.search(r'data-testid="patient-name">([^<]+)<', page)
    return found.group(1) if found else None


def test_a_clinicians_error_page_has_the_banner_and_the_way_back(
    sandbox: SandboxEHR, carecanvas: RunningApp
) -> None:
    with launch_session(carecanvas.url, sandbox, patient="pat-1") as client:
        workspace = client.get("/app")
        assert workspace.status_code == 200
        name = banner_of(workspace.text)
        assert name
        missing = client.get("/jobs/00000000-0000-0000-0000-000000000000")
        assert missing.status_code == 404
        assert banner_of(missing.text) == name
        assert 'href="/app" data-testid="back-to-workspace"' in missing.text
        refused = client.get("/reviewer/x")  # not a reviewer: 403, still their page
        assert refused.status_code == 403
        assert banner_of(refused.text) == name


def test_no_banner_without_a_clinician_session(carecanvas: RunningApp) -> None:
    ended = httpx.get(f"{carecanvas.url}/jobs/00000000-0000-0000-0000-000000000000", timeout=30)
    assert ended.status_code == 401
    assert banner_of(ended.text) is None
    assert "back-to-workspace" not in ended.text
    with httpx.Client(base_url=carecanvas.url, timeout=30) as client:
        client.cookies.set("carecanvas_session", "not-a-session")
        forged = client.get("/jobs/00000000-0000-0000-0000-000000000000")
    assert forged.status_code == 401
    assert banner_of(forged.text) is None


async def test_an_error_page_renders_without_extras_when_the_session_cannot_be_read() -> None:
    from types import SimpleNamespace

    from starlette.requests import Request

    from service.web.context import error_page_extras

    def broken_reads():
        raise RuntimeError("database is down")

    services = SimpleNamespace(read_sessions=broken_reads, settings=SimpleNamespace(cookies_secure=False))
    request = Request({"type": "http", "method": "GET", "path": "/jobs/x", "headers": [(b"cookie", b"a=b")]})
    assert await error_page_extras(request, services) == {}  # type: ignore[arg-type]
