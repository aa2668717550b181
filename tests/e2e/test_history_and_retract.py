"""History of written documents, new versions that replace them, withdrawal, and odd Conditions, over HTTP."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from harness import CONDITION, RunningApp, csrf_from, free_port, launch_session, running_app, wait_for_job
from PIL import Image
from pypdf import PdfReader

from sandbox.run import SandboxEHR
from service.audit import AuditAction
from service.cli import demo_settings
from service.documents import load_document
from service.ehrs import origin_of
from service.settings import EhrSettings
from service.workflows.approve import IDENTIFIER_SYSTEM, artifact_identifier

pytestmark = pytest.mark.slow

DEFAULT_SCOPES = EhrSettings.model_fields["scopes"].default
VARIANTS: dict[str, dict[str, Any]] = {
    "full": {},
    # Read, search and create documents, but not update them: no superseding, no withdrawing.
    "no-update": {
        "scopes": tuple(
            "patient/DocumentReference.crs" if scope == "patient/DocumentReference.cruds" else scope
            for scope in DEFAULT_SCOPES
        )
    },
    # The clinic's name, phone and logo in the EHR registration (the logo file is written per run).
    "clinic": {"clinic_name": "Lakeside Family Clinic", "clinic_phone": "+1 (555) 010-0100"},
}


@pytest.fixture(scope="module")
def ports() -> dict[str, int]:
    return {name: free_port() for name in VARIANTS}


@pytest.fixture(scope="module")
def ehr(ports: dict[str, int]) -> Iterator[SandboxEHR]:
    with SandboxEHR(
        redirect_uris=[f"http://127.0.0.1:{port}/callback" for port in ports.values()]
    ) as sandbox:
        yield sandbox


@pytest.fixture(scope="module")
def apps(
    ehr: SandboxEHR, ports: dict[str, int], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, RunningApp]]:
    with contextlib.ExitStack() as stack:
        started = {}
        for name, overrides in VARIANTS.items():
            settings = demo_settings(
                data_dir=Path(tmp_path_factory.mktemp(f"history-{name}")),
                fhir_base=ehr.fhir_base,
                auth_base=ehr.auth_base,
                ehr_origin=origin_of(ehr.ehr_url),
                port=ports[name],
            )
            base = settings.ehrs[0].model_dump(exclude_unset=True)
            if "clinic_name" in overrides:
                logo = settings.data_dir / "clinic-logo.png"
                Image.new("RGB", (90, 30), (200, 40, 40)).save(logo, "PNG")
                overrides = {**overrides, "clinic_logo_file": logo}
            settings.ehrs = [EhrSettings(**{**base, **overrides})]
            started[name] = stack.enter_context(running_app(settings, port=ports[name]))
        yield started


@pytest.fixture(autouse=True)
def fresh_server(ehr: SandboxEHR) -> None:
    ehr.fhir.set_profile("generic")
    ehr.fhir.reset()


def fhir_get(ehr: SandboxEHR, path: str, params: dict[str, str] | None = None) -> dict[str, Any]:
    response = httpx.get(
        f"{ehr.fhir_base}/{path}",
        params=params,
        headers={"Authorization": f"Bearer {ehr.mint_token()}"},
        timeout=30,
    )
    response.raise_for_status()
    return response.json()  # type: ignore[no-any-return]


def document_for(ehr: SandboxEHR, job_id: str) -> dict[str, Any]:
    bundle = fhir_get(
        ehr, "DocumentReference", {"identifier": f"{IDENTIFIER_SYSTEM}|{artifact_identifier(job_id)}"}
    )
    [document] = [entry["resource"] for entry in bundle["entry"]]
    return document


def generate(client: httpx.Client, csrf: str, condition_id: str) -> str:
    created = client.post(
        "/illustrations",
        data={"condition_id": condition_id, "style": "flat_vector", "language": "en", "csrf_token": csrf},
    )
    assert created.status_code == 303, created.text
    job_id = created.headers["location"].rsplit("/", 1)[1]
    assert wait_for_job(client, job_id)["status"] == "succeeded"
    return job_id


def approve(client: httpx.Client, job_id: str, csrf: str) -> httpx.Response:
    form = {
        "caption": "A picture about your health.",
        "alt_text": "Drawing for the test.",
        "csrf_token": csrf,
    }
    return client.post(f"/review/{job_id}/approve", data=form)


def saved_picture(client: httpx.Client) -> tuple[str, str, str]:
    """Generate and approve a picture; returns (job id, CSRF token, condition id)."""
    workspace = client.get("/app")
    csrf = csrf_from(workspace.text)
    condition_id = CONDITION.findall(workspace.text)[0]
    job_id = generate(client, csrf, condition_id)
    saved = approve(client, job_id, csrf)
    assert saved.status_code == 200, saved.text
    return job_id, csrf, condition_id


def history_rows(html: str) -> dict[str, str]:
    """document id → EHR status, from the workspace's history table."""
    return dict(re.findall(r'data-document-id="([^"]+)" data-status="([^"]+)"', html))


def audit_entries(app: RunningApp, action: str) -> list[Any]:
    async def search() -> list[Any]:
        async with app.services.sessionmaker() as db:
            return await app.services.audit.search(db, action=action)

    return app.call(search())  # type: ignore[no-any-return]


def local_status(app: RunningApp, job_id: str) -> str | None:
    async def load() -> str | None:
        async with app.services.sessionmaker() as db:
            document = await load_document(db, keyring=app.services.keyring, job_id=job_id)
            return document.status if document else None

    return app.call(load())  # type: ignore[no-any-return]


def test_workspace_lists_earlier_documents_with_status_and_audits_the_search(
    ehr: SandboxEHR, apps: dict[str, RunningApp]
) -> None:
    app = apps["full"]
    with launch_session(app.url, ehr) as client:
        assert 'data-testid="history"' not in client.get("/app").text
        job_id, _, _ = saved_picture(client)
        document_id = document_for(ehr, job_id)["id"]
        before = len(audit_entries(app, AuditAction.FHIR_SEARCH))
        workspace = client.get("/app")
    assert history_rows(workspace.text) == {document_id: "current"}
    assert "In the chart" in workspace.text
    assert f"/documents/{job_id}/withdraw" in workspace.text  # withdrawing asks first (a page with a reason)
    assert f"/documents/{job_id}/regenerate" in workspace.text
    searches = audit_entries(app, AuditAction.FHIR_SEARCH)[
        : len(audit_entries(app, AuditAction.FHIR_SEARCH)) - before
    ]
    history_search = [entry for entry in searches if entry.resource == "DocumentReference"]
    assert len(history_search) == 1
    assert history_search[0].outcome == "success"
    assert history_search[0].patient == "pat-1"
    assert history_search[0].detail == {"count": 1}


def test_history_shows_documents_written_by_an_earlier_launch(
    ehr: SandboxEHR, apps: dict[str, RunningApp]
) -> None:
    app = apps["full"]
    with launch_session(app.url, ehr) as first:
        job_id, _, _ = saved_picture(first)
    with launch_session(app.url, ehr) as second:
        workspace = second.get("/app")
        assert document_for(ehr, job_id)["id"] in history_rows(workspace.text)
        # A later launch for the same patient may still withdraw what an earlier one wrote.
        withdrawn = second.post(
            f"/documents/{job_id}/retract",
            data={"csrf_token": csrf_from(workspace.text), "reason": "content-error"},
        )
        assert withdrawn.status_code == 200, withdrawn.text
    assert document_for(ehr, job_id)["status"] == "entered-in-error"


def test_new_version_replaces_the_old_document_and_supersedes_it(
    ehr: SandboxEHR, apps: dict[str, RunningApp]
) -> None:
    app = apps["full"]
    with launch_session(app.url, ehr) as client:
        old_job, csrf, condition_id = saved_picture(client)
        old_id = document_for(ehr, old_job)["id"]
        started = client.post(f"/documents/{old_job}/regenerate", data={"csrf_token": csrf})
        assert started.status_code == 303, started.text
        new_job = started.headers["location"].rsplit("/", 1)[1]
        assert new_job != old_job
        assert wait_for_job(client, new_job)["status"] == "succeeded"
        saved = approve(client, new_job, csrf)
        assert saved.status_code == 200, saved.text
        assert 'data-testid="replaces"' in saved.text
        assert "now marked as replaced" in saved.text
        workspace = client.get("/app")
    new = document_for(ehr, new_job)
    assert new["relatesTo"] == [{"code": "replaces", "target": {"reference": f"DocumentReference/{old_id}"}}]
    assert new["context"]["related"] == [{"reference": f"Condition/{condition_id}"}]
    assert new["status"] == "current"
    assert document_for(ehr, old_job)["status"] == "superseded"
    assert history_rows(workspace.text) == {new["id"]: "current", old_id: "superseded"}
    assert "Replaced by a newer version" in workspace.text
    assert f"/documents/{old_job}/withdraw" not in workspace.text  # only current documents offer actions
    updates = audit_entries(app, AuditAction.SUPERSEDE)
    assert [entry.resource for entry in updates][:1] == [f"DocumentReference/{old_id}"]
    assert updates[0].detail == {"status": "superseded", "replaced_by": new["id"]}


def test_without_update_permission_the_old_document_stays_current_and_the_page_says_so(
    ehr: SandboxEHR, apps: dict[str, RunningApp]
) -> None:
    app = apps["no-update"]
    with launch_session(app.url, ehr) as client:
        old_job, csrf, _ = saved_picture(client)
        old_id = document_for(ehr, old_job)["id"]
        workspace = client.get("/app")
        assert f"/documents/{old_job}/regenerate" in workspace.text
        assert f"/documents/{old_job}/withdraw" not in workspace.text
        refused = client.post(
            f"/documents/{old_job}/retract", data={"csrf_token": csrf, "reason": "content-error"}
        )
        assert refused.status_code == 403
        assert "not allowed" in refused.text
        started = client.post(f"/documents/{old_job}/regenerate", data={"csrf_token": csrf})
        new_job = started.headers["location"].rsplit("/", 1)[1]
        assert wait_for_job(client, new_job)["status"] == "succeeded"
        saved = approve(client, new_job, csrf)
        assert saved.status_code == 200, saved.text
        assert "may not change documents" in saved.text
    assert document_for(ehr, old_job)["status"] == "current"
    assert document_for(ehr, new_job)["relatesTo"][0]["target"]["reference"] == f"DocumentReference/{old_id}"
    assert all(method != "PUT" for method in (r["method"] for r in ehr.fhir.requests()))


def test_withdraw_marks_entered_in_error_once_with_csrf_and_audit(
    ehr: SandboxEHR, apps: dict[str, RunningApp]
) -> None:
    app = apps["full"]
    with launch_session(app.url, ehr) as client:
        job_id, csrf, _ = saved_picture(client)
        document_id = document_for(ehr, job_id)["id"]
        forged = client.post(
            f"/documents/{job_id}/retract", data={"csrf_token": "not-the-token", "reason": "content-error"}
        )
        assert forged.status_code == 403
        assert document_for(ehr, job_id)["status"] == "current"
        before = len(audit_entries(app, AuditAction.RETRACT))
        withdrawn = client.post(
            f"/documents/{job_id}/retract", data={"csrf_token": csrf, "reason": "content-error"}
        )
        assert withdrawn.status_code == 200, withdrawn.text
        assert 'data-testid="retracted"' in withdrawn.text
        assert "already" not in withdrawn.text
        assert document_for(ehr, job_id)["status"] == "entered-in-error"
        assert local_status(app, job_id) == "retracted"
        again = client.post(
            f"/documents/{job_id}/retract", data={"csrf_token": csrf, "reason": "content-error"}
        )
        assert again.status_code == 200
        assert "it already was" in again.text
        reapproved = approve(client, job_id, csrf)
        assert reapproved.status_code == 409
        assert "withdrawn" in reapproved.text
        workspace = client.get("/app")
    assert history_rows(workspace.text) == {document_id: "entered-in-error"}
    assert "Withdrawn (entered in error)" in workspace.text
    records = audit_entries(app, AuditAction.RETRACT)[: len(audit_entries(app, AuditAction.RETRACT)) - before]
    assert [(r.outcome, r.resource, r.detail.get("already")) for r in reversed(records)] == [
        ("success", f"DocumentReference/{document_id}", False),
        ("success", f"DocumentReference/{document_id}", True),
    ]
    puts = [r for r in ehr.fhir.requests() if r["method"] == "PUT"]
    assert len(puts) == 1


def test_another_patients_launch_cannot_withdraw_or_replace(
    ehr: SandboxEHR, apps: dict[str, RunningApp]
) -> None:
    app = apps["full"]
    with launch_session(app.url, ehr) as client:
        job_id, _, _ = saved_picture(client)
    with launch_session(app.url, ehr, patient="pat-2", encounter="enc-2") as other:
        csrf = csrf_from(other.get("/app").text)
        assert (
            other.post(
                f"/documents/{job_id}/retract", data={"csrf_token": csrf, "reason": "content-error"}
            ).status_code
            == 404
        )
        assert other.post(f"/documents/{job_id}/regenerate", data={"csrf_token": csrf}).status_code == 404
        assert (
            other.post(
                "/documents/not-a-job/retract", data={"csrf_token": csrf, "reason": "content-error"}
            ).status_code
            == 404
        )
    assert document_for(ehr, job_id)["status"] == "current"


class FailingHistoryTransport(httpx.AsyncBaseTransport):
    """Real server for everything but the DocumentReference search, which answers a 400 OperationOutcome."""

    def __init__(self) -> None:
        self._real = httpx.AsyncHTTPTransport()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.method == "GET" and request.url.path.endswith("/DocumentReference"):
            outcome = {
                "resourceType": "OperationOutcome",
                "issue": [
                    {"severity": "error", "code": "not-supported", "diagnostics": "identifier search off"}
                ],
            }
            return httpx.Response(
                400, content=json.dumps(outcome).encode(), headers={"Content-Type": "application/fhir+json"}
            )
        return await self._real.handle_async_request(request)

    async def aclose(self) -> None:
        """Shared by every FhirClient of the app; closed by the test."""

    async def close_for_good(self) -> None:
        await self._real.aclose()


def test_failed_history_search_keeps_the_workspace_and_is_audited(
    ehr: SandboxEHR, apps: dict[str, RunningApp]
) -> None:
    app = apps["full"]
    transport = FailingHistoryTransport()
    app.services.fhir_transport = transport
    try:
        with launch_session(app.url, ehr) as client:
            workspace = client.get("/app")
    finally:
        app.services.fhir_transport = None
        app.call(transport.close_for_good())
    assert workspace.status_code == 200
    assert 'data-testid="history-unavailable"' in workspace.text
    assert CONDITION.findall(workspace.text)
    [latest] = [e for e in audit_entries(app, AuditAction.FHIR_SEARCH) if e.resource == "DocumentReference"][
        :1
    ]
    assert (latest.outcome, latest.detail) == ("failure", {"status": 400})


@pytest.mark.parametrize(
    ("patient", "encounter", "condition_id", "code"),
    [("pat-5", "enc-5", "cond-5-no-code", None), ("pat-6", "enc-6", "cond-6-no-text", "267036007")],
)
def test_conditions_without_text_show_a_sensible_label_and_can_be_illustrated(
    ehr: SandboxEHR,
    apps: dict[str, RunningApp],
    patient: str,
    encounter: str,
    condition_id: str,
    code: str | None,
) -> None:
    with launch_session(apps["full"].url, ehr, patient=patient, encounter=encounter) as client:
        workspace = client.get("/app")
        assert workspace.status_code == 200
        label = re.search(rf'value="{condition_id}"[^>]*>\s*<label[^>]*>(.*?)</label>', workspace.text, re.S)
        assert label, f"{condition_id} is listed"
        text = " ".join(re.sub(r"<[^>]+>", " ", label.group(1)).split())
        assert text.startswith("unspecified condition")
        assert "None" not in text
        assert (f"(code {code})" in text) == (code is not None)
        # No topic matches: before generating, the page says the handout will be general.
        fallback = re.search(
            rf'value="{condition_id}".*?data-testid="topic-fallback">(.*?)</p>', workspace.text, re.S
        )
        assert fallback, "the generic-fallback warning is shown"
        assert "will be general" in fallback.group(1)
        job_id = generate(client, csrf_from(workspace.text), condition_id)
        review = client.get(f"/review/{job_id}")
        assert review.status_code == 200
        assert "None" not in re.findall(r"<h1[^>]*>(.*?)</h1>", review.text)[0]


JARGON = (
    "Persistent hyperglycaemia necessitates comprehensive pharmacological intervention, "
    "multidisciplinary glycaemic surveillance and individualised nutritional modification."
)


def test_review_shows_the_handout_keeps_edits_and_needs_a_reason_above_the_reading_target(
    ehr: SandboxEHR, apps: dict[str, RunningApp]
) -> None:
    app = apps["full"]
    with launch_session(app.url, ehr) as client:
        workspace = client.get("/app")
        csrf = csrf_from(workspace.text)
        job_id = generate(client, csrf, CONDITION.findall(workspace.text)[0])
        review = client.get(f"/review/{job_id}")
        # The handout as the patient will get it: its pages as images of the real PDF.
        [page_url] = re.findall(rf'src="(/review/{job_id}/handout/1\.png\?rev=[0-9a-f]+)"', review.text)
        page = client.get(page_url)
        assert (page.status_code, page.headers["content-type"]) == (200, "image/png")
        assert page.content.startswith(b"\x89PNG")
        # Typing is kept (nothing lost on navigation) and redraws grade and handout.
        typed = client.post(
            f"/review/{job_id}/draft",
            data={"caption": JARGON, "alt_text": "A test drawing."},
            headers={"X-CSRF-Token": csrf},
        )
        assert typed.status_code == 200, typed.text
        assert "please simplify" in typed.text
        assert 'id="above_target_reason"' in typed.text
        assert 'hx-swap-oob="true"' in typed.text
        assert re.search(r"\?rev=([0-9a-f]+)", typed.text)
        assert page_url not in typed.text  # a new revision: the browser fetches the redrawn pages
        assert JARGON in client.get(f"/review/{job_id}").text
        edits = [e for e in audit_entries(app, AuditAction.EDIT_CAPTION) if e.detail.get("job_id") == job_id]
        assert edits
        assert edits[0].detail["fields"] == ["alt_text", "caption"]
        # Above the target, approval needs "approve anyway" with a reason; nothing is written without one.
        refused = client.post(
            f"/review/{job_id}/approve",
            data={"caption": JARGON, "alt_text": "A test drawing.", "csrf_token": csrf},
        )
        assert refused.status_code == 422
        assert "approve anyway" in refused.text
        assert local_status(app, job_id) == "draft"
        assert (
            fhir_get(ehr, "DocumentReference", {"identifier": f"{IDENTIFIER_SYSTEM}|"}).get("total", 0) == 0
        )
        saved = client.post(
            f"/review/{job_id}/approve",
            data={
                "caption": JARGON,
                "alt_text": "A test drawing.",
                "above_target_reason": "terms-explained",
                "csrf_token": csrf,
            },
        )
        assert saved.status_code == 200, saved.text
        # The confirmation: the same banner, open/print and give to patient.
        assert 'data-testid="patient-name"' in saved.text
        assert f'href="/documents/{job_id}/handout"' in saved.text
        assert f'action="/documents/{job_id}/give"' in saved.text
        printable = client.get(f"/documents/{job_id}/handout")
        assert printable.status_code == 200
        assert f'src="/documents/{job_id}/handout/1.png"' in printable.text
        assert client.get(f"/documents/{job_id}/handout/1.png").content.startswith(b"\x89PNG")
        assert client.get(f"/documents/{job_id}/handout.pdf").content.startswith(b"%PDF")
        given = client.post(f"/documents/{job_id}/give", data={"csrf_token": csrf})
        assert given.status_code == 200, given.text
        assert 'data-testid="handover-recorded"' in given.text
        again = client.post(f"/documents/{job_id}/give", data={"csrf_token": csrf})
        assert "already recorded" in again.text
        history = client.get("/app").text
    [approval] = [e for e in audit_entries(app, AuditAction.APPROVE) if e.detail.get("job_id") == job_id]
    assert approval.detail["above_target"] is True
    assert approval.detail["above_target_reason"] == "terms-explained"
    assert approval.detail["reading_grade"] > 6
    document = document_for(ehr, job_id)
    bundle = fhir_get(ehr, "Communication", {"identifier": f"urn:carecanvas:handover|{job_id}-given-v1"})
    [communication] = [entry["resource"] for entry in bundle["entry"]]
    assert communication["status"] == "completed"
    assert communication["subject"] == {"reference": "Patient/pat-1"}
    assert communication["payload"] == [
        {"contentReference": {"reference": f"DocumentReference/{document['id']}"}}
    ]
    given_records = [
        e for e in audit_entries(app, AuditAction.GIVE_HANDOUT) if e.detail.get("job_id") == job_id
    ]
    assert [(r.outcome, r.detail["recorded"], r.detail["already"]) for r in reversed(given_records)] == [
        ("success", True, False),
        ("success", True, True),
    ]
    # History rows: thumbnail, time, approver, open/print.
    assert f'src="/documents/{job_id}/thumbnail"' in history
    assert re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d", history)
    assert "prac-1 (you)" in history
    assert f'href="/documents/{job_id}/handout"' in history


def test_give_to_patient_is_skipped_with_a_note_where_the_ehr_records_no_communications(
    ehr: SandboxEHR, apps: dict[str, RunningApp]
) -> None:
    app = apps["full"]
    ehr.fhir.set_profile("pdf-only")  # a document-only EHR: its CapabilityStatement lists no Communication
    app.services.profiles.forget()
    try:
        with launch_session(app.url, ehr) as client:
            job_id, csrf, _ = saved_picture(client)
            given = client.post(f"/documents/{job_id}/give", data={"csrf_token": csrf})
    finally:
        app.services.profiles.forget()
    assert given.status_code == 200, given.text
    assert 'data-testid="handover-skipped"' in given.text
    assert "does not record handouts" in given.text
    assert fhir_get(ehr, "Communication", {"patient": "Patient/pat-1"}).get("entry", []) == []
    [record] = [e for e in audit_entries(app, AuditAction.GIVE_HANDOUT) if e.detail.get("job_id") == job_id]
    assert (record.outcome, record.detail["recorded"], record.detail["skipped"]) == (
        "success",
        False,
        "not-offered",
    )


def test_withdraw_asks_for_a_reason_writes_it_and_can_restore_the_previous_version(
    ehr: SandboxEHR, apps: dict[str, RunningApp]
) -> None:
    app = apps["full"]
    with launch_session(app.url, ehr) as client:
        old_job, csrf, _ = saved_picture(client)
        started = client.post(f"/documents/{old_job}/regenerate", data={"csrf_token": csrf})
        new_job = started.headers["location"].rsplit("/", 1)[1]
        assert wait_for_job(client, new_job)["status"] == "succeeded"
        # The new version starts from the text approved last time (edited), not a fresh template.
        review = client.get(f"/review/{new_job}").text
        assert "A picture about your health." in review
        assert "Drawing for the test." in review
        assert approve(client, new_job, csrf).status_code == 200
        assert document_for(ehr, old_job)["status"] == "superseded"
        confirm = client.get(f"/documents/{new_job}/withdraw")
        assert confirm.status_code == 200
        assert 'name="reason"' in confirm.text
        assert 'name="restore_previous"' in confirm.text
        # A stray submit without a reason changes nothing.
        stray = client.post(f"/documents/{new_job}/retract", data={"csrf_token": csrf})
        assert stray.status_code == 400
        assert document_for(ehr, new_job)["status"] == "current"
        withdrawn = client.post(
            f"/documents/{new_job}/retract",
            data={"csrf_token": csrf, "reason": "wrong-condition", "restore_previous": "yes"},
        )
        assert withdrawn.status_code == 200, withdrawn.text
        assert 'data-testid="restored"' in withdrawn.text
        assert "current again" in withdrawn.text
    new, old = document_for(ehr, new_job), document_for(ehr, old_job)
    assert (new["status"], old["status"]) == ("entered-in-error", "current")
    [reason] = [x for x in new.get("extension", []) if x["url"] == "urn:carecanvas:withdrawal-reason"]
    assert reason["valueCoding"]["code"] == "wrong-condition"
    [retract] = [e for e in audit_entries(app, AuditAction.RETRACT) if e.detail.get("job_id") == new_job]
    assert (retract.detail["reason"], retract.detail["reason_in_chart"]) == ("wrong-condition", True)
    [restore] = [e for e in audit_entries(app, AuditAction.RESTORE) if e.detail.get("job_id") == new_job]
    assert (restore.outcome, restore.resource, restore.detail["outcome"]) == (
        "success",
        f"DocumentReference/{old['id']}",
        "restored",
    )


def test_pending_drafts_are_listed_and_can_be_discarded(ehr: SandboxEHR, apps: dict[str, RunningApp]) -> None:
    app = apps["full"]
    with launch_session(app.url, ehr) as client:
        workspace = client.get("/app")
        csrf = csrf_from(workspace.text)
        job_id = generate(client, csrf, CONDITION.findall(workspace.text)[0])
        listed = client.get("/app").text
        assert f'data-job-id="{job_id}" data-testid="draft"' in listed
        assert f'href="/review/{job_id}"' in listed
        discarded = client.post(f"/drafts/{job_id}/discard", data={"csrf_token": csrf})
        assert discarded.status_code == 303
        assert f'data-job-id="{job_id}"' not in client.get("/app").text
        assert client.post(f"/drafts/{job_id}/discard", data={"csrf_token": csrf}).status_code == 404
    assert local_status(app, job_id) is None
    [record] = [e for e in audit_entries(app, AuditAction.REJECT) if e.detail.get("job_id") == job_id]
    assert record.detail["discarded"] is True


def test_the_review_preview_is_the_handout_approval_writes_byte_for_byte(
    ehr: SandboxEHR, apps: dict[str, RunningApp]
) -> None:
    """The handout the clinician sees before approving is the one written to the chart: same patient name,
    same "given by" (the first version's preview left both off), same bytes."""
    app = apps["full"]
    with launch_session(app.url, ehr) as client:
        workspace = client.get("/app")
        csrf = csrf_from(workspace.text)
        job_id = generate(client, csrf, CONDITION.findall(workspace.text)[0])
        preview = client.get(f"/api/v1/jobs/{job_id}/handout")
        assert (preview.status_code, preview.headers["content-type"]) == (200, "application/pdf")
        draft = client.get(f"/api/v1/jobs/{job_id}/draft").json()
        approved = client.post(
            f"/review/{job_id}/approve",
            data={"caption": draft["caption"], "alt_text": draft["alt_text"], "csrf_token": csrf},
        )
        assert approved.status_code == 200, approved.text
    bundle = fhir_get(
        ehr, "DocumentReference", {"identifier": f"{IDENTIFIER_SYSTEM}|{artifact_identifier(job_id)}"}
    )
    [document] = [entry["resource"] for entry in bundle["entry"]]
    [written] = [
        c["attachment"] for c in document["content"] if c["attachment"]["contentType"] == "application/pdf"
    ]
    text = " ".join(page.extract_text() for page in PdfReader(io.BytesIO(preview.content)).pages)
    assert "Maria Rivera" in text
    assert document["author"][0]["display"] in text  # the approving clinician, "given by"
    assert base64.b64decode(written["data"]) == preview.content


def test_the_clinics_name_phone_and_logo_from_the_registration_are_on_the_handout(
    ehr: SandboxEHR, apps: dict[str, RunningApp]
) -> None:
    """From the EHR registration to the written handout: the clinic's name and phone as text, its logo as a
    second image beside the picture (the registration without them prints neither)."""
    for name, clinic in (("clinic", True), ("full", False)):
        with launch_session(apps[name].url, ehr) as client:
            workspace = client.get("/app")
            csrf = csrf_from(workspace.text)
            job_id = generate(client, csrf, CONDITION.findall(workspace.text)[0])
            assert approve(client, job_id, csrf).status_code == 200
        bundle = fhir_get(
            ehr, "DocumentReference", {"identifier": f"{IDENTIFIER_SYSTEM}|{artifact_identifier(job_id)}"}
        )
        [document] = [entry["resource"] for entry in bundle["entry"]]
        [pdf] = [
            c["attachment"]
            for c in document["content"]
            if c["attachment"]["contentType"] == "application/pdf"
        ]
        [page] = PdfReader(io.BytesIO(base64.b64decode(pdf["data"]))).pages
        text = page.extract_text()
        assert ("Lakeside Family Clinic" in text, "+1 (555) 010-0100" in text) == (clinic, clinic), text
        assert len(page.images) == (2 if clinic else 1)
