"""A portrait artist signs in by staff OIDC and works the review queue by keyboard only, in Chromium; the
clinician then finds the note on the portrait page in a new session inside the sandbox EHR's iframe. axe-core
on every page (issue 13)."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
from harness import (
    AXE,
    RunningApp,
    app_frame,
    assert_accessible,
    csrf_from,
    free_port,
    launch_chromium,
    launch_in_ehr,
    launch_session,
    new_page,
    running_app,
    tab_to,
    wait_for_job,
)
from playwright.sync_api import expect, sync_playwright

from sandbox.run import SandboxEHR
from sandbox.staff_oidc import PORTRAIT_ARTIST_GROUP
from service.cli import demo_settings
from service.ehrs import origin_of

pytestmark = [pytest.mark.browser, pytest.mark.slow]

ARTIST_NAME = "Rosa Alvarez-Test"


@pytest.fixture(scope="module")
def staff_browser_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def staff_browser_sandbox(staff_browser_port: int) -> Iterator[SandboxEHR]:
    app_url = f"http://127.0.0.1:{staff_browser_port}"
    with SandboxEHR(app_launch_url=f"{app_url}/launch", redirect_uris=[f"{app_url}/callback"]) as ehr:
        yield ehr


@pytest.fixture(scope="module")
def staff_browser_app(
    staff_browser_sandbox: SandboxEHR, staff_browser_port: int, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningApp]:
    settings = demo_settings(
        data_dir=tmp_path_factory.mktemp("reviewer-staff-browser"),
        fhir_base=staff_browser_sandbox.fhir_base,
        auth_base=staff_browser_sandbox.auth_base,
        ehr_origin=origin_of(staff_browser_sandbox.ehr_url),
        port=staff_browser_port,
    )
    assert settings.staff_oidc is not None
    staff = settings.staff_oidc.model_copy(update={"reviewer_roles": {PORTRAIT_ARTIST_GROUP: "artist"}})
    with running_app(settings.model_copy(update={"staff_oidc": staff}), port=staff_browser_port) as app:
        yield app


def sent_portrait(app: RunningApp, sandbox: SandboxEHR) -> str:
    """A clinician (pat-1, Maria Rivera) makes one portrait and sends it to the reviewer, over HTTP."""
    with launch_session(app.url, sandbox, patient="pat-1", encounter="enc-1") as client:
        client.get("/app")
        csrf = csrf_from(client.get("/portraits").text)
        started = client.post(
            "/portraits", data={"csrf_token": csrf, "style": "gouache", "language": "en", "variants": "1"}
        )
        jobs = started.headers["location"].split("jobs=", 1)[1]
        assert wait_for_job(client, jobs)["status"] == "succeeded"
        sent = client.post(
            f"/portraits/{jobs}/send", data={"csrf_token": csrf, "jobs": jobs, "note": "She loves the sea."}
        )
        assert sent.status_code == 303
        return jobs


def test_a_staff_artist_reviews_by_keyboard_and_the_clinician_sees_the_note_later(
    staff_browser_app: RunningApp, staff_browser_sandbox: SandboxEHR
) -> None:
    assert AXE.exists(), "axe-core is missing: run scripts/bootstrap"
    app, sandbox = staff_browser_app, staff_browser_sandbox
    job_id = sent_portrait(app, sandbox)
    with sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        try:
            page = new_page(browser)
            # No EHR launch: the queue sends the artist to the staff sign-in, and back.
            page.goto(f"{app.url}/reviewer")
            expect(page.get_by_role("button", name=ARTIST_NAME)).to_be_visible()
            page.locator("body").focus()
            tab_to(page, page, ARTIST_NAME)
            page.keyboard.press("Enter")
            page.wait_for_url(f"{app.url}/reviewer")
            expect(page.get_by_test_id("reviewer-who")).to_contain_text(ARTIST_NAME)
            expect(page.get_by_test_id("review-queue")).to_contain_text("Maria Rivera")
            assert_accessible(page)

            page.locator("body").focus()
            tab_to(page, page, "Open the draft for Maria Rivera")
            page.keyboard.press("Enter")
            page.wait_for_url(re.compile(rf".*/reviewer/{job_id}$"))
            expect(page.get_by_test_id("patient-name")).to_have_text("Maria Rivera")
            expect(page.get_by_test_id("notes")).to_contain_text("She loves the sea.")
            assert_accessible(page)
            tab_to(page, page, "Your note")
            page.keyboard.type("Please add the lighthouse.")
            tab_to(page, page, "Send back with this note")
            page.keyboard.press("Enter")
            expect(page.get_by_test_id("decided")).to_contain_text("Sent back")
            expect(page.get_by_test_id("draft-status")).to_contain_text(f"{ARTIST_NAME} (artist)")
            assert_accessible(page)
            tab_to(page, page, "Sign out")
            page.keyboard.press("Enter")
            expect(page.get_by_test_id("signed-out")).to_be_visible()
            assert_accessible(page)

            # Staff without a reviewer role: a readable 403 page.
            page.goto(f"{app.url}/reviewer")
            page.get_by_role("button", name="Dr. Marcus Lee-Test").click()
            expect(
                page.get_by_role("heading", name="You do not have access to the portrait review queue")
            ).to_be_visible()
            assert_accessible(page)
            page.goto(f"{app.url}/reviewer")
            page.get_by_role("button", name="Olivia Okafor-Test").click()
            page.goto(f"{app.url}/reviewer")
            expect(page.get_by_role("heading", name="You are not a portrait reviewer")).to_be_visible()
            assert_accessible(page)

            # A new clinician session (inside the EHR's iframe) finds the note on the portrait page.
            clinician = new_page(browser)
            launch_in_ehr(clinician, sandbox, "Maria Rivera", "Alice Chen")
            workspace = app_frame(clinician, app.url, "/app")
            workspace.get_by_test_id("portrait-link").first.click()
            portraits = app_frame(clinician, app.url, "/portraits")
            review = portraits.get_by_test_id("patient-review")
            expect(review).to_contain_text(f"Sent back by {ARTIST_NAME} (artist)")
            expect(review).to_contain_text("Please add the lighthouse.")
            assert_accessible(portraits)
            review.get_by_role("link", name="Open portrait 1").click()
            draft = app_frame(clinician, app.url, f"/portraits/drafts/{job_id}")
            expect(draft.get_by_test_id("notes")).to_contain_text("Please add the lighthouse.")
            expect(draft.get_by_test_id("patient-name")).to_contain_text("Maria")
            expect(draft.locator("img.variant-image")).to_have_js_property("naturalWidth", 64)
            assert_accessible(draft)
        finally:
            browser.close()
