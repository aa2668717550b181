"""The front door: `/` leads to a landing page that says where each user opens CareCanvas; a favicon;
axe-core on it at phone and desktop sizes."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from harness import AXE, RunningApp, launch_chromium, new_page, no_sideways_scroll, serious_violations
from playwright.sync_api import expect, sync_playwright

from sandbox.run import SandboxEHR
from service.cli import with_demo_reviewers

SCREENSHOTS = Path(__file__).resolve().parents[2] / "docs" / "screenshots"


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


@pytest.mark.browser
@pytest.mark.slow
@pytest.mark.parametrize(("width", "height"), [(390, 844), (1280, 800)])
def test_the_landing_page_passes_axe_on_a_phone_and_a_desktop(
    carecanvas: RunningApp, sandbox: SandboxEHR, monkeypatch: pytest.MonkeyPatch, width: int, height: int
) -> None:
    assert AXE.exists(), "axe-core is missing: run scripts/bootstrap"
    with sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        try:
            # bypass_csp only so axe-core can be injected; the page itself runs under the real CSP.
            page = new_page(browser, width=width, height=height)
            page.goto(carecanvas.url)  # the printed address: / leads here
            page.wait_for_url(f"{carecanvas.url}/welcome")
            expect(page.get_by_test_id("welcome")).to_be_visible()
            expect(page.get_by_role("link", name="sign in to the compliance console")).to_be_visible()
            assert no_sideways_scroll(page)
            assert serious_violations(page) == []
            expect(page.get_by_test_id("reviewer-link")).to_have_count(0)  # no staff reviewer roles here
            # As `carecanvas demo` shows it: with the link to its sandbox EHR inside the notice, and its
            # staff portrait reviewers (with_demo_reviewers) the way to the review queue.
            monkeypatch.setattr(carecanvas.services.settings, "demo_ehr_url", sandbox.ehr_url)
            monkeypatch.setattr(
                carecanvas.services.settings,
                "staff_oidc",
                with_demo_reviewers(carecanvas.services.settings).staff_oidc,
            )
            page.reload()
            demo = page.get_by_test_id("demo-ehr")
            expect(demo.get_by_role("link", name="sandbox EHR")).to_have_attribute("href", sandbox.ehr_url)
            expect(page.get_by_test_id("reviewer-link")).to_have_attribute("href", "/reviewer")
            assert no_sideways_scroll(page)
            assert serious_violations(page) == []
            if width == 1280:
                SCREENSHOTS.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(SCREENSHOTS / "landing.png"))
        finally:
            browser.close()
