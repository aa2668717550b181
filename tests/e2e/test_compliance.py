"""The compliance console over real HTTP: staff OIDC sign-in at the sandbox provider, search, exports."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import re
import secrets
import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

import httpx
import pytest
from harness import RunningApp, free_port, launch_session, running_app

from sandbox.run import SandboxEHR
from sandbox.staff_oidc import STAFF_CALLBACK_PATH, STAFF_CLIENT_ID, StaffMisbehaviour
from service.audit import AuditEntry, AuditLog
from service.audit.search import AuditQuery, search_audit
from service.cli import demo_settings
from service.ehrs import origin_of
from service.settings import Settings
from service.web.staff_context import LOOPBACK_STAFF_COOKIE

OFFICER = "staff-olivia"
CLINICIAN = "staff-marcus"
OFFICER_ACTOR = f"urn:carecanvas:staff:{OFFICER}"
CLINICIAN_ACTOR = f"urn:carecanvas:staff:{CLINICIAN}"
SMART_COOKIE = "carecanvas_session"
CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')
HIDDEN = re.compile(r'<input type="hidden" name="([^"]+)" value="([^"]*)">')


# ---- helpers ------------------------------------------------------------------------------------------


@pytest.fixture
def staff_misbehave(sandbox: SandboxEHR) -> Iterator[StaffMisbehaviour]:
    try:
        yield sandbox.staff_oidc.config.misbehave
    finally:
        sandbox.staff_oidc.config.misbehave.reset()


def provider_answer(sandbox: SandboxEHR, authorize_url: str, user: str) -> str:
    """The sandbox provider's login page, the user picked, its redirect back to the app (a URL)."""
    login_page = httpx.get(authorize_url, timeout=30)
    assert login_page.status_code == 200, login_page.text
    form = dict(HIDDEN.findall(login_page.text))
    answer = httpx.post(
        sandbox.staff_oidc.config.authorization_endpoint,
        data={**form, "selected_user": user},
        timeout=30,
        follow_redirects=False,
    )
    assert answer.status_code == 302, answer.text
    return str(answer.headers["location"])


def start_sign_in(client: httpx.Client) -> str:
    started = client.get("/compliance/login")
    assert started.status_code == 302, started.text
    return str(started.headers["location"])


def sign_in(app_url: str, sandbox: SandboxEHR, user: str = OFFICER) -> tuple[httpx.Client, httpx.Response]:
    """A full staff sign-in over HTTP; the client holds the staff cookie (the caller closes it)."""
    client = httpx.Client(base_url=app_url, follow_redirects=False, timeout=60)
    callback = provider_answer(sandbox, start_sign_in(client), user)
    assert callback.startswith(f"{app_url}{STAFF_CALLBACK_PATH}")
    return client, client.get(callback.removeprefix(app_url))


@contextlib.contextmanager
def officer(app_url: str, sandbox: SandboxEHR) -> Iterator[httpx.Client]:
    client, finished = sign_in(app_url, sandbox)
    try:
        assert finished.status_code == 303, finished.text
        assert finished.headers["location"] == "/compliance"
        yield client
    finally:
        client.close()


def csrf_of(client: httpx.Client) -> str:
    match = CSRF.search(client.get("/compliance").text)
    assert match, "console page has no CSRF token"
    return match.group(1)


def search(client: httpx.Client, **filters: str) -> httpx.Response:
    """Submit the search form (post/redirect/get) and follow to the results page."""
    posted = client.post("/compliance/search", data={"csrf_token": csrf_of(client), **filters})
    assert posted.status_code == 303, posted.text
    return client.get(posted.headers["location"])


def records(app: RunningApp, **filters: Any) -> list[AuditEntry]:
    async def load() -> list[AuditEntry]:
        async with app.services.sessionmaker() as db:
            page = await search_audit(db, app.services.audit, AuditQuery(limit=500, **filters))
            return page.entries

    result: list[AuditEntry] = app.call(load())
    return result


def seed(app: RunningApp, rows: list[dict[str, Any]], *, at: datetime | None = None) -> None:
    """Audit records through the app's real audit chain (optionally as if written at `at`)."""

    async def append() -> None:
        audit = app.services.audit
        if at is not None:
            audit = AuditLog(app.services.keyring, clock=lambda: at)
        async with app.services.sessionmaker() as db:
            for row in rows:
                await audit.append(
                    db,
                    action=row.get("action", "fhir.read"),
                    outcome=row.get("outcome", "success"),
                    actor=row.get("actor"),
                    patient=row.get("patient"),
                    ehr=row.get("ehr"),
                    resource=row.get("resource"),
                    request_id=row.get("request_id"),
                    detail=row.get("detail"),
                )
            await db.commit()

    app.call(append())


def seqs_on_page(html: str) -> list[int]:
    return [int(seq) for seq in re.findall(r'data-testid="entry" data-seq="(\d+)"', html)]


def tag() -> str:
    return secrets.token_hex(4)


# ---- sign-in ------------------------------------------------------------------------------------------


def test_officer_signs_in_and_the_login_is_audited(sandbox: SandboxEHR, carecanvas: RunningApp) -> None:
    with officer(carecanvas.url, sandbox) as client:
        home = client.get("/compliance")
        assert home.status_code == 200
        assert "Olivia Okafor-Test" in home.text
        assert "frame-ancestors 'none'" in home.headers["content-security-policy"]
        assert home.headers["cache-control"] == "no-store"
        cookie = client.cookies.get(LOOPBACK_STAFF_COOKIE)
        assert cookie
        assert client.cookies.get(SMART_COOKIE) is None
    [login] = records(carecanvas, actor=OFFICER_ACTOR, action="login")[:1]
    assert login.outcome == "success"
    assert login.detail["kind"] == "staff"
    assert login.ehr is None


def test_sign_in_uses_pkce_state_and_nonce(sandbox: SandboxEHR, carecanvas: RunningApp) -> None:
    with httpx.Client(base_url=carecanvas.url, follow_redirects=False, timeout=30) as client:
        query = parse_qs(urlsplit(start_sign_in(client)).query)
    assert query["client_id"] == [STAFF_CLIENT_ID]
    assert query["code_challenge_method"] == ["S256"]
    assert len(query["code_challenge"][0]) == 43
    assert len(query["state"][0]) >= 43  # 256 bits
    assert len(query["nonce"][0]) >= 43
    assert query["redirect_uri"] == [f"{carecanvas.url}{STAFF_CALLBACK_PATH}"]
    assert set(query["scope"][0].split()) >= {"openid", "groups"}


def test_clinician_without_the_role_is_denied_and_audited(
    sandbox: SandboxEHR, carecanvas: RunningApp
) -> None:
    client, finished = sign_in(carecanvas.url, sandbox, CLINICIAN)
    with contextlib.closing(client):
        assert finished.status_code == 403
        assert "Dr. Marcus Lee-Test" in finished.text
        assert "carecanvas-compliance" in finished.text
        assert "Traceback" not in finished.text
        # No staff session was left behind: the console sends them to sign in again.
        again = client.get("/compliance")
        assert again.status_code == 303
        assert again.headers["location"] == "/compliance/login"
    [denied] = records(carecanvas, actor=CLINICIAN_ACTOR, action="login")[:1]
    assert denied.outcome == "denied"
    assert denied.detail["reason"] == "missing_role"
    assert denied.detail["required_role"] == "carecanvas-compliance"


def failed_sign_ins(app: RunningApp) -> list[AuditEntry]:
    return [
        entry
        for entry in records(app, action="login", outcome="failure")
        if entry.detail.get("kind") == "staff"
    ]


def test_a_tampered_state_is_refused_and_audited(sandbox: SandboxEHR, carecanvas: RunningApp) -> None:
    before = len(failed_sign_ins(carecanvas))
    with httpx.Client(base_url=carecanvas.url, follow_redirects=False, timeout=30) as client:
        callback = urlsplit(provider_answer(sandbox, start_sign_in(client), OFFICER))
        params = parse_qs(callback.query)
        params["state"] = ["forged-" + params["state"][0]]
        forged = urlunsplit(callback._replace(query=urlencode(params, doseq=True)))
        refused = client.get(forged.removeprefix(carecanvas.url))
        assert refused.status_code == 400
        assert "did not sign you in" in refused.text
        # The pending sign-in was spent by the forged answer; the real one cannot follow it.
        params["state"] = [params["state"][0].removeprefix("forged-")]
        replay = client.get(
            urlunsplit(callback._replace(query=urlencode(params, doseq=True))).removeprefix(carecanvas.url)
        )
        assert replay.status_code == 400
        assert client.get("/compliance").status_code == 303
    reasons = [
        entry.detail["reason"]
        for entry in failed_sign_ins(carecanvas)[: len(failed_sign_ins(carecanvas)) - before]
    ]
    assert "state_mismatch" in reasons
    assert "no_pending_sign_in" in reasons


def test_a_callback_from_another_browser_is_refused(sandbox: SandboxEHR, carecanvas: RunningApp) -> None:
    with httpx.Client(base_url=carecanvas.url, follow_redirects=False, timeout=30) as client:
        callback = provider_answer(sandbox, start_sign_in(client), OFFICER)
    with httpx.Client(base_url=carecanvas.url, follow_redirects=False, timeout=30) as stranger:
        refused = stranger.get(callback.removeprefix(carecanvas.url))
        assert refused.status_code == 400
        assert stranger.get("/compliance").status_code == 303


@pytest.mark.parametrize(
    "switch",
    [
        "id_token_wrong_nonce",
        "id_token_expired",
        "id_token_wrong_aud",
        "id_token_wrong_issuer",
        "id_token_wrong_key",
        "id_token_alg_none",
    ],
)
def test_an_id_token_that_does_not_verify_is_refused(
    sandbox: SandboxEHR, carecanvas: RunningApp, staff_misbehave: StaffMisbehaviour, switch: str
) -> None:
    setattr(staff_misbehave, switch, True)
    before = len(failed_sign_ins(carecanvas))
    client, finished = sign_in(carecanvas.url, sandbox)
    with contextlib.closing(client):
        assert finished.status_code == 400
        assert "id_token did not verify" in finished.text
        assert client.get("/compliance").status_code == 303
    newest = failed_sign_ins(carecanvas)
    assert len(newest) == before + 1
    assert newest[0].detail["reason"] == "id_token_invalid"
    assert newest[0].actor is None


def test_a_provider_error_answer_is_shown_readably(sandbox: SandboxEHR, carecanvas: RunningApp) -> None:
    with httpx.Client(base_url=carecanvas.url, follow_redirects=False, timeout=30) as client:
        state = parse_qs(urlsplit(start_sign_in(client)).query)["state"][0]
        refused = client.get(STAFF_CALLBACK_PATH, params={"error": "access_denied", "state": state})
        assert refused.status_code == 400
        assert "did not sign you in" in refused.text
    assert failed_sign_ins(carecanvas)[0].detail["reason"] == "provider_error"


def test_a_smart_clinician_session_never_opens_the_console(
    sandbox: SandboxEHR, carecanvas: RunningApp
) -> None:
    with launch_session(carecanvas.url, sandbox) as clinician:
        assert clinician.get("/app").status_code == 200
        for path in ("/compliance", "/compliance/reports", "/compliance/integrity"):
            refused = clinician.get(path)
            assert refused.status_code == 303, path
            assert refused.headers["location"] == "/compliance/login"
        posted = clinician.post("/compliance/integrity/verify", data={"csrf_token": "x"})
        assert posted.status_code == 401
        # Even the clinician's own cookie value presented as a staff cookie is no staff session.
        smart_value = clinician.cookies.get(SMART_COOKIE)
        assert smart_value
        with httpx.Client(base_url=carecanvas.url, follow_redirects=False, timeout=30) as forged:
            forged.cookies.set(LOOPBACK_STAFF_COOKIE, smart_value)
            assert forged.get("/compliance").status_code == 303


def test_a_staff_session_never_opens_the_clinician_pages(sandbox: SandboxEHR, carecanvas: RunningApp) -> None:
    with officer(carecanvas.url, sandbox) as client:
        assert client.get("/app").status_code == 401
        staff_value = client.cookies.get(LOOPBACK_STAFF_COOKIE)
        assert staff_value
        with httpx.Client(base_url=carecanvas.url, follow_redirects=False, timeout=30) as forged:
            forged.cookies.set(SMART_COOKIE, staff_value)
            assert forged.get("/app").status_code in (401, 403)


def test_logout_needs_csrf_ends_the_session_and_is_audited(
    sandbox: SandboxEHR, carecanvas: RunningApp
) -> None:
    with officer(carecanvas.url, sandbox) as client:
        token = csrf_of(client)
        assert client.post("/compliance/logout", data={"csrf_token": "wrong"}).status_code == 403
        assert client.get("/compliance").status_code == 200
        out = client.post("/compliance/logout", data={"csrf_token": token})
        assert out.status_code == 200
        assert "signed out" in out.text
        assert client.get("/compliance").status_code == 303
    assert records(carecanvas, actor=OFFICER_ACTOR, action="logout")


# ---- search, drill-downs, timeline --------------------------------------------------------------------


def test_each_filter_narrows_to_exactly_the_matching_records(
    sandbox: SandboxEHR, carecanvas: RunningApp
) -> None:
    t = tag()
    ehr = f"ehr-{t}"
    patient_a, patient_b = f"Patient/a-{t}", f"Patient/b-{t}"
    user_a, user_b = f"Practitioner/u-{t}", f"Practitioner/v-{t}"
    seed(
        carecanvas,
        [
            {
                "actor": user_a,
                "patient": patient_a,
                "ehr": ehr,
                "action": "fhir.read",
                "request_id": f"r1-{t}",
            },
            {
                "actor": user_a,
                "patient": patient_b,
                "ehr": ehr,
                "action": "generate",
                "request_id": f"r1-{t}",
            },
            {"actor": user_b, "patient": patient_a, "ehr": ehr, "action": "fhir.read", "outcome": "denied"},
            {"actor": user_b, "patient": patient_b, "ehr": ehr, "action": "view", "request_id": f"r2-{t}"},
        ],
    )
    mine = {entry.seq: entry for entry in records(carecanvas, ehr=ehr)}
    assert len(mine) == 4

    def expect(filters: dict[str, str], wanted: set[int]) -> None:
        shown = search(client, **filters)
        assert shown.status_code == 200, shown.text
        assert set(seqs_on_page(shown.text)) == wanted, filters
        assert f">{len(wanted)} record" in shown.text

    def where(**match: str) -> set[int]:
        return {seq for seq, entry in mine.items() if all(getattr(entry, k) == v for k, v in match.items())}

    with officer(carecanvas.url, sandbox) as client:
        expect({"ehr": ehr}, set(mine))
        expect({"ehr": ehr, "patient": patient_a}, where(patient=patient_a))
        # A bare id is the same patient; the officer's own earlier search for them is a record too (no EHR).
        expect({"ehr": ehr, "patient": patient_a.removeprefix("Patient/")}, where(patient=patient_a))
        expect({"actor": user_b}, where(actor=user_b))
        expect({"ehr": ehr, "action": "fhir.read"}, where(action="fhir.read"))
        expect({"ehr": ehr, "outcome": "denied"}, where(outcome="denied"))
        expect({"request_id": f"r1-{t}"}, where(request_id=f"r1-{t}"))
        first = min(mine.values(), key=lambda entry: entry.seq).recorded_at
        expect({"ehr": ehr, "until": (first - timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%S")}, set())
        expect({"ehr": ehr, "since": (first - timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%S")}, set(mine))


def test_bad_filters_get_a_readable_answer(sandbox: SandboxEHR, carecanvas: RunningApp) -> None:
    with officer(carecanvas.url, sandbox) as client:
        token = csrf_of(client)
        for filters, words in (
            ({"patient": "not a reference!"}, "patient must be"),
            ({"action": "DROP TABLE"}, "action must be"),
            ({"outcome": "maybe"}, "outcome must be"),
            ({"since": "yesterday"}, "is not a date or time"),
            ({"since": "2026-12-02T00:00", "until": "2026-12-01T00:00"}, "since must be earlier"),
        ):
            answer = client.post("/compliance/search", data={"csrf_token": token, **filters})
            assert answer.status_code == 400, filters
            assert words in answer.text
        assert client.post("/compliance/search", data={"csrf_token": "forged"}).status_code == 403
        assert client.get("/compliance/search/unknownquery1").status_code == 404
        assert client.get("/compliance/search/bad!").status_code == 422


def test_patient_references_never_enter_a_url(sandbox: SandboxEHR, carecanvas: RunningApp) -> None:
    t = tag()
    seed(carecanvas, [{"actor": f"Practitioner/u-{t}", "patient": f"Patient/p-{t}", "ehr": f"ehr-{t}"}])
    with officer(carecanvas.url, sandbox) as client:
        shown = search(client, patient=f"Patient/p-{t}")
        assert f"p-{t}" not in str(shown.url)
        hrefs = re.findall(r'href="([^"]+)"', shown.text)
        assert hrefs
        assert all(f"p-{t}" not in href for href in hrefs)


def test_sorting_and_pages_cover_every_record_once(sandbox: SandboxEHR, carecanvas: RunningApp) -> None:
    t = tag()
    ehr = f"ehr-{t}"
    seed(
        carecanvas,
        [{"actor": f"Practitioner/u-{t}", "ehr": ehr, "request_id": f"r-{i}-{t}"} for i in range(57)],
    )
    with officer(carecanvas.url, sandbox) as client:
        first = search(client, ehr=ehr)
        assert ">57 records" in first.text
        newest = seqs_on_page(first.text)
        assert len(newest) == 50
        assert newest == sorted(newest, reverse=True)
        next_link = re.search(r'href="([^"]+)" rel="next"', first.text)
        assert next_link
        second = client.get(next_link.group(1).replace("&amp;", "&"))
        rest = seqs_on_page(second.text)
        assert len(rest) == 7
        assert 'rel="prev"' in second.text
        assert 'rel="next"' not in second.text
        everything = {entry.seq for entry in records(carecanvas, ehr=ehr)}
        assert set(newest) | set(rest) == everything
        query_id = str(first.url).rsplit("/", 1)[-1]
        oldest = seqs_on_page(client.get(f"/compliance/search/{query_id}?order=oldest").text)
        assert oldest == sorted(everything)[:50]
        assert client.get(f"/compliance/search/{query_id}?order=sideways").status_code == 422


def test_drill_down_from_a_user_to_patients_and_back_to_users(
    sandbox: SandboxEHR, carecanvas: RunningApp
) -> None:
    t = tag()
    user_a, user_b = f"Practitioner/u-{t}", f"Practitioner/v-{t}"
    patient_a, patient_b = f"Patient/a-{t}", f"Patient/b-{t}"
    seed(
        carecanvas,
        [
            {"actor": user_a, "patient": patient_a},
            {"actor": user_a, "patient": patient_a},
            {"actor": user_a, "patient": patient_b},
            {"actor": user_b, "patient": patient_a},
        ],
    )
    with officer(carecanvas.url, sandbox) as client:
        user_page = search(client, view="user", actor=user_a)
        assert user_page.status_code == 200
        assert user_page.url.path.startswith("/compliance/user/")
        rows = re.findall(r'data-testid="touched-patient">(.*?)</tr>', user_page.text, re.S)
        assert len(rows) == 2
        assert any(patient_a in row and "<td>2</td>" in row for row in rows)
        patient_page = search(client, view="patient", patient=patient_a)
        users = re.findall(r'data-testid="touching-user">(.*?)</tr>', patient_page.text, re.S)
        assert len(users) == 2
        assert any(user_b in row and "<td>1</td>" in row for row in users)
        missing = client.post("/compliance/search", data={"csrf_token": csrf_of(client), "view": "user"})
        assert missing.status_code == 400
        assert "choose a user" in missing.text


def test_timeline_of_one_request_in_chain_order(sandbox: SandboxEHR, carecanvas: RunningApp) -> None:
    t = tag()
    request_id = f"req-{t}"
    seed(
        carecanvas,
        [
            {"actor": f"Practitioner/u-{t}", "action": "launch", "request_id": request_id},
            {"actor": "Practitioner/someone-else", "action": "view", "request_id": f"other-{t}"},
            {
                "actor": f"Practitioner/u-{t}",
                "action": "fhir.read",
                "patient": f"Patient/p-{t}",
                "request_id": request_id,
            },
        ],
    )
    with officer(carecanvas.url, sandbox) as client:
        shown = client.get(f"/compliance/timeline/{request_id}")
        assert shown.status_code == 200
        seqs = seqs_on_page(shown.text)
        assert len(seqs) == 2
        assert seqs == sorted(seqs)
        assert client.get("/compliance/timeline/bad%20id").status_code == 422


def test_session_timeline_from_a_launch_until_the_next(sandbox: SandboxEHR, carecanvas: RunningApp) -> None:
    t = tag()
    user, ehr = f"Practitioner/u-{t}", f"ehr-{t}"
    seed(
        carecanvas,
        [
            {"actor": user, "ehr": ehr, "action": "launch"},
            {"actor": user, "ehr": ehr, "action": "fhir.read", "patient": f"Patient/p-{t}"},
            {"actor": f"Practitioner/other-{t}", "ehr": ehr, "action": "fhir.read"},
            {"actor": user, "ehr": ehr, "action": "generate"},
            {"actor": user, "ehr": ehr, "action": "launch"},
            {"actor": user, "ehr": ehr, "action": "view"},
        ],
    )
    mine = sorted(records(carecanvas, ehr=ehr), key=lambda entry: entry.seq)
    first_launch = mine[0].seq
    with officer(carecanvas.url, sandbox) as client:
        listed = search(client, ehr=ehr)
        assert f'href="/compliance/session/{first_launch}"' in listed.text
        shown = client.get(f"/compliance/session/{first_launch}")
        assert shown.status_code == 200
        assert seqs_on_page(shown.text) == [mine[0].seq, mine[1].seq, mine[3].seq]
        not_a_launch = client.get(f"/compliance/session/{mine[1].seq}")
        assert not_a_launch.status_code == 404
        assert "is not a launch" in not_a_launch.text
        assert client.get("/compliance/session/0").status_code == 422
    viewed = [
        e
        for e in records(carecanvas, actor=OFFICER_ACTOR, action="audit.search")
        if e.detail.get("view") == "launch_timeline"
    ]
    assert viewed[0].detail["launch_seq"] == first_launch
    assert viewed[0].detail["count"] == 3


def test_patient_names_come_from_stored_sessions_or_the_reference(
    sandbox: SandboxEHR, carecanvas: RunningApp
) -> None:
    with launch_session(
        carecanvas.url, sandbox, patient="pat-4", practitioner="prac-3", encounter="enc-4"
    ) as clinician:
        assert clinician.get("/app").status_code == 200  # the workspace keeps the banner (encrypted)
        with officer(carecanvas.url, sandbox) as client:
            shown = search(client, patient="Patient/pat-4")
            assert "Otto Schmidt" in shown.text
            t = tag()
            seed(carecanvas, [{"actor": "Practitioner/prac-3", "patient": f"Patient/n-{t}"}])
            unnamed = search(client, patient=f"Patient/n-{t}")
            assert f"Patient/n-{t}" in unnamed.text


# ---- exports ------------------------------------------------------------------------------------------


def test_exports_hold_exactly_the_filtered_set_and_are_audited(
    sandbox: SandboxEHR, carecanvas: RunningApp
) -> None:
    t = tag()
    ehr = f"ehr-{t}"
    seed(
        carecanvas,
        [
            {"actor": f"Practitioner/u-{t}", "patient": f"Patient/p-{i % 3}-{t}", "ehr": ehr}
            for i in range(60)
        ],
    )
    seed(carecanvas, [{"actor": f"Practitioner/u-{t}", "ehr": f"other-{t}"}])
    wanted = sorted(entry.seq for entry in records(carecanvas, ehr=ehr, patient=f"Patient/p-1-{t}"))
    assert len(wanted) == 20
    with officer(carecanvas.url, sandbox) as client:
        shown = search(client, ehr=ehr, patient=f"Patient/p-1-{t}")
        query_id = str(shown.url).rsplit("/", 1)[-1]
        as_csv = client.get(f"/compliance/search/{query_id}/export.csv")
        assert as_csv.status_code == 200
        assert as_csv.headers["content-type"].startswith("text/csv")
        assert "attachment" in as_csv.headers["content-disposition"]
        rows = list(csv.DictReader(io.StringIO(as_csv.text)))
        assert [int(row["seq"]) for row in rows] == wanted
        assert all(len(row["hash"]) == 64 for row in rows)
        ndjson = client.get(f"/compliance/search/{query_id}/export.ndjson")
        events = [json.loads(line) for line in ndjson.text.splitlines() if line]
        assert len(events) == 20
        assert {event["resourceType"] for event in events} == {"AuditEvent"}
        bundle = client.get(f"/compliance/search/{query_id}/export.bundle").json()
        assert bundle["resourceType"] == "Bundle"
        assert len(bundle["entry"]) == 20
        assert client.get(f"/compliance/search/{query_id}/export.xlsx").status_code == 422
    exports = [
        e
        for e in records(carecanvas, actor=OFFICER_ACTOR, action="audit.export")
        if e.detail["filters"].get("ehr") == ehr
    ]
    assert sorted(e.detail["format"] for e in exports) == ["bundle", "csv", "ndjson"]
    assert all(e.detail["count"] == 20 for e in exports)
    assert all(e.patient == f"Patient/p-1-{t}" for e in exports)


def test_every_search_and_view_is_audited_with_its_filters(
    sandbox: SandboxEHR, carecanvas: RunningApp
) -> None:
    t = tag()
    patient = f"Patient/p-{t}"
    seed(carecanvas, [{"actor": f"Practitioner/u-{t}", "patient": patient, "request_id": f"r-{t}"}])
    with officer(carecanvas.url, sandbox) as client:
        search(client, patient=patient)
        search(client, view="patient", patient=patient)
        search(client, view="user", actor=f"Practitioner/u-{t}")
        client.get(f"/compliance/timeline/r-{t}")
    searches = records(carecanvas, actor=OFFICER_ACTOR, action="audit.search")
    views = {entry.detail.get("view") for entry in searches if t in json.dumps(entry.detail["filters"])}
    assert views == {"search", "users_who_touched", "patients_touched_by", "timeline"}
    # The patient's own history shows the officer looking them up.
    looked_up = records(carecanvas, patient=patient, action="audit.search")
    assert {entry.actor for entry in looked_up} == {OFFICER_ACTOR}
    assert all(entry.resource == "AuditEvent" for entry in looked_up)


# ---- reports ------------------------------------------------------------------------------------------


def test_reports_explain_their_rules_and_find_what_they_describe(
    sandbox: SandboxEHR, carecanvas: RunningApp
) -> None:
    t = tag()
    night = datetime.now(UTC).replace(hour=23, minute=30, second=0, microsecond=0) - timedelta(days=1)
    seed(
        carecanvas,
        [{"actor": f"Practitioner/night-{t}", "patient": f"Patient/p-{t}", "action": "fhir.read"}],
        at=night,
    )
    seed(carecanvas, [{"actor": f"Practitioner/denied-{t}", "action": "fhir.read", "outcome": "denied"}])
    with officer(carecanvas.url, sandbox) as client:
        index = client.get("/compliance/reports")
        assert index.status_code == 200
        assert len(re.findall('data-testid="report-rule"', index.text)) == 5
        for kind in (
            "after-hours",
            "many-patients",
            "no-encounter",
            "failed-or-denied",
            "exports-and-key-operations",
        ):
            shown = client.get(f"/compliance/reports/{kind}")
            assert shown.status_code == 200, kind
            assert 'data-testid="report-rule-text"' in shown.text
        day = night.date().isoformat()
        after_hours = client.get("/compliance/reports/after-hours", params={"since": day, "until": day})
        assert f"Practitioner/night-{t}" in after_hours.text
        assert "20:00" in after_hours.text
        failed = client.get("/compliance/reports/failed-or-denied")
        assert f"Practitioner/denied-{t}" in failed.text
        assert client.get("/compliance/reports/everything").status_code == 422
        backwards = client.get(
            "/compliance/reports/after-hours", params={"since": "2026-12-05", "until": "2026-12-01"}
        )
        assert backwards.status_code == 400
    reported = [
        e for e in records(carecanvas, actor=OFFICER_ACTOR, action="audit.search") if "report" in e.detail
    ]
    assert {e.detail["report"] for e in reported} >= {"after-hours", "failed-or-denied"}


# ---- integrity ------------------------------------------------------------------------------------------


def test_integrity_panel_and_verify_now(sandbox: SandboxEHR, carecanvas: RunningApp) -> None:
    with officer(carecanvas.url, sandbox) as client:
        panel = client.get("/compliance/integrity")
        assert panel.status_code == 200
        length = int(re.search(r'data-testid="chain-length">([\d,]+)<', panel.text).group(1).replace(",", ""))  # type: ignore[union-attr]
        assert length > 0
        assert "audit-checkpoints" in panel.text
        assert client.post("/compliance/integrity/verify", data={"csrf_token": "forged"}).status_code == 403
        verified = client.post("/compliance/integrity/verify", data={"csrf_token": csrf_of(client)})
        assert verified.status_code == 200
        assert 'data-testid="verify-ok"' in verified.text
    [record] = records(carecanvas, actor=OFFICER_ACTOR, action="audit.verify")[:1]
    assert record.detail["ok"] is True
    assert record.detail["count"] >= length


@pytest.fixture(scope="module")
def lone_app(sandbox: SandboxEHR, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningApp]:
    """A second CareCanvas with its own database (no worker), whose log the tamper test may break."""
    port = free_port()
    settings = demo_settings(
        data_dir=tmp_path_factory.mktemp("compliance-lone"),
        fhir_base=sandbox.fhir_base,
        auth_base=sandbox.auth_base,
        ehr_origin=origin_of(sandbox.ehr_url),
        port=port,
    ).model_copy(update={"embedded_worker": False})
    for client in sandbox.staff_oidc.clients.values():
        client.redirect_uris.append(f"http://127.0.0.1:{port}{STAFF_CALLBACK_PATH}")
    with running_app(settings, port=port) as app:
        yield app


def test_verify_now_names_the_first_bad_record(sandbox: SandboxEHR, lone_app: RunningApp) -> None:
    seed(lone_app, [{"actor": "Practitioner/prac-1", "patient": "Patient/pat-1"} for _ in range(5)])
    [third] = [entry for entry in records(lone_app) if entry.seq == 3]
    database = Path(lone_app.services.settings.resolved_database_url.removeprefix("sqlite+aiosqlite:///"))
    # Someone with direct database access rewrites record 3 (dropping the guard trigger first).
    with contextlib.closing(sqlite3.connect(database)) as raw:
        triggers = [row[0] for row in raw.execute("SELECT name FROM sqlite_master WHERE type='trigger'")]
        for trigger in triggers:
            raw.execute(f'DROP TRIGGER "{trigger}"')
        raw.execute("UPDATE audit_records SET outcome = 'denied' WHERE seq = ?", (third.seq,))
        raw.commit()
    with officer(lone_app.url, sandbox) as client:
        verified = client.post("/compliance/integrity/verify", data={"csrf_token": csrf_of(client)})
        assert verified.status_code == 200
        assert 'data-testid="verify-broken"' in verified.text
        assert 'data-testid="first-bad">First bad record: 3<' in verified.text


def test_the_console_is_off_without_a_staff_identity_provider(tmp_path: Path) -> None:
    port = free_port()
    settings = Settings(data_dir=tmp_path, public_url=f"http://127.0.0.1:{port}", embedded_worker=False)
    with running_app(settings, port=port) as app, httpx.Client(base_url=app.url, timeout=30) as client:
        for path in ("/compliance", "/compliance/login"):
            answer = client.get(path, follow_redirects=False)
            assert answer.status_code == 404
            assert "not switched on" in answer.text


def test_an_unreachable_identity_provider_gets_a_readable_page(tmp_path: Path) -> None:
    port = free_port()
    dead = f"http://127.0.0.1:{free_port()}/staff"
    settings = Settings.model_validate(
        {
            "data_dir": tmp_path,
            "public_url": f"http://127.0.0.1:{port}",
            "embedded_worker": False,
            "staff_oidc": {"issuer": dead, "client_id": "carecanvas-staff"},
        }
    )
    with running_app(settings, port=port) as app, httpx.Client(base_url=app.url, timeout=30) as client:
        answer = client.get("/compliance/login", follow_redirects=False)
        assert answer.status_code == 502
        assert "could not be reached" in answer.text
        assert client.cookies.get(LOOPBACK_STAFF_COOKIE) is None
