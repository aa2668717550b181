"""The clinician's handout journey in Chromium inside the sandbox EHR's iframe: workspace → review (handout
pages, live grade, approve anyway) → confirmation (banner, give to patient) → print → withdraw; inside
CareCanvas keyboard only (Tab, arrow keys, Enter, typing: dropdowns, radios, the caption, links and buttons;
the EHR's own launch form is clicked), a closest topic picked by keyboard on the generic fallback, axe-core
on every page, screenshots for the README."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from harness import AXE, RunningApp, app_frame, assert_accessible, launch_chromium, launch_in_ehr, new_page
from playwright.sync_api import Frame, Locator, Page, expect, sync_playwright

from sandbox.run import SandboxEHR

pytestmark = [pytest.mark.browser, pytest.mark.slow]

SCREENSHOTS = Path(__file__).resolve().parents[2] / "docs" / "screenshots"
JARGON = (
    "Persistent hyperglycaemia necessitates comprehensive pharmacological intervention, "
    "multidisciplinary glycaemic surveillance and individualised nutritional modification."
)


def press_tab_until(page: Page, frame: Frame, target: Locator, *, limit: int = 40) -> None:
    """Keyboard only: Tab until `target` has the focus."""
    for _ in range(limit):
        if target.evaluate("element => element === document.activeElement"):
            return
        page.keyboard.press("Tab")
    raise AssertionError("Tab never reached the element")


def choose_with_keyboard(page: Page, frame: Frame, select: Locator, value: str) -> None:
    """Keyboard only, as a keyboard user picks from a dropdown: Tab to it, then arrow keys to the option."""
    press_tab_until(page, frame, select, limit=60)
    values: list[str] = select.evaluate("element => Array.from(element.options, option => option.value)")
    steps = values.index(value) - values.index(select.input_value())
    for _ in range(abs(steps)):
        page.keyboard.press("ArrowDown" if steps > 0 else "ArrowUp")
    expect(select).to_have_value(value)


def check_radio_with_keyboard(page: Page, frame: Frame, group: str, radio: Locator) -> None:
    """Keyboard only: Tab into the radio group `group` (its checked radio), then arrow keys to `radio`."""
    focused_group = "() => document.activeElement && document.activeElement.name"
    for _ in range(60):
        if frame.evaluate(focused_group) == group:
            break
        page.keyboard.press("Tab")
    else:
        raise AssertionError(f"Tab never reached the {group} radios")
    for _ in range(20):
        if radio.is_checked():
            return
        page.keyboard.press("ArrowDown")
    raise AssertionError("the arrow keys never reached the radio")


def assert_in_frame_view(page: Page, target: Locator) -> None:
    """The element is visible in the EHR's iframe without scrolling anything."""
    frame_box = page.locator("iframe.app-frame").bounding_box()
    box = target.bounding_box()
    assert frame_box is not None
    assert box is not None
    assert box["y"] >= frame_box["y"]
    assert box["y"] + box["height"] <= frame_box["y"] + frame_box["height"], (box, frame_box)


def assert_one_line(target: Locator) -> None:
    box = target.bounding_box()
    line_height = target.evaluate("element => parseFloat(getComputedStyle(element).lineHeight) || 24")
    assert box is not None
    assert box["height"] < 1.6 * line_height, f"wraps: {box}"


def screenshot_whole_frame(page: Page, frame: Frame, path: Path) -> None:
    """The whole page in the EHR's frame at the frame's width (banner to the last button; the README shows
    it): the frame is made as tall as its page for the screenshot, then put back as it was."""
    height = frame.evaluate("() => document.documentElement.scrollHeight")
    viewport = page.viewport_size
    assert viewport is not None
    page.set_viewport_size({"width": viewport["width"], "height": max(viewport["height"], height + 300)})
    page.evaluate(
        """h => { const f = document.querySelector('iframe.app-frame');
                  f.dataset.was = f.style.height; f.style.height = h + 'px'; }""",
        height,
    )
    page.locator("iframe.app-frame").screenshot(path=str(path))
    page.evaluate(
        "() => { const f = document.querySelector('iframe.app-frame'); f.style.height = f.dataset.was; }"
    )
    page.set_viewport_size(viewport)


def test_clinician_handout_journey_inside_the_ehr_iframe(sandbox: SandboxEHR, carecanvas: RunningApp) -> None:
    assert AXE.exists(), "axe-core is missing: run scripts/bootstrap"
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        try:
            page = new_page(browser, height=800)
            # Maria Rivera: 12 active conditions; prefers Spanish.
            launch_in_ehr(page, sandbox, "Maria Rivera", "Alice Chen")

            workspace = app_frame(page, carecanvas.url, "/app")
            expect(workspace.get_by_test_id("patient-name")).to_contain_text("Rivera")
            assert_one_line(workspace.get_by_test_id("patient-name"))
            assert_one_line(workspace.get_by_test_id("birth-date"))
            # The patient's preferred language is the default, and the page says so.
            expect(workspace.get_by_label("Language")).to_have_value("es")
            expect(workspace.get_by_test_id("language-note")).to_contain_text("preferred language")
            # Inside the ~600 px frame the main action shows without scrolling: the list scrolls instead.
            generate = workspace.get_by_role("button", name="Generate picture")
            expect(generate).to_be_visible()
            assert_in_frame_view(page, generate)
            assert workspace.get_by_test_id("condition-list").evaluate("e => e.scrollHeight > e.clientHeight")
            assert_accessible(workspace)
            # English (its grade has a formula), picked with the keyboard only.
            choose_with_keyboard(page, workspace, workspace.get_by_label("Language"), "en")
            press_tab_until(page, workspace, generate)
            page.keyboard.press("Enter")

            review = app_frame(page, carecanvas.url, "/review/")
            preview = review.get_by_test_id("handout-page").first
            expect(preview).to_have_js_property("complete", True)
            assert preview.evaluate("image => image.naturalWidth") > 300  # a real page, not the 64 px picture
            revision = review.get_by_test_id("handout-preview").get_attribute("data-revision")
            expect(review.get_by_test_id("caption-grade")).not_to_contain_text("please simplify")
            assert_in_frame_view(page, review.get_by_role("button", name="Approve and save to chart"))
            # Typing jargon: the grade says so, "approve anyway" appears, the handout pages are redrawn.
            caption = review.get_by_label("Caption (plain language)")
            press_tab_until(page, review, caption)
            page.keyboard.press("Control+A")
            page.keyboard.type(JARGON)
            expect(review.get_by_test_id("caption-grade")).to_contain_text("please simplify")
            expect(review.get_by_test_id("handout-preview")).not_to_have_attribute(
                "data-revision", revision or ""
            )
            expect(review.get_by_test_id("handout-page").first).to_have_js_property("complete", True)
            reason = review.get_by_label("Why approve anyway?")
            expect(reason).to_be_visible()
            expect(review.get_by_test_id("language-status")).to_contain_text("English")
            assert_accessible(review)
            screenshot_whole_frame(page, review, SCREENSHOTS / "review.png")
            choose_with_keyboard(page, review, reason, "terms-explained")
            approve = review.get_by_role("button", name="Approve and save to chart")
            press_tab_until(page, review, approve)
            page.keyboard.press("Enter")

            saved = app_frame(page, carecanvas.url, "/review/")
            expect(saved.get_by_test_id("written")).to_be_visible()
            # The confirmation carries the same banner, open/print and give to patient.
            expect(saved.get_by_test_id("patient-name")).to_contain_text("Rivera")
            expect(saved.get_by_test_id("open-handout")).to_be_visible()
            assert_accessible(saved)
            page.locator("iframe.app-frame").screenshot(path=str(SCREENSHOTS / "confirmation.png"))
            give = saved.get_by_test_id("give-to-patient")
            press_tab_until(page, saved, give)
            page.keyboard.press("Enter")

            given = app_frame(page, carecanvas.url, "/documents/")
            expect(given.get_by_test_id("handover-recorded")).to_be_visible()
            assert_accessible(given)
            press_tab_until(page, given, given.get_by_role("link", name="Open and print the handout"))
            page.keyboard.press("Enter")
            printable = app_frame(page, carecanvas.url, "/documents/")
            expect(printable.get_by_test_id("print-page").first).to_have_js_property("complete", True)
            expect(printable.get_by_test_id("print")).to_be_visible()
            assert_accessible(printable)
            press_tab_until(page, printable, printable.get_by_role("link", name="Back to the workspace"))
            page.keyboard.press("Enter")

            history = app_frame(page, carecanvas.url, "/app")
            row = history.get_by_test_id("history").locator("tbody tr").first
            row.scroll_into_view_if_needed()  # thumbnails load lazily
            expect(row.locator("img.thumb")).to_have_js_property("complete", True)
            expect(row.get_by_test_id("approver")).to_contain_text("(you)")
            withdraw = row.get_by_role("link", name=re.compile("Withdraw document"))
            press_tab_until(page, history, withdraw, limit=80)
            page.keyboard.press("Enter")

            confirm = app_frame(page, carecanvas.url, "/documents/")
            expect(confirm.get_by_role("heading", name=re.compile("Withdraw"))).to_be_visible()
            assert_accessible(confirm)
            first_reason = confirm.get_by_label("About the wrong condition")
            check_radio_with_keyboard(page, confirm, "reason", first_reason)
            expect(first_reason).to_be_checked()
            press_tab_until(page, confirm, confirm.get_by_test_id("confirm-withdraw"))
            page.keyboard.press("Enter")
            done = app_frame(page, carecanvas.url, "/documents/")
            expect(done.get_by_test_id("retracted")).to_be_visible()
            expect(done.get_by_test_id("withdraw-reason")).to_contain_text("wrong condition")
            assert_accessible(done)
        finally:
            browser.close()


def test_keyboard_only_clinician_picks_a_closest_topic_for_a_condition_without_one(
    sandbox: SandboxEHR, carecanvas: RunningApp
) -> None:
    """Daniel Begay's display-less condition matches no topic: with the keyboard only, the clinician picks
    it, picks Asthma among its closest topics, and the draft is about asthma."""
    assert AXE.exists(), "axe-core is missing: run scripts/bootstrap"
    asthma = carecanvas.services.prompts.topic("asthma")
    with sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        try:
            page = new_page(browser, height=800)
            launch_in_ehr(page, sandbox, "Daniel Begay", "Alice Chen")

            workspace = app_frame(page, carecanvas.url, "/app")
            expect(workspace.get_by_test_id("patient-name")).to_contain_text("Begay")
            fallback = workspace.locator('input[name="condition_id"][value="cond-6-no-text"]')
            topic = workspace.get_by_label("Handout topic for this condition")
            expect(topic).to_have_value("cond-6-no-text:")  # the general handout until the clinician picks
            assert_accessible(workspace)
            check_radio_with_keyboard(page, workspace, "condition_id", fallback)
            expect(fallback).to_be_checked()
            choose_with_keyboard(page, workspace, topic, "cond-6-no-text:asthma")
            expect(topic.locator("option:checked")).to_have_text(asthma.text["en"].title)
            # The closest topics are named in the handout's language too, following the Language list.
            choose_with_keyboard(page, workspace, workspace.get_by_label("Language"), "es")
            expect(topic.locator("option:checked")).to_have_text(
                f"{asthma.text['en'].title} — {asthma.text['es'].title}"
            )
            choose_with_keyboard(page, workspace, workspace.get_by_label("Language"), "en")
            expect(topic.locator("option:checked")).to_have_text(asthma.text["en"].title)
            press_tab_until(page, workspace, workspace.get_by_role("button", name="Generate picture"))
            page.keyboard.press("Enter")

            review = app_frame(page, carecanvas.url, "/review/")
            expect(review.get_by_role("heading", level=1)).to_contain_text(asthma.text["en"].title)
            expect(review.get_by_label("Caption (plain language)")).to_have_value(asthma.text["en"].caption)
            expect(review.get_by_test_id("handout-page").first).to_have_js_property("complete", True)
            assert_accessible(review)
        finally:
            browser.close()


def test_keyboard_only_any_topic_named_in_the_handouts_language_and_the_refusal_pages(
    sandbox: SandboxEHR, carecanvas: RunningApp
) -> None:
    """Layla Haddad (prefers Arabic) has a condition with no code and no text. The topic lists name each
    topic in English and in the handout's language, following the Language list as it changes; "Another
    topic" with none picked gets the 400 page, a topic for a coded condition the 422 page, both accessible;
    then another topic for real, reviewed in Arabic (right to left, no grade formula, machine-drafted)."""
    assert AXE.exists(), "axe-core is missing: run scripts/bootstrap"
    library = carecanvas.services.prompts
    asthma = library.topic("asthma")
    with sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        try:
            page = new_page(browser, height=800)
            launch_in_ehr(page, sandbox, "Layla Haddad", "Alice Chen")

            workspace = app_frame(page, carecanvas.url, "/app")
            expect(workspace.get_by_test_id("patient-name")).to_contain_text("Haddad")
            language = workspace.get_by_label("Language")
            expect(language).to_have_value("ar")
            other = workspace.get_by_label("Another topic, for a condition set to “Another topic”")
            option = other.locator('option[value="asthma"]')
            expect(option).to_have_text(f"{asthma.text['en'].title} — {asthma.text['ar'].title}")
            # With the topic lists the main action still shows without scrolling inside the ~600 px frame.
            assert_in_frame_view(page, workspace.get_by_role("button", name="Generate picture"))
            assert_accessible(workspace)
            # The names follow the Language list (keyboard only): English alone, then Chinese.
            choose_with_keyboard(page, workspace, language, "en")
            expect(option).to_have_text(asthma.text["en"].title)
            choose_with_keyboard(page, workspace, language, "zh-Hans")
            expect(option).to_have_text(f"{asthma.text['en'].title} — {asthma.text['zh-Hans'].title}")

            # "Another topic" for the uncoded condition, but nothing picked in the list: the 400 page.
            fallback = workspace.locator('input[name="condition_id"][value="cond-5-no-code"]')
            check_radio_with_keyboard(page, workspace, "condition_id", fallback)
            expect(fallback).to_be_checked()
            own_list = workspace.get_by_test_id("topic-choice")
            choose_with_keyboard(page, workspace, own_list, "cond-5-no-code:*")
            press_tab_until(page, workspace, workspace.get_by_role("button", name="Generate picture"))
            page.keyboard.press("Enter")
            refused = app_frame(page, carecanvas.url, "/illustrations")
            expect(refused.get_by_text("Unknown handout topic").first).to_be_visible()
            assert_accessible(refused)

            # No topic list for a coded condition on the page; a crafted form posting one gets the 422 page.
            refused.goto(f"{carecanvas.url}/app")
            workspace = app_frame(page, carecanvas.url, "/app")
            coded = workspace.locator('input[name="condition_id"]:not([value="cond-5-no-code"])').first
            condition_id = coded.get_attribute("value")
            workspace.evaluate(
                """id => {
                    const form = document.querySelector("form.generate-form");
                    form.querySelector(`input[name="condition_id"][value="${id}"]`).checked = true;
                    const extra = document.createElement("input");
                    extra.type = "hidden"; extra.name = "topic_choice"; extra.value = id + ":asthma";
                    form.appendChild(extra);
                    form.submit();
                }""",
                condition_id,
            )
            matched = app_frame(page, carecanvas.url, "/illustrations")
            expect(matched.get_by_text("This condition has its own topic").first).to_be_visible()
            assert_accessible(matched)

            # Another topic picked for real, in Arabic: the review page writes the words right to left, says
            # no reading grade exists for Arabic and that the translation is machine-drafted.
            matched.goto(f"{carecanvas.url}/app")
            workspace = app_frame(page, carecanvas.url, "/app")
            fallback = workspace.locator('input[name="condition_id"][value="cond-5-no-code"]')
            check_radio_with_keyboard(page, workspace, "condition_id", fallback)
            choose_with_keyboard(
                page, workspace, workspace.get_by_test_id("topic-choice"), "cond-5-no-code:*"
            )
            other = workspace.get_by_test_id("topic-other")
            choose_with_keyboard(page, workspace, other, "asthma")
            expect(workspace.get_by_label("Language")).to_have_value("ar")
            press_tab_until(page, workspace, workspace.get_by_role("button", name="Generate picture"))
            page.keyboard.press("Enter")
            review = app_frame(page, carecanvas.url, "/review/")
            caption = review.get_by_label("Caption (plain language)")
            expect(caption).to_have_value(asthma.text["ar"].caption)
            assert caption.evaluate("element => getComputedStyle(element).direction") == "rtl"
            expect(review.get_by_role("heading", level=1)).to_contain_text(asthma.text["ar"].title)
            expect(review.get_by_test_id("caption-grade")).to_contain_text("no measure is available")
            expect(review.get_by_test_id("language-status")).to_contain_text("machine-drafted")
            expect(review.get_by_test_id("handout-page").first).to_have_js_property("complete", True)
            assert_accessible(review)
        finally:
            browser.close()


def test_keyboard_only_new_version_drafts_and_withdraw_with_restore_pass_axe(
    sandbox: SandboxEHR, carecanvas: RunningApp
) -> None:
    """The issue-12 pages the first journey does not reach, keyboard only inside the EHR's frame, axe-core on
    each: the warning for a language CareCanvas lacks (Otto Schmidt prefers German), the job page, the
    workspace listing a pending draft next to the history, a new version continued from the drafts list,
    and withdrawing the newest version with the earlier one made current again."""
    assert AXE.exists(), "axe-core is missing: run scripts/bootstrap"
    with sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        try:
            page = new_page(browser, height=800)
            launch_in_ehr(page, sandbox, "Otto Schmidt", "Alice Chen")

            workspace = app_frame(page, carecanvas.url, "/app")
            expect(workspace.get_by_test_id("patient-name")).to_contain_text("Schmidt")
            expect(workspace.get_by_test_id("language-note")).to_contain_text("no handouts in that language")
            assert_accessible(workspace)
            choose_with_keyboard(page, workspace, workspace.get_by_label("Language"), "en")
            press_tab_until(page, workspace, workspace.get_by_role("button", name="Generate picture"))
            page.keyboard.press("Enter")
            review = app_frame(page, carecanvas.url, "/review/")
            expect(review.get_by_test_id("handout-page").first).to_have_js_property("complete", True)
            first_job = review.url.rsplit("/", 1)[1]
            # The job page (here finished: the live one redirects as soon as the picture is done).
            review.goto(f"{carecanvas.url}/jobs/{first_job}")
            job = app_frame(page, carecanvas.url, "/jobs/")
            expect(job.get_by_role("link", name="Review the picture")).to_be_visible()
            assert_accessible(job)
            press_tab_until(page, job, job.get_by_role("link", name="Review the picture"))
            page.keyboard.press("Enter")
            review = app_frame(page, carecanvas.url, "/review/")
            approve = review.get_by_role("button", name="Approve and save to chart")
            press_tab_until(page, review, approve)
            page.keyboard.press("Enter")
            saved = app_frame(page, carecanvas.url, "/review/")
            expect(saved.get_by_test_id("written")).to_be_visible()
            press_tab_until(page, saved, saved.get_by_role("link", name="Back to the workspace"), limit=60)
            page.keyboard.press("Enter")

            # A new version from the history: its draft is listed (Continue, Discard) beside the history.
            history = app_frame(page, carecanvas.url, "/app")
            new_version = history.get_by_role(
                "button", name=re.compile("Make a new version of document")
            ).first
            press_tab_until(page, history, new_version, limit=120)
            page.keyboard.press("Enter")
            draft_review = app_frame(page, carecanvas.url, "/review/")
            expect(draft_review.get_by_test_id("handout-page").first).to_have_js_property("complete", True)
            draft_review.goto(f"{carecanvas.url}/app")
            listed = app_frame(page, carecanvas.url, "/app")
            draft = listed.get_by_test_id("draft").first
            expect(draft.get_by_role("button", name=re.compile("Discard the draft"))).to_be_visible()
            assert_accessible(listed)
            press_tab_until(
                page, listed, draft.get_by_role("link", name=re.compile("Continue the draft")), limit=120
            )
            page.keyboard.press("Enter")
            continued = app_frame(page, carecanvas.url, "/review/")
            approve = continued.get_by_role("button", name="Approve and save to chart")
            press_tab_until(page, continued, approve)
            page.keyboard.press("Enter")
            replaced = app_frame(page, carecanvas.url, "/review/")
            expect(replaced.get_by_test_id("replaces")).to_be_visible()
            assert_accessible(replaced)
            press_tab_until(
                page, replaced, replaced.get_by_role("link", name="Back to the workspace"), limit=60
            )
            page.keyboard.press("Enter")

            # Withdrawing the newest version offers to make the earlier one current again (checked).
            history = app_frame(page, carecanvas.url, "/app")
            newest = history.get_by_test_id("history").locator('tbody tr[data-status="current"]').first
            withdraw = newest.get_by_role("link", name=re.compile("Withdraw document"))
            press_tab_until(page, history, withdraw, limit=120)
            page.keyboard.press("Enter")
            confirm = app_frame(page, carecanvas.url, "/documents/")
            restore = confirm.get_by_label(re.compile("Make the earlier version"))
            expect(restore).to_be_checked()
            assert_accessible(confirm)
            check_radio_with_keyboard(
                page, confirm, "reason", confirm.get_by_label("About the wrong condition")
            )
            press_tab_until(page, confirm, confirm.get_by_test_id("confirm-withdraw"))
            page.keyboard.press("Enter")
            done = app_frame(page, carecanvas.url, "/documents/")
            expect(done.get_by_test_id("restored")).to_contain_text("current again")
            assert_accessible(done)
        finally:
            browser.close()
