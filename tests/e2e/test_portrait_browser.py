"""Portraits in headless Chromium inside the sandbox EHR's iframe: intake, variants, reviewer by keyboard."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from harness import (
    AXE,
    RunningApp,
    app_frame,
    assert_accessible,
    launch_chromium,
    launch_in_ehr,
    new_page,
    tab_to,
)
from playwright.sync_api import expect, sync_playwright

from sandbox.run import SandboxEHR

pytestmark = [pytest.mark.browser, pytest.mark.slow]

SCREENSHOTS = Path(__file__).resolve().parents[2] / "docs" / "screenshots"


def test_story_intake_variants_and_the_reviewer_by_keyboard(
    sandbox: SandboxEHR, carecanvas: RunningApp
) -> None:
    assert AXE.exists(), "axe-core is missing: run scripts/bootstrap"
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        try:
            page = new_page(browser)
            # A clinician with Layla Haddad, who has no story yet: the portrait link leads to the intake.
            launch_in_ehr(page, sandbox, "Layla Haddad", "Alice Chen")
            workspace = app_frame(page, carecanvas.url, "/app")
            workspace.get_by_test_id("portrait-link").first.click()
            portraits = app_frame(page, carecanvas.url, "/portraits")
            expect(portraits.get_by_test_id("no-story")).to_be_visible()
            expect(portraits.get_by_test_id("patient-name")).to_contain_text("Haddad")
            portraits.get_by_test_id("gather-story").click()
            intake = app_frame(page, carecanvas.url, "/portraits/story")
            assert_accessible(intake)
            intake.get_by_label("Places that feel like home").fill("the old city of Aleppo, a rooftop garden")
            intake.get_by_label("Favourite colours").fill("saffron, sky blue")
            intake.get_by_label("Things that give you strength").fill("a jasmine flower")
            intake.get_by_label("Things to leave out").fill("needles")
            intake.get_by_label("Your story, in your own words").fill("I like the smell of jasmine at night.")
            intake.get_by_label("No", exact=True).check()
            intake.get_by_role("button", name="Save the story to the record").click()
            saved = app_frame(page, carecanvas.url, "/portraits?story=saved")
            expect(saved.get_by_test_id("story-saved")).to_be_visible()
            expect(saved.get_by_test_id("likeness")).to_have_attribute("data-likeness", "refused")
            expect(saved.get_by_label("People in the picture")).to_have_value("no")
            expect(saved.get_by_test_id("people-details")).to_be_hidden()
            assert_accessible(saved)
            saved.get_by_label("Style").select_option("gouache")
            saved.get_by_label("Variants").fill("2")
            saved.get_by_role("button", name="Make portrait variants").click()

            # Live progress over one SSE stream; the grid fills in without the page reloading itself.
            grid = app_frame(page, carecanvas.url, "/portraits/variants")
            expect(grid.locator('li.variant[data-status="succeeded"]')).to_have_count(2, timeout=120_000)
            expect(grid.get_by_text("All variants are done")).to_be_visible()
            images = grid.locator("img.variant-image")
            expect(images.nth(1)).to_have_js_property("naturalWidth", 64)
            assert images.nth(0).bounding_box()["width"] >= 200  # big enough to compare side by side
            boxes = [images.nth(i).bounding_box() for i in range(2)]
            assert boxes[0]["y"] == boxes[1]["y"]  # in one row
            assert_accessible(grid)
            page.screenshot(path=str(SCREENSHOTS / "portrait-variants.png"))
            grid.get_by_label(re.compile("Note for the reviewer")).first.fill(
                "Her favourite flower is jasmine."
            )
            grid.get_by_role("button", name="Send variant 1 to the reviewer").click()
            expect(grid.get_by_test_id("review-status").first).to_contain_text("Waiting for the reviewer")

            # The reviewer (Sofia Lopez, an artist on the list) opens the queue from any chart, by keyboard.
            # A context of their own: one context would share (and replace) the clinician's session cookie.
            reviewer_page = new_page(browser)
            launch_in_ehr(reviewer_page, sandbox, "James Okafor", "Sofia Lopez")
            frame = app_frame(reviewer_page, carecanvas.url, "/app")
            frame.goto(f"{carecanvas.url}/reviewer")
            queue = app_frame(reviewer_page, carecanvas.url, "/reviewer")
            expect(queue.get_by_test_id("review-queue")).to_contain_text("Layla Haddad")
            assert_accessible(queue)
            reviewer_page.screenshot(path=str(SCREENSHOTS / "reviewer-queue.png"))
            queue.locator("body").focus()
            tab_to(reviewer_page, queue, "Open the draft for Layla Haddad")
            reviewer_page.keyboard.press("Enter")
            draft = app_frame(reviewer_page, carecanvas.url, "/reviewer/")
            expect(draft.get_by_test_id("notes")).to_contain_text("Her favourite flower is jasmine.")
            expect(draft.get_by_test_id("caption")).to_contain_text("This picture was made from your story.")
            assert_accessible(draft)
            tab_to(reviewer_page, draft, "Your note")
            reviewer_page.keyboard.type("Please add the rooftop garden.")
            tab_to(reviewer_page, draft, "Send back with this note")
            reviewer_page.keyboard.press("Enter")
            expect(draft.get_by_test_id("decided")).to_contain_text("Sent back")
            expect(draft.get_by_test_id("draft-status")).to_contain_text("Practitioner/prac-3 (artist)")

            # The clinician sees it sent back, with the note, on the grid.
            page.bring_to_front()
            grid.goto(grid.url.split("#", 1)[0])  # a real reload, not a jump to the fragment
            expect(grid.get_by_test_id("review-status").first).to_contain_text(
                "Sent back by Practitioner/prac-3"
            )
            expect(grid.get_by_text("Please add the rooftop garden.")).to_be_visible()
        finally:
            browser.close()
