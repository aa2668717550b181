"""A clinician's workflow in headless Chromium: sandbox EHR page → app in the iframe → generate → approve."""

from __future__ import annotations

import re

import httpx
import pytest
from harness import RunningApp, app_frame, launch_chromium, launch_in_ehr
from playwright.sync_api import expect, sync_playwright

from sandbox.run import SandboxEHR
from service.workflows.approve import IDENTIFIER_SYSTEM

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def test_clinician_generates_and_approves_inside_the_ehr_iframe(
    sandbox: SandboxEHR, carecanvas: RunningApp
) -> None:
    with sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        try:
            page = browser.new_page()  # the app's real CSP: no axe here
            launch_in_ehr(page, sandbox, "Layla Haddad", "Alice Chen")

            # The app loads inside the EHR's iframe: CSP frame-ancestors lets the registered EHR frame it.
            workspace = app_frame(page, carecanvas.url, "/app")
            expect(workspace.get_by_test_id("patient-name")).to_contain_text("Haddad")
            expect(workspace.get_by_role("heading", name="Make a patient-education picture")).to_be_visible()
            workspace.get_by_label("Style").select_option("watercolour")
            workspace.get_by_label("Language").select_option("es")
            workspace.get_by_role("button", name="Generate picture").click()

            # Progress arrives over SSE; when the job is done the page moves on to the review.
            review = app_frame(page, carecanvas.url, "/review/")
            expect(review.get_by_test_id("test-model-notice")).to_be_visible()
            image = review.locator("img.preview")
            expect(image).to_have_attribute("alt", re.compile(r"\w+"))
            expect(image).to_have_js_property("naturalWidth", 64)  # waits for the image to load
            # The reading grade follows the caption as it is typed (htmx posts it; the server measures it).
            caption = review.get_by_label("Caption (plain language)")
            original_caption = caption.input_value()
            caption.fill(
                "Hiperglucemia persistente con complicaciones microvasculares y neuropatía periférica "
                "secundaria que requieren intervención farmacológica multidisciplinaria."
            )
            expect(review.get_by_test_id("caption-grade")).to_contain_text("please simplify")
            caption.fill(original_caption)
            expect(review.get_by_test_id("caption-grade")).not_to_contain_text("please simplify")
            review.get_by_label("Alt text (describes the picture)").fill("Dibujo de prueba.")
            review.get_by_role("button", name="Approve and save to chart").click()
            expect(review.get_by_test_id("written")).to_be_visible()
            job_id = review.url.rsplit("/", 2)[-2]
        finally:
            browser.close()

    token = sandbox.mint_token(scope="user/*.read", fhirUser=f"{sandbox.fhir_base}/Practitioner/prac-1")
    bundle = httpx.get(
        f"{sandbox.fhir_base}/DocumentReference",
        params={"identifier": f"{IDENTIFIER_SYSTEM}|{job_id}-illustration-v1"},
        headers={"Authorization": f"Bearer {token}"},
        timeout=30,
    ).json()
    [entry] = bundle["entry"]
    document = entry["resource"]
    assert document["subject"]["reference"] == "Patient/pat-5"
    assert document["content"][0]["attachment"]["language"] == "es"
    assert document["content"][1]["attachment"]["title"] == "Dibujo de prueba."
