"""The front door: `/` leads to a landing page that says where each user opens CareCanvas; a favicon."""

from __future__ import annotations

import httpx
from harness import RunningApp


def test_root_leads_to_a_landing_page_not_a_bare_404(carecanvas: RunningApp) -> None:
    with httpx.Client(base_url=carecanvas.url, timeout=30) as client:
        root = client.get("/")
        assert (root.status_code, root.headers["location"]) == (303, "/welcome")
        page = client.get("/welcome")
        assert page.status_code == 200
        assert "Content-Security-Policy" in page.headers
        assert "open a patient's chart in your EHR" in page.text
        assert 'href="/compliance"' in page.text  # the staff console is configured in these settings
        assert 'data-testid="demo-ehr"' not in page.text  # only `carecanvas demo` links its sandbox EHR
        icon = client.get("/favicon.ico")
        assert (icon.status_code, icon.headers["content-type"]) == (200, "image/x-icon")
        assert icon.content[:4] == b"\x00\x00\x01\x00"  # an ICO file
