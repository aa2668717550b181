"""axe-core on the issue-13 pages no other browser test checks (issue 13: "no serious or critical violation
on any page"): the sandbox EHR page a newcomer opens first, the portrait page of a patient without a story and
a clinician's error page inside the EHR's iframe, and the portal's session-ended and error pages written for a
patient, on a phone and a desktop."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from harness import (
    AXE,
    RunningApp,
    app_frame,
    launch_chromium,
    launch_in_ehr,
    new_page,
    no_sideways_scroll,
    serious_violations,
)
from playwright.sync_api import Frame, Page, expect, sync_playwright

from sandbox.run import SandboxEHR

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def serious(target: Page | Frame) -> list[dict[str, Any]]:
    """Serious or critical violations in this document alone (a framed app is checked in its own frame)."""
    return serious_violations(target, iframes=False)


def test_the_ehr_page_a_storyless_portrait_page_and_a_clinician_error_page_pass_axe(
    sandbox: SandboxEHR, carecanvas: RunningApp
) -> None:
    assert AXE.exists(), "axe-core is missing: run scripts/bootstrap"
    with sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        try:
            page = new_page(browser)
            page.goto(sandbox.ehr_url)
            expect(page.get_by_role("button", name="Launch CareCanvas")).to_be_visible()
            assert serious(page) == [], page.url
            # Daniel Begay has no story in this sandbox: the portrait page offers to gather one.
            launch_in_ehr(page, sandbox, "Daniel Begay", "Alice Chen")
            expect(page.get_by_test_id("chart-link")).to_be_visible()
            assert serious(page) == [], page.url  # the EHR page with CareCanvas in its frame
            app_frame(page, carecanvas.url, "/app").get_by_test_id("portrait-link").first.click()
            portraits = app_frame(page, carecanvas.url, "/portraits")
            expect(portraits.get_by_test_id("no-story")).to_be_visible()
            expect(portraits.get_by_test_id("gather-story")).to_be_visible()
            assert serious(portraits) == [], portraits.url
            # No such portrait: the error page inside the frame, in plain words.
            missing = f"{carecanvas.url}/portraits/drafts/{uuid.uuid4()}"
            portraits.goto(missing)
            error = app_frame(page, carecanvas.url, "/portraits/drafts/")
            expect(error.get_by_role("alert")).to_contain_text("No such portrait for this patient.")
            assert serious(error) == [], error.url
        finally:
            browser.close()


@pytest.mark.parametrize(("width", "height"), [(390, 844), (1280, 800)])
def test_the_portals_session_ended_and_error_pages_pass_axe(
    carecanvas: RunningApp, width: int, height: int
) -> None:
    assert AXE.exists(), "axe-core is missing: run scripts/bootstrap"
    with sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        try:
            page = new_page(browser, width=width, height=height)
            ended = page.goto(f"{carecanvas.url}/portal")  # no session (or an expired one)
            assert ended is not None
            assert ended.status == 401
            expect(page.get_by_text("open them from your patient portal")).to_be_visible()
            assert no_sideways_scroll(page)
            assert serious(page) == [], page.url
            unknown = page.goto(f"{carecanvas.url}/portal/launch?ehr=not-registered")
            assert unknown is not None
            assert unknown.status == 404
            expect(page.get_by_text("ask your care team")).to_be_visible()
            assert no_sideways_scroll(page)
            assert serious(page) == [], page.url
        finally:
            browser.close()
