"""The sandbox EHR's chart view shows what CareCanvas wrote back: DocumentReference, Provenance, Device."""

from __future__ import annotations

import io
import re
from pathlib import Path

import httpx
import pytest
from harness import RunningApp, approve_picture, generate_picture, launch_session
from playwright.sync_api import expect, sync_playwright
from pypdf import PdfReader

from sandbox.run import SandboxEHR
from service.audit import AuditEntry

SCREENSHOTS = Path(__file__).resolve().parents[2] / "docs" / "screenshots"

pytestmark = pytest.mark.slow


def test_a_saved_picture_is_readable_in_the_ehr_chart(carecanvas: RunningApp, sandbox: SandboxEHR) -> None:
    with launch_session(carecanvas.url, sandbox, patient="pat-2", practitioner="prac-1") as client:
        job_id, csrf = generate_picture(client)
        approve_picture(client, job_id, csrf)
    ehr_page = httpx.post(
        f"{sandbox.auth_base}/ehr/launch", data={"patient": "pat-2", "practitioner": "prac-1"}, timeout=30
    )
    assert 'data-testid="chart-link"' in ehr_page.text  # the EHR page links the chart next to the app
    chart = httpx.get(f"{sandbox.auth_base}/ehr/chart", params={"patient": "pat-2"}, timeout=30)
    assert chart.status_code == 200
    rows = re.findall(r'<tr data-testid="chart-document" data-id="([^"]+)">(.*?)</tr>', chart.text, re.S)
    assert rows, chart.text
    document_id, row = rows[0]  # newest first
    assert "current" in row
    # The approving clinician by name (read from their fhirUser Practitioner at the workspace), not only
    # as a reference: on the DocumentReference's author and on the Provenance's verifier.
    assert "Author: Dr. Alice Chen" in row
    assert re.search(r'data-testid="provenance">[^<]*Dr\. Alice Chen', row)
    assert 'data-testid="provenance"' in row
    assert re.search(r'data-testid="device">Made with: [^<]+', row)
    links = re.findall(r'href="(/ehr/chart/attachment\?doc=[^"]+)"', row)
    assert links
    types = set()
    for link in links:
        attachment = httpx.get(f"{sandbox.auth_base}{link.replace('&amp;', '&')}", timeout=30)
        assert attachment.status_code == 200
        types.add(attachment.headers["content-type"])
        if attachment.headers["content-type"] == "application/pdf":
            assert attachment.content.startswith(b"%PDF")
            text = " ".join(page.extract_text() for page in PdfReader(io.BytesIO(attachment.content)).pages)
            assert "Dr. Alice Chen" in text  # the handout says who gave it
    assert "application/pdf" in types
    missing = httpx.get(f"{sandbox.auth_base}/ehr/chart", params={"patient": "nobody"}, timeout=30)
    assert missing.status_code == 404

    # Audit records name the clinician too (sealed), for the compliance officer.
    async def approvals() -> list[AuditEntry]:
        async with carecanvas.services.sessionmaker() as db:
            return await carecanvas.services.audit.search(db, action="approve", limit=1000)

    # This picture's own approval (other tests of the session approve too, by other clinicians).
    [approval] = [e for e in carecanvas.call(approvals()) if e.detail.get("job_id") == job_id]
    assert approval.actor_display == "Dr. Alice Chen"
    no_attachment = httpx.get(
        f"{sandbox.auth_base}/ehr/chart/attachment", params={"doc": document_id, "n": "99"}, timeout=30
    )
    assert no_attachment.status_code == 404


@pytest.mark.browser
def test_the_ehr_chart_view_opens_from_the_ehr_page_in_chromium_and_passes_axe(
    carecanvas: RunningApp, sandbox: SandboxEHR
) -> None:
    """What a clinician checks after saving: the EHR page's link opens the chart view of the patient's
    documents (the README's screenshot is written here)."""
    from harness import AXE, CHROMIUM_ARGS, serious_violations

    assert AXE.exists(), "axe-core is missing: run scripts/bootstrap"
    with launch_session(carecanvas.url, sandbox, patient="pat-2", practitioner="prac-1") as client:
        job_id, csrf = generate_picture(client)
        saved = approve_picture(client, job_id, csrf, caption="Your lungs and how to breathe easier.")
    match = re.search(r"<code>([A-Za-z0-9\-.]+)</code>", saved.text)
    assert match, "the approved page names the document"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path="/usr/bin/chromium", headless=True, args=CHROMIUM_ARGS
        )
        try:
            context = browser.new_context(bypass_csp=True, viewport={"width": 1280, "height": 800})
            page = context.new_page()
            page.goto(sandbox.ehr_url)
            page.get_by_label("James Okafor").check()
            page.get_by_label(re.compile("Alice Chen")).check()
            page.get_by_role("button", name="Launch CareCanvas").click()
            with context.expect_page() as opened:
                page.get_by_test_id("chart-link").click()
            chart = opened.value
            chart.wait_for_load_state()
            row = chart.locator(f'[data-testid="chart-document"][data-id="{match.group(1)}"]')
            expect(row).to_contain_text("Author: Dr. Alice Chen")
            expect(row.get_by_test_id("provenance").first).to_be_visible()
            expect(row.get_by_test_id("device")).to_contain_text("Made with:")
            assert serious_violations(chart) == []
            SCREENSHOTS.mkdir(parents=True, exist_ok=True)
            chart.screenshot(path=str(SCREENSHOTS / "ehr-chart.png"))
        finally:
            browser.close()
