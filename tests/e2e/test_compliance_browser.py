"""A compliance officer in headless Chromium: sign-in, search, drill-downs, reports; axe-core on each page."""

from __future__ import annotations

import pytest
from harness import AXE, RunningApp, assert_accessible, launch_chromium, launch_session, serious_violations
from playwright.sync_api import expect, sync_playwright

from sandbox.run import SandboxEHR

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def test_officer_signs_in_searches_and_drills_down(sandbox: SandboxEHR, carecanvas: RunningApp) -> None:
    assert AXE.exists(), "axe-core is missing: run scripts/bootstrap"
    # Something to find: a clinician opens pat-2's chart (the workspace stores the banner, encrypted).
    with launch_session(
        carecanvas.url, sandbox, patient="pat-2", practitioner="prac-2", encounter="enc-2"
    ) as clinician:
        assert clinician.get("/app").status_code == 200
        with sync_playwright() as playwright:
            browser = launch_chromium(playwright)
            try:
                # axe is injected as a script tag, which the console's CSP (script-src 'self') would block.
                page = browser.new_context(bypass_csp=True).new_page()
                # The check itself works: a picture without alt text is a critical violation.
                page.set_content('<html lang="en"><title>t</title><main><img src="x.png"></main></html>')
                assert [v["id"] for v in serious_violations(page)] == ["image-alt"]
                page.goto(f"{carecanvas.url}/compliance")
                expect(page.get_by_role("heading", name="Staff sign-in")).to_be_visible()
                assert_accessible(page)
                page.get_by_role("button", name="Olivia Okafor-Test").click()

                expect(page.get_by_role("heading", name="Search the audit log")).to_be_visible()
                expect(page.get_by_test_id("staff-name")).to_have_text("Olivia Okafor-Test")
                assert_accessible(page)

                page.get_by_label("Patient", exact=True).fill("Patient/pat-2")
                page.get_by_label("Action", exact=True).select_option("launch")
                page.get_by_role("button", name="Search", exact=True).click()
                expect(page.get_by_test_id("total")).to_contain_text("record")
                assert "pat-2" not in page.url
                first = page.get_by_test_id("entry").first
                expect(first).to_contain_text("James Okafor")
                expect(first).to_contain_text("launch")
                assert_accessible(page)

                # Records name the user canonically, whatever spelling the EHR's fhirUser had.
                prac_2 = "Practitioner/prac-2"
                first.get_by_role("button", name=f"{prac_2}: patients this user touched").click()
                expect(page.get_by_test_id("drill-actor")).to_have_text(prac_2)
                patient_row = page.get_by_test_id("touched-patient").filter(has_text="James Okafor")
                expect(patient_row).to_have_count(1)
                assert_accessible(page)

                patient_row.get_by_role("button").click()
                expect(page.get_by_test_id("drill-patient")).to_contain_text("James Okafor")
                expect(page.get_by_test_id("touching-user").filter(has_text=prac_2)).to_have_count(1)
                assert_accessible(page)

                page.get_by_role("link", name="Reports").click()
                expect(page.get_by_test_id("report-rule")).to_have_count(5)
                assert_accessible(page)
                page.get_by_role("link", name="Failed and denied", exact=False).first.click()
                expect(page.get_by_test_id("report-rule-text")).to_be_visible()
                assert_accessible(page)

                page.get_by_role("link", name="Integrity").click()
                page.get_by_role("button", name="Verify now").click()
                expect(page.get_by_test_id("verify-ok")).to_be_visible()
                assert_accessible(page)

                page.get_by_role("button", name="Sign out").click()
                expect(page.get_by_test_id("signed-out")).to_be_visible()
                assert_accessible(page)
            finally:
                browser.close()
