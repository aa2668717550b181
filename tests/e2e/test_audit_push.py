"""`carecanvas audit push`: BALP AuditEvents to the sandbox EHR with a SMART Backend Services token."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from harness import RunningApp, free_port, launch_session, running_app

from sandbox.auth.config import DEMO_CLIENT_ID, ClientRegistration
from sandbox.run import SandboxEHR
from service import cli
from service.audit import AuditEntry
from service.audit.balp import BALP
from service.audit_push import (
    AuditPushError,
    PushResult,
    backend_registration,
    cursor_path,
    push_audit_events,
    read_cursor,
)
from service.ehrs import load_signing_key, origin_of
from service.settings import EhrSettings, Settings

EHR_NAME = "sandbox-push"
BACKEND_CLIENT = "carecanvas-backend"
SITE = "carecanvas-push-test"


def write_ec_key(path: Path) -> Path:
    key = ec.generate_private_key(ec.SECP384R1())
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return path


def register_backend(sandbox: SandboxEHR, jwks: dict[str, Any]) -> None:
    sandbox.register_client(
        ClientRegistration(
            BACKEND_CLIENT,
            client_type="confidential-asymmetric",
            jwks=jwks,
            scopes=["system/AuditEvent.c"],
        )
    )


@pytest.fixture(scope="module")
def push_settings(sandbox: SandboxEHR, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    data_dir = tmp_path_factory.mktemp("carecanvas-push")
    port = free_port()
    return Settings(
        data_dir=data_dir,
        public_url=f"http://127.0.0.1:{port}",
        embedded_worker=False,
        site_name=SITE,
        ehrs=[
            EhrSettings(
                name=EHR_NAME,
                iss=sandbox.fhir_base,
                client_id=DEMO_CLIENT_ID,
                client_auth="public",
                private_key_files=(write_ec_key(data_dir / "backend.pem"),),
                backend_client_id=BACKEND_CLIENT,
                frame_origins=(origin_of(sandbox.ehr_url),),
                auth_origins=(origin_of(sandbox.auth_base),),
            )
        ],
    )


@pytest.fixture(scope="module")
def push_app(sandbox: SandboxEHR, push_settings: Settings) -> Iterator[RunningApp]:
    port = int(push_settings.public_url.rsplit(":", 1)[1])
    demo = sandbox.server.clients.get(DEMO_CLIENT_ID)
    assert demo is not None
    demo.redirect_uris.append(f"{push_settings.public_url}/callback")
    with running_app(push_settings, port=port) as app:
        jwks = httpx.get(f"{app.url}/.well-known/jwks.json", timeout=30).json()
        register_backend(sandbox, jwks)
        yield app


def our_audit_events(sandbox: SandboxEHR) -> list[dict[str, Any]]:
    """Every AuditEvent on the FHIR server that this module's app sent (its source site)."""
    token = sandbox.mint_token(scope="user/AuditEvent.rs")
    events: list[dict[str, Any]] = []
    url: str | None = f"{sandbox.fhir_base}/AuditEvent?_count=200"
    with httpx.Client(headers={"Authorization": f"Bearer {token}"}, timeout=30) as client:
        while url:
            response = client.get(url)
            assert response.status_code == 200, response.text
            bundle = response.json()
            events.extend(entry["resource"] for entry in bundle.get("entry", []))
            url = next((link["url"] for link in bundle.get("link", []) if link["relation"] == "next"), None)
    return [event for event in events if event["source"]["site"] == SITE]


def ehr_records(app: RunningApp, *, after_seq: int = 0) -> list[AuditEntry]:
    async def load() -> list[AuditEntry]:
        async with app.services.sessionmaker() as db:
            return await app.services.audit.entries(db, after_seq=after_seq, limit=10_000)

    return [entry for entry in app.call(load()) if entry.ehr == EHR_NAME]


def push(app: RunningApp, *, limit: int = 1000) -> PushResult:
    return app.call(push_audit_events(app.services, ehr_name=EHR_NAME, limit=limit))  # type: ignore[no-any-return]


def cursor(app: RunningApp) -> int:
    return read_cursor(cursor_path(app.services.settings.data_dir, EHR_NAME))


def launch(app: RunningApp, sandbox: SandboxEHR) -> None:
    with launch_session(app.url, sandbox) as client:
        assert client.get("/app").status_code == 200


def push_exports(app: RunningApp) -> list[AuditEntry]:
    async def load() -> list[AuditEntry]:
        async with app.services.sessionmaker() as db:
            return await app.services.audit.search(db, action="audit.export", limit=100)

    return app.call(load())  # type: ignore[no-any-return]


# ---- tests (in file order: each builds on the server state the previous one left) -------------------


def test_push_sends_each_record_once_as_a_balp_audit_event(sandbox: SandboxEHR, push_app: RunningApp) -> None:
    launch(push_app, sandbox)
    records = ehr_records(push_app)
    assert any(record.patient == "pat-1" for record in records)

    result = push(push_app)

    assert result.pushed == len(records)
    events = our_audit_events(sandbox)
    assert len(events) == len(records)
    assert all(event["meta"]["profile"][0].startswith(BALP) for event in events)
    patient_refs = {entity["what"].get("reference") for event in events for entity in event.get("entity", [])}
    assert f"{sandbox.fhir_base}/Patient/pat-1" in patient_refs
    assert {event["recorded"] for event in events} == {
        record.recorded_at.isoformat(timespec="milliseconds").replace("+00:00", "Z") for record in records
    }
    assert cursor(push_app) == result.through_seq >= records[-1].seq
    export = push_exports(push_app)[0]
    assert export.outcome == "success"
    assert export.ehr is None  # a push record is never itself pushed (or every run would send one more)
    assert export.detail == {
        "count": len(records),
        "through_seq": result.through_seq,
        "pushed_to_ehr": EHR_NAME,
    }

    again = push(push_app)

    assert again.pushed == 0
    assert len(our_audit_events(sandbox)) == len(records)


def test_limit_splits_a_backlog_across_runs_without_gaps_or_repeats(
    sandbox: SandboxEHR, push_app: RunningApp
) -> None:
    before = len(our_audit_events(sandbox))
    start = cursor(push_app)
    launch(push_app, sandbox)
    new = ehr_records(push_app, after_seq=start)
    assert len(new) >= 3

    first = push(push_app, limit=2)
    assert first.pushed == 2
    assert cursor(push_app) == new[1].seq
    rest = push(push_app)
    assert rest.pushed == len(new) - 2

    events = our_audit_events(sandbox)
    assert len(events) == before + len(new)


def test_records_of_another_ehr_are_never_sent_but_the_cursor_moves_past_them(
    sandbox: SandboxEHR, push_app: RunningApp
) -> None:
    before = len(our_audit_events(sandbox))

    async def other_ehrs_record() -> int:
        async with push_app.services.sessionmaker() as db:
            ref = await push_app.services.audit.append(
                db,
                action="fhir.read",
                outcome="success",
                actor="Practitioner/elsewhere",
                patient="pat-elsewhere",
                ehr="another-ehr",
                resource="Condition/c-elsewhere",
                request_id=None,
            )
            await db.commit()
            return ref.seq

    seq = push_app.call(other_ehrs_record())

    result = push(push_app)

    assert result.pushed == 0
    assert cursor(push_app) >= seq
    events = our_audit_events(sandbox)
    assert len(events) == before
    assert "pat-elsewhere" not in json.dumps(events)


def test_an_ehr_5xx_stops_the_push_and_keeps_the_cursor(sandbox: SandboxEHR, push_app: RunningApp) -> None:
    launch(push_app, sandbox)
    start = cursor(push_app)
    before = len(our_audit_events(sandbox))
    posts: list[httpx.Request] = []

    def failing(request: httpx.Request) -> httpx.Response:
        posts.append(request)
        return httpx.Response(503, json={"resourceType": "OperationOutcome", "issue": []})

    push_app.services.fhir_transport = httpx.MockTransport(failing)
    try:
        with pytest.raises(AuditPushError) as raised:
            push(push_app)
    finally:
        push_app.services.fhir_transport = None

    message = str(raised.value)
    assert "did not accept audit record" in message
    assert "HTTP 503" in message
    assert "0 sent before it" in message
    assert len(posts) == 1  # a plain create is never retried: the EHR may have stored it
    assert posts[0].url.path.endswith("/AuditEvent")
    assert cursor(push_app) == start
    assert push_exports(push_app)[0].outcome == "failure"

    retried = push(push_app)
    assert retried.pushed == len(ehr_records(push_app, after_seq=start))
    assert len(our_audit_events(sandbox)) == before + retried.pushed


def test_a_refused_token_sends_nothing_and_says_why(
    sandbox: SandboxEHR, push_app: RunningApp, tmp_path: Path
) -> None:
    launch(push_app, sandbox)
    start = cursor(push_app)
    before = len(our_audit_events(sandbox))
    stranger = load_signing_key(write_ec_key(tmp_path / "stranger.pem"))
    register_backend(sandbox, {"keys": [stranger.public_jwk]})  # the EHR knows another key only
    try:
        with pytest.raises(AuditPushError) as raised:
            push(push_app)
    finally:
        register_backend(sandbox, httpx.get(f"{push_app.url}/.well-known/jwks.json", timeout=30).json())

    assert "backend-services token" in str(raised.value)
    assert "invalid_client" in str(raised.value)
    assert len(our_audit_events(sandbox)) == before
    assert cursor(push_app) == start


def test_missing_backend_client_or_key_or_unknown_ehr_is_a_clear_error(
    sandbox: SandboxEHR, push_app: RunningApp
) -> None:
    ehr = push_app.services.ehrs.by_name(EHR_NAME)
    with pytest.raises(AuditPushError, match="no backend_client_id"):
        backend_registration(push_app.services, ehr.model_copy(update={"backend_client_id": None}))
    with pytest.raises(AuditPushError, match="no private_key_files"):
        backend_registration(push_app.services, ehr.model_copy(update={"name": "keyless"}))
    with pytest.raises(AuditPushError, match=f"no EHR named 'elsewhere'; registered: {EHR_NAME}"):
        app_call_push(push_app, "elsewhere")
    with pytest.raises(AuditPushError, match="limit must be between"):
        push(push_app, limit=0)


def app_call_push(app: RunningApp, name: str) -> PushResult:
    return app.call(push_audit_events(app.services, ehr_name=name))  # type: ignore[no-any-return]


def test_cli_pushes_and_reports(
    sandbox: SandboxEHR,
    push_app: RunningApp,
    push_settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    launch(push_app, sandbox)
    pending = len(ehr_records(push_app, after_seq=cursor(push_app)))
    assert pending > 0
    monkeypatch.setenv("CARECANVAS_DATA_DIR", str(push_settings.data_dir))
    monkeypatch.setenv("CARECANVAS_PUBLIC_URL", push_settings.public_url)
    monkeypatch.setenv("CARECANVAS_SITE_NAME", SITE)
    monkeypatch.setenv(
        "CARECANVAS_EHRS", json.dumps([ehr.model_dump(mode="json") for ehr in push_settings.ehrs])
    )

    assert cli.main(["audit", "push", "--ehr", EHR_NAME]) == 0
    assert f"pushed {pending} AuditEvents to EHR '{EHR_NAME}'" in capsys.readouterr().out

    assert cli.main(["audit", "push", "--ehr", "nowhere"]) == 1
    assert "audit push failed: no EHR named 'nowhere'" in capsys.readouterr().err
