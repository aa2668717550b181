"""A reviewer-approved portrait is saved to the chart from a later launch (issue 13), in Chromium inside the
sandbox EHR's iframe: launch A (Dr. Alice Chen) makes the drafts, the reviewer (Sofia Lopez, an artist on
`portrait_reviewers`) approves one, launch B (Dr. Ravi Patel, a new browser context) writes it back. The
DocumentReference and Provenance are read back from the sandbox FHIR server; drafts no reviewer approved stay
with the session that made them, and another patient's or another EHR's launch finds no such portrait."""

from __future__ import annotations

import html
import re
from typing import Any

import httpx
import pytest
from harness import (
    AXE,
    CHROMIUM_ARGS,
    RunningApp,
    app_frame,
    assert_accessible,
    csrf_from,
    launch_session,
    tab_to,
    wait_for_job,
)
from harness import launch_in_ehr as launch
from playwright.sync_api import Frame, Page, expect, sync_playwright
from test_portal import portal_session

from fhir_adapters import GrantedScopes
from sandbox.run import SandboxEHR
from service.audit import AuditAction, AuditEntry
from service.workflows.context import WorkflowContext
from service.workflows.errors import JobNotOwnedError
from service.workflows.reviewer import approved_patient_portrait

pytestmark = [pytest.mark.browser, pytest.mark.slow]

PATIENT, PATIENT_NAME = "pat-4", "Otto Schmidt"  # his story refuses a likeness: symbolic portraits


def fhir_read(sandbox: SandboxEHR, resource: str, params: dict[str, str]) -> list[dict[str, Any]]:
    token = sandbox.mint_token(scope="user/*.read", fhirUser=f"{sandbox.fhir_base}/Practitioner/prac-1")
    bundle = httpx.get(
        f"{sandbox.fhir_base}/{resource}",
        params=params,
        headers={"Authorization": f"Bearer {token}"},
        timeout=30,
    ).json()
    return [entry["resource"] for entry in bundle.get("entry", [])]


def documents_for(sandbox: SandboxEHR, job_id: str) -> list[dict[str, Any]]:
    return fhir_read(
        sandbox, "DocumentReference", {"identifier": f"urn:carecanvas:artifact|{job_id}-illustration-v1"}
    )


def audit_of(app: RunningApp, action: str, job_id: str) -> list[AuditEntry]:
    async def read() -> list[AuditEntry]:
        async with app.services.sessionmaker() as db:
            return await app.services.audit.search(db, action=action, limit=1000)

    return [entry for entry in app.call(read()) if entry.detail.get("job_id") == job_id]


def reviewer_approves(app: RunningApp, sandbox: SandboxEHR, job_id: str) -> None:
    """Sofia Lopez launches from another chart and approves the draft from her queue."""
    with launch_session(
        app.url, sandbox, patient="pat-2", practitioner="prac-3", encounter="enc-2"
    ) as client:
        client.get("/app")
        assert f'data-job-id="{job_id}"' in client.get("/reviewer").text
        draft = client.get(f"/reviewer/{job_id}")
        assert draft.status_code == 200, draft.text
        approved = client.post(
            f"/reviewer/{job_id}/approve", data={"csrf_token": csrf_from(draft.text), "note": "Lovely."}
        )
        assert approved.status_code == 303, approved.text


def tab_to_link(page: Page, frame: Frame, path: str, *, limit: int = 80) -> None:
    """Press Tab until the focused element is the link to `path` (keyboard only)."""
    for _ in range(limit):
        page.keyboard.press("Tab")
        if frame.evaluate("() => document.activeElement?.getAttribute('href') || ''") == path:
            return
    raise AssertionError(f"Tab never reached the link to {path}")


def lookup(app: RunningApp, job_id: str, *, patient: str, ehr_name: str) -> str:
    """approved_patient_portrait for a launch of `patient` at an EHR registered as `ehr_name`."""
    services = app.services
    ehr = services.ehrs.by_name("sandbox").model_copy(update={"name": ehr_name})

    async def look() -> str:
        async with services.sessionmaker() as db:
            ctx = WorkflowContext(
                services=services,
                db=db,
                ehr=ehr,
                actor="Practitioner/prac-2",
                patient_id=patient,
                encounter_id=None,
                session_id_hash="another-launch",
                request_id=None,
                scopes=GrantedScopes.parse("launch openid fhirUser patient/*.cruds"),
            )
            try:
                return (await approved_patient_portrait(ctx, job_id)).job_id
            except JobNotOwnedError:
                return "not found"

    result: str = app.call(look())
    return result


def test_a_reviewer_approved_portrait_is_written_back_from_a_later_launch(
    sandbox: SandboxEHR, carecanvas: RunningApp
) -> None:
    assert AXE.exists(), "axe-core is missing: run scripts/bootstrap"
    app = carecanvas
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path="/usr/bin/chromium", headless=True, args=CHROMIUM_ARGS
        )
        try:
            # Launch A: two variants; the first goes to the reviewer, the second is sent but never approved.
            first = browser.new_context(bypass_csp=True, viewport={"width": 1280, "height": 900}).new_page()
            launch(first, sandbox, PATIENT_NAME, "Alice Chen")
            app_frame(first, app.url, "/app").get_by_test_id("portrait-link").first.click()
            portraits = app_frame(first, app.url, "/portraits")
            portraits.get_by_label("Variants").fill("2")
            portraits.get_by_role("button", name="Make portrait variants").click()
            grid = app_frame(first, app.url, "/portraits/variants")
            expect(grid.locator('li.variant[data-status="succeeded"]')).to_have_count(2, timeout=120_000)
            approved_job, waiting_job = [
                grid.locator("li.variant").nth(i).get_attribute("data-job-id") for i in range(2)
            ]
            assert approved_job
            assert waiting_job
            for number in (1, 2):
                grid.get_by_role("button", name=f"Send variant {number} to the reviewer").click()
                expect(grid.get_by_test_id("review-status").nth(number - 1)).to_contain_text(
                    "Waiting for the reviewer"
                )
            first.context.close()

            # The reviewer (Sofia Lopez) approves the first one from her queue, by keyboard only.
            reviewer = browser.new_context(
                bypass_csp=True, viewport={"width": 1280, "height": 900}
            ).new_page()
            launch(reviewer, sandbox, "James Okafor", "Sofia Lopez")
            app_frame(reviewer, app.url, "/app").goto(f"{app.url}/reviewer")
            queue = app_frame(reviewer, app.url, "/reviewer")
            expect(queue.get_by_test_id("review-queue")).to_contain_text(PATIENT_NAME)
            queue.locator("body").focus()
            tab_to_link(reviewer, queue, f"/reviewer/{approved_job}")
            reviewer.keyboard.press("Enter")
            decision = app_frame(reviewer, app.url, f"/reviewer/{approved_job}")
            tab_to(reviewer, decision, "Your note")
            reviewer.keyboard.type("Lovely.")
            tab_to(reviewer, decision, "Approve")
            reviewer.keyboard.press("Enter")
            expect(decision.get_by_test_id("decided")).to_contain_text("Approved")
            assert_accessible(decision)
            reviewer.context.close()

            # Launch B: another clinician, another session, a new browser context.
            second = browser.new_context(bypass_csp=True, viewport={"width": 1280, "height": 900}).new_page()
            launch(second, sandbox, PATIENT_NAME, "Ravi Patel")
            app_frame(second, app.url, "/app").get_by_test_id("portrait-link").first.click()
            portraits = app_frame(second, app.url, "/portraits")
            review = portraits.locator(f'[data-testid="patient-review"][data-job-id="{approved_job}"]')
            expect(review).to_contain_text("Approved by Practitioner/prac-3 (artist)")
            expect(review.get_by_test_id("review-to-save")).to_be_visible()
            assert_accessible(portraits)
            review.get_by_role("link", name=re.compile("Open portrait")).click()
            draft = app_frame(second, app.url, f"/portraits/drafts/{approved_job}")
            expect(draft.get_by_test_id("patient-name")).to_contain_text("Schmidt")
            expect(draft.get_by_test_id("write-back-form")).to_be_visible()
            reviewed_caption = draft.get_by_test_id("caption").inner_text().strip()
            assert_accessible(draft)
            draft.get_by_role("button", name="Save to the chart").click()
            saved = app_frame(second, app.url, f"/portraits/drafts/{approved_job}/approve")
            expect(saved.get_by_test_id("written")).to_contain_text("saved as document")
            document_id = saved.get_by_test_id("written").locator("code").inner_text()
            assert_accessible(saved)
            # The draft page now says where it is; no second save is offered.
            saved.goto(f"{app.url}/portraits/drafts/{approved_job}")
            expect(saved.get_by_test_id("draft-written")).to_contain_text(document_id)
            expect(saved.get_by_test_id("write-back-form")).to_have_count(0)
            assert_accessible(saved)
            saved.goto(f"{app.url}/portraits")
            listed = saved.locator(f'[data-testid="patient-review"][data-job-id="{approved_job}"]')
            expect(listed.get_by_test_id("review-written")).to_be_visible()

            # The waiting draft is not offered to launch B.
            saved.goto(f"{app.url}/portraits/drafts/{waiting_job}")
            expect(saved.get_by_test_id("draft-status")).to_contain_text("Waiting for the reviewer")
            expect(saved.get_by_test_id("write-back-form")).to_have_count(0)
        finally:
            browser.close()

    # Read back from the sandbox FHIR server: written once, for Otto, by Dr. Patel, verified by the reviewer.
    [document] = documents_for(sandbox, approved_job)
    assert document["id"] == document_id
    assert document["subject"]["reference"] == f"Patient/{PATIENT}"
    assert "Practitioner/prac-2" in [author.get("reference") for author in document["author"]]
    [provenance] = fhir_read(sandbox, "Provenance", {"target": f"DocumentReference/{document_id}"})
    who = {agent["who"].get("reference") for agent in provenance["agent"]}
    assert {"Practitioner/prac-2", "Practitioner/prac-3"} <= who
    [verifier] = [a for a in provenance["agent"] if a["who"].get("reference") == "Practitioner/prac-3"]
    assert verifier["role"] == [{"text": "portrait reviewer (artist)"}]
    assert documents_for(sandbox, waiting_job) == []

    # Otto reads it in his portal with the caption the reviewer approved.
    with portal_session(app.url, sandbox, patient=PATIENT) as portal:
        page = html.unescape(portal.get("/portal").text)
        assert f"/portal/documents/{document_id}/png" in page
        assert reviewed_caption in page

    # Audited as approved and written by launch B's clinician, once.
    [approval] = [e for e in audit_of(app, AuditAction.APPROVE, approved_job) if e.outcome == "success"]
    [written] = audit_of(app, AuditAction.WRITE_BACK, approved_job)
    assert approval.actor == written.actor == "Practitioner/prac-2"
    assert approval.patient == written.patient == PATIENT

    with launch_session(app.url, sandbox, patient=PATIENT, practitioner="prac-2", encounter="enc-4") as later:
        later.get("/app")
        csrf = csrf_from(later.get("/portraits").text)
        # Exactly once: saving again answers what was written; nothing new reaches the EHR.
        again = later.post(f"/portraits/drafts/{approved_job}/approve", data={"csrf_token": csrf})
        assert again.status_code == 200, again.text
        assert "nothing was written twice" in again.text
        assert len(documents_for(sandbox, approved_job)) == 1
        assert len(audit_of(app, AuditAction.WRITE_BACK, approved_job)) == 1
        # Not yet approved by a reviewer: still the session's own (404 here, on the new path and the old).
        assert (
            later.post(f"/portraits/drafts/{waiting_job}/approve", data={"csrf_token": csrf}).status_code
            == 404
        )
        assert later.get(f"/review/{waiting_job}").status_code == 404
        assert (
            later.post(
                f"/review/{waiting_job}/approve",
                data={"caption": "x", "alt_text": "y", "csrf_token": csrf},
            ).status_code
            == 404
        )
        assert documents_for(sandbox, waiting_job) == []
    # Another patient's launch: no such portrait, nothing written.
    with launch_session(app.url, sandbox, patient="pat-1", practitioner="prac-2", encounter="enc-1") as other:
        other.get("/app")
        csrf = csrf_from(other.get("/portraits").text)
        refused = other.post(f"/portraits/drafts/{approved_job}/approve", data={"csrf_token": csrf})
        assert refused.status_code == 404
        assert other.get(f"/portraits/drafts/{approved_job}").status_code == 404
    # Another EHR's launch (the same patient id at another registration): no such portrait either.
    assert lookup(app, approved_job, patient=PATIENT, ehr_name="sandbox") == approved_job
    assert lookup(app, approved_job, patient=PATIENT, ehr_name="another-ehr") == "not found"
    assert lookup(app, approved_job, patient="pat-1", ehr_name="sandbox") == "not found"
    assert lookup(app, waiting_job, patient=PATIENT, ehr_name="sandbox") == "not found"


def test_the_words_a_reviewer_approved_are_the_words_that_go_to_the_chart(
    sandbox: SandboxEHR, carecanvas: RunningApp
) -> None:
    """After the reviewer's approval the words are locked (page, live edit, API), and the approval in the
    launch that made the draft writes the approved words, whatever its form says."""
    app = carecanvas
    caption, alt_text = "Your quiet harbour at dusk, in soft colours.", "A harbour with boats at dusk."
    with launch_session(app.url, sandbox, patient=PATIENT, practitioner="prac-1", encounter="enc-4") as maker:
        maker.get("/app")
        csrf = csrf_from(maker.get("/portraits").text)
        started = maker.post(
            "/portraits", data={"csrf_token": csrf, "style": "gouache", "language": "en", "variants": "1"}
        )
        assert started.status_code == 303, started.text
        job_id = started.headers["location"].split("jobs=", 1)[1]
        assert wait_for_job(maker, job_id)["status"] == "succeeded"
        htmx = {"X-CSRF-Token": csrf}
        # Before the reviewer approves, the clinician shapes the words (kept as typed).
        edited = maker.post(
            f"/review/{job_id}/draft", data={"caption": caption, "alt_text": alt_text}, headers=htmx
        )
        assert edited.status_code == 200, edited.text
        assert 'data-testid="words-locked"' not in maker.get(f"/review/{job_id}").text
        sent = maker.post(f"/portraits/{job_id}/send", data={"csrf_token": csrf, "jobs": job_id})
        assert sent.status_code == 303, sent.text
        reviewer_approves(app, sandbox, job_id)

        page = maker.get(f"/review/{job_id}").text
        assert 'data-testid="words-locked"' in page
        assert re.search(r'<textarea id="caption"[^>]*\breadonly\b', page)
        assert re.search(r'<textarea id="alt_text"[^>]*\breadonly\b', page)
        changed = maker.post(
            f"/review/{job_id}/draft", data={"caption": "Other words.", "alt_text": "Other."}, headers=htmx
        )
        assert changed.status_code == 409
        api = maker.patch(f"/api/v1/jobs/{job_id}/draft", json={"caption": "Other words."}, headers=htmx)
        assert api.status_code == 409, api.text
        saved = maker.post(
            f"/review/{job_id}/approve",
            data={"caption": "Other words at the last minute.", "alt_text": "Other.", "csrf_token": csrf},
        )
        assert saved.status_code == 200, saved.text
    [document] = documents_for(sandbox, job_id)
    titles = {content["attachment"].get("title") for content in document["content"]}
    assert caption in titles
    assert not any("Other" in (title or "") for title in titles)
    edits = audit_of(app, AuditAction.EDIT_CAPTION, job_id)
    assert [e.detail["fields"] for e in edits] == [["alt_text", "caption"]]  # before the review; none after
