"""Portrait reviewers by staff OIDC sign-in, the reviewer's approval gating write-back, and the clinician
seeing the reviewers' notes in any session (issue 13), over real HTTP against the sandbox EHR."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from harness import (
    RunningApp,
    csrf_from,
    free_port,
    generate_picture,
    launch_session,
    running_app,
    wait_for_job,
)

from sandbox.run import SandboxEHR
from sandbox.staff_oidc import PORTRAIT_ARTIST_GROUP, STAFF_CALLBACK_PATH
from service.audit import AuditAction, AuditEntry
from service.cli import demo_settings
from service.ehrs import origin_of
from service.staff_auth import RETURN_TARGETS, StaffPending, checked_return_to
from service.workflows.reviewer import notes_for

ARTIST = "staff-rosa"
ARTIST_NAME = "Rosa Alvarez-Test"
ARTIST_ACTOR = f"urn:carecanvas:staff:{ARTIST}"
OFFICER = "staff-olivia"  # compliance role only
CLINICIAN = "staff-marcus"  # neither role
HIDDEN = re.compile(r'<input type="hidden" name="([^"]+)" value="([^"]*)">')


@pytest.fixture(scope="module")
def gate_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def gate_sandbox(gate_port: int) -> Iterator[SandboxEHR]:
    app_url = f"http://127.0.0.1:{gate_port}"
    with SandboxEHR(app_launch_url=f"{app_url}/launch", redirect_uris=[f"{app_url}/callback"]) as ehr:
        yield ehr


@pytest.fixture(scope="module")
def gate_app(
    gate_sandbox: SandboxEHR, gate_port: int, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningApp]:
    """Reviewers by staff sign-in only (no fhirUser list): the gate is on because staff roles are set."""
    folder: Path = tmp_path_factory.mktemp("portrait-gate")
    settings = demo_settings(
        data_dir=folder,
        fhir_base=gate_sandbox.fhir_base,
        auth_base=gate_sandbox.auth_base,
        ehr_origin=origin_of(gate_sandbox.ehr_url),
        port=gate_port,
    )
    assert settings.staff_oidc is not None
    staff = settings.staff_oidc.model_copy(update={"reviewer_roles": {PORTRAIT_ARTIST_GROUP: "artist"}})
    with running_app(settings.model_copy(update={"staff_oidc": staff}), port=gate_port) as app:
        yield app


def staff_sign_in(app: RunningApp, sandbox: SandboxEHR, user: str) -> tuple[httpx.Client, httpx.Response]:
    """/reviewer/login, the sandbox provider (user picked), then the callback; the client keeps the cookie."""
    client = httpx.Client(base_url=app.url, follow_redirects=False, timeout=60)
    started = client.get("/reviewer/login")
    assert started.status_code == 302, started.text
    login_page = httpx.get(started.headers["location"], timeout=30)
    form = dict(HIDDEN.findall(login_page.text))
    answer = httpx.post(
        sandbox.staff_oidc.config.authorization_endpoint,
        data={**form, "selected_user": user},
        timeout=30,
        follow_redirects=False,
    )
    assert answer.status_code == 302, answer.text
    callback = str(answer.headers["location"])
    assert callback.startswith(f"{app.url}{STAFF_CALLBACK_PATH}")
    return client, client.get(callback.removeprefix(app.url))


def audit_entries(app: RunningApp, action: str) -> list[AuditEntry]:
    async def read() -> list[AuditEntry]:
        async with app.services.sessionmaker() as db:
            return await app.services.audit.search(db, action=action, limit=1000)

    result: list[AuditEntry] = app.call(read())
    return result


def documents_for(sandbox: SandboxEHR, job_id: str) -> list[dict]:
    token = sandbox.mint_token(scope="user/*.read", fhirUser=f"{sandbox.fhir_base}/Practitioner/prac-1")
    bundle = httpx.get(
        f"{sandbox.fhir_base}/DocumentReference",
        params={"identifier": f"urn:carecanvas:artifact|{job_id}-illustration-v1"},
        headers={"Authorization": f"Bearer {token}"},
        timeout=30,
    ).json()
    return [entry["resource"] for entry in bundle.get("entry", [])]


def start_portrait(client: httpx.Client) -> tuple[str, str, str]:
    """One finished portrait variant: (job id, variants page path, CSRF token)."""
    client.get("/app")
    page = client.get("/portraits")
    csrf = csrf_from(page.text)
    started = client.post(
        "/portraits", data={"csrf_token": csrf, "style": "watercolour", "language": "en", "variants": "1"}
    )
    assert started.status_code == 303, started.text
    location = started.headers["location"]
    [job_id] = location.split("jobs=", 1)[1].split(",")
    assert wait_for_job(client, job_id)["status"] == "succeeded"
    return job_id, location, csrf


def send(client: httpx.Client, job_id: str, location: str, csrf: str, note: str) -> None:
    jobs = location.split("jobs=", 1)[1]
    sent = client.post(f"/portraits/{job_id}/send", data={"csrf_token": csrf, "jobs": jobs, "note": note})
    assert sent.status_code == 303, sent.text


def write_back(client: httpx.Client, job_id: str, csrf: str) -> httpx.Response:
    return client.post(
        f"/review/{job_id}/approve",
        data={"caption": "Your garden at dawn.", "alt_text": "A garden picture.", "csrf_token": csrf},
    )


def test_a_sign_in_goes_back_only_to_a_fixed_page() -> None:
    assert RETURN_TARGETS == ("/compliance", "/reviewer")
    for value in ("https://evil.example/", "//evil.example", "/reviewer/../x", None, 3):
        assert checked_return_to(value) == "/compliance"
    assert checked_return_to("/reviewer") == "/reviewer"
    raw = {
        "kind": "staff",
        "state": "s",
        "nonce": "n",
        "code_verifier": "v",
        "created_at": "2026-01-01T00:00:00+00:00",
        "redirect_uri": "http://127.0.0.1/compliance/callback",
        "provider": {"issuer": "i", "authorization_endpoint": "a", "token_endpoint": "t", "jwks_uri": "j"},
        "return_to": "https://evil.example/",
    }
    assert StaffPending.from_dict(raw).return_to == "/compliance"


def test_a_staff_reviewer_signs_in_sends_back_and_approves_and_the_gate_holds(
    gate_app: RunningApp, gate_sandbox: SandboxEHR
) -> None:
    with launch_session(gate_app.url, gate_sandbox, patient="pat-1", encounter="enc-1") as clinician:
        job_id, location, csrf = start_portrait(clinician)

        # Never sent to a reviewer: the review page says so, and the write-back is refused (page and API),
        # nothing reaches the EHR.
        assert 'data-testid="held-for-reviewer"' in clinician.get(f"/review/{job_id}").text
        refused = write_back(clinician, job_id, csrf)
        assert refused.status_code == 409
        assert "Send it to the reviewer first" in refused.text
        api = clinician.post(f"/api/v1/jobs/{job_id}/approve", headers={"x-csrf-token": csrf}, json={})
        assert api.status_code == 409, api.text
        assert api.json()["code"] == "portrait_not_reviewed"
        assert documents_for(gate_sandbox, job_id) == []
        denied = [e for e in audit_entries(gate_app, AuditAction.APPROVE) if e.detail.get("job_id") == job_id]
        assert [e.outcome for e in denied] == ["denied", "denied"]
        assert {e.detail["review_status"] for e in denied} == {"not_sent"}

        send(clinician, job_id, location, csrf, "She loves the sea.")
        waiting = write_back(clinician, job_id, csrf)
        assert waiting.status_code == 409
        assert "waiting for the reviewer" in waiting.text

        # The artist signs in by staff OIDC (no EHR launch) and lands on the queue.
        reviewer, finished = staff_sign_in(gate_app, gate_sandbox, ARTIST)
        with contextlib.closing(reviewer):
            assert finished.status_code == 303, finished.text
            assert finished.headers["location"] == "/reviewer"
            queue = reviewer.get("/reviewer")
            assert queue.status_code == 200, queue.text
            assert "frame-ancestors 'none'" in queue.headers["content-security-policy"]
            assert f'data-job-id="{job_id}" data-status="waiting"' in queue.text
            assert ARTIST_NAME in queue.text
            assert "Maria Rivera" in queue.text
            draft = reviewer.get(f"/reviewer/{job_id}")
            assert draft.status_code == 200
            assert 'data-testid="patient-name">Maria Rivera' in draft.text  # the draft's patient's banner
            assert "She loves the sea." in draft.text
            assert reviewer.get(f"/reviewer/{job_id}/image").content.startswith(b"\x89PNG")
            token = csrf_from(draft.text)
            assert (
                reviewer.post(
                    f"/reviewer/{job_id}/note", data={"csrf_token": "wrong", "note": "x"}
                ).status_code
                == 403
            )
            back = reviewer.post(
                f"/reviewer/{job_id}/send-back", data={"csrf_token": token, "note": "Add the lighthouse."}
            )
            assert back.status_code == 303
            assert f"by {ARTIST_NAME} (artist)" in reviewer.get(f"/reviewer/{job_id}").text

            # Sent back: still refused.
            after_send_back = write_back(clinician, job_id, csrf)
            assert after_send_back.status_code == 409
            assert "sent this portrait back" in after_send_back.text

            # Any other session of the clinician for this patient sees the note (read from the database).
            with launch_session(gate_app.url, gate_sandbox, patient="pat-1", encounter="enc-1") as later:
                later.get("/app")
                portraits = later.get("/portraits").text
                assert f'data-job-id="{job_id}" data-review="sent_back"' in portraits
                assert "Add the lighthouse." in portraits
                assert f"Sent back by {ARTIST_NAME} (artist)" in portraits
                opened = later.get(f"/portraits/drafts/{job_id}")
                assert opened.status_code == 200
                assert "Add the lighthouse." in opened.text
                assert later.get(f"/portraits/drafts/{job_id}/image").content.startswith(b"\x89PNG")
            with launch_session(gate_app.url, gate_sandbox, patient="pat-2", encounter="enc-2") as other:
                other.get("/app")
                assert f'data-job-id="{job_id}"' not in other.get("/portraits").text
                assert other.get(f"/portraits/drafts/{job_id}").status_code == 404
                assert other.get(f"/portraits/drafts/{job_id}/image").status_code == 404

            send(clinician, job_id, location, csrf, "Lighthouse added.")
            approved = reviewer.post(
                f"/reviewer/{job_id}/approve", data={"csrf_token": token, "note": "Lovely."}
            )
            assert approved.status_code == 303

            # The role is read again on every request: taken away in the settings, the queue closes at once.
            staff = gate_app.services.settings.staff_oidc
            assert staff is not None
            saved = dict(staff.reviewer_roles)
            staff.reviewer_roles.clear()
            try:
                closed = reviewer.get("/reviewer")
                assert closed.status_code == 403
                assert "You are not a portrait reviewer" in closed.text
            finally:
                staff.reviewer_roles.update(saved)
            assert reviewer.get("/reviewer").status_code == 200
            signed_out = reviewer.post("/reviewer/logout", data={"csrf_token": token})
            assert signed_out.status_code == 200
            assert reviewer.get("/reviewer").status_code == 303  # back to the sign-in

        later_page = clinician.get("/portraits").text
        assert f'data-job-id="{job_id}" data-review="approved"' in later_page
        assert f"Approved by {ARTIST_NAME} (artist)" in later_page
        assert 'data-testid="held-for-reviewer"' not in clinician.get(f"/review/{job_id}").text
        written = write_back(clinician, job_id, csrf)
        assert written.status_code == 200, written.text

    [document] = documents_for(gate_sandbox, job_id)
    token = gate_sandbox.mint_token(
        scope="user/*.read", fhirUser=f"{gate_sandbox.fhir_base}/Practitioner/prac-1"
    )
    provenance = httpx.get(
        f"{gate_sandbox.fhir_base}/Provenance",
        params={"target": f"DocumentReference/{document['id']}"},
        headers={"Authorization": f"Bearer {token}"},
        timeout=30,
    ).json()["entry"][0]["resource"]
    [agent] = [a for a in provenance["agent"] if a["who"]["reference"] == "#staff-reviewer"]
    assert agent["who"]["display"] == ARTIST_NAME
    [reviewer_resource] = [r for r in provenance["contained"] if r["id"] == "staff-reviewer"]
    assert reviewer_resource["identifier"] == [{"system": "urn:carecanvas:staff", "value": ARTIST}]
    assert reviewer_resource["name"] == [{"text": ARTIST_NAME}]
    assert agent["role"] == [{"text": "portrait reviewer (artist)"}]
    for action in (AuditAction.PORTRAIT_SEND_BACK, AuditAction.PORTRAIT_APPROVE):
        [entry] = [e for e in audit_entries(gate_app, action) if e.detail.get("job_id") == job_id]
        assert entry.actor == ARTIST_ACTOR
        assert entry.actor_display == ARTIST_NAME
        assert entry.patient == "pat-1"

    async def kinds() -> list[str]:
        async with gate_app.services.sessionmaker() as db:
            notes = await notes_for(db, keyring=gate_app.services.keyring, job_id=job_id)
        return [note.kind.value for note in notes]

    assert gate_app.call(kinds()) == ["sent", "send_back", "sent", "approve"]


def test_staff_without_a_reviewer_role_get_a_readable_403(
    gate_app: RunningApp, gate_sandbox: SandboxEHR
) -> None:
    client, finished = staff_sign_in(gate_app, gate_sandbox, CLINICIAN)
    with contextlib.closing(client):
        assert finished.status_code == 403
        assert "You do not have access to the portrait review queue" in finished.text
        assert PORTRAIT_ARTIST_GROUP in finished.text
    # An officer signs in (the console's role) but the queue stays closed to them, with a page that says why.
    client, finished = staff_sign_in(gate_app, gate_sandbox, OFFICER)
    with contextlib.closing(client):
        assert finished.status_code == 303
        refused = client.get("/reviewer")
        assert refused.status_code == 403
        assert "You are not a portrait reviewer" in refused.text
        assert "Olivia Okafor-Test" in refused.text
    # No session at all: the queue sends the browser to the reviewer sign-in.
    with httpx.Client(base_url=gate_app.url, follow_redirects=False, timeout=30) as nobody:
        answer = nobody.get("/reviewer")
        assert answer.status_code == 303
        assert answer.headers["location"] == "/reviewer/login"


def test_education_pictures_are_never_gated(gate_app: RunningApp, gate_sandbox: SandboxEHR) -> None:
    with launch_session(gate_app.url, gate_sandbox, patient="pat-1", encounter="enc-1") as client:
        job_id, csrf = generate_picture(client)
        assert 'data-testid="held-for-reviewer"' not in client.get(f"/review/{job_id}").text
        approved = client.post(
            f"/review/{job_id}/approve",
            data={"caption": "Your heart.", "alt_text": "A heart picture.", "csrf_token": csrf},
        )
        assert approved.status_code == 200, approved.text
