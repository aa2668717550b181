"""SMART launch hardening through the service, against the sandbox EHR over real HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import structlog
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from harness import CONDITION, RunningApp, csrf_from, free_port, launch_session, running_app, wait_for_job
from test_bad_input import CountingListener

from sandbox.auth.config import ClientRegistration, Misbehaviour
from sandbox.run import SandboxEHR
from service.app import create_app
from service.ehrs import origin_of
from service.logging import configure_logging
from service.settings import EhrSettings, Settings
from service.web.security import SECURE_COOKIE_NAME

COOKIE = "carecanvas_session"
OTHER_PATIENTS_CONDITION = "cond-2-asthma"  # belongs to pat-2; the launches below are for pat-1


# ---- helpers ------------------------------------------------------------------------------------------


@pytest.fixture
def misbehave(sandbox: SandboxEHR) -> Iterator[Misbehaviour]:
    try:
        yield sandbox.misbehave
    finally:
        sandbox.misbehave.reset()


@contextlib.contextmanager
def outbound_requests(app: RunningApp) -> Iterator[list[httpx.URL]]:
    """Every request the app's SMART clients (discovery, token, JWKS, style; every EHR's pool) send."""
    seen: list[httpx.URL] = []

    async def record(request: httpx.Request) -> None:
        seen.append(request.url)

    clients = [app.services.http, *app.services.connections.all_clients()]
    for client in clients:
        hooks = client.event_hooks
        hooks["request"] = [*hooks["request"], record]
        client.event_hooks = hooks
    try:
        yield seen
    finally:
        for client in clients:
            hooks = client.event_hooks
            hooks["request"] = [hook for hook in hooks["request"] if hook is not record]
            client.event_hooks = hooks


def token_requests(urls: list[httpx.URL]) -> list[httpx.URL]:
    return [url for url in urls if url.path.endswith("/token")]


def start(client: httpx.Client, sandbox: SandboxEHR, *, patient: str = "pat-1") -> str:
    """GET /launch; returns the authorize URL the app redirected to."""
    launch_id = sandbox.create_launch(patient, "prac-1", None)
    started = client.get("/launch", params={"iss": sandbox.fhir_base, "launch": launch_id})
    assert started.status_code == 302, started.text
    return started.headers["location"]


def authorize(authorize_url: str) -> httpx.URL:
    """Follow the authorize redirect as the browser would; returns the callback URL (code + state)."""
    authorized = httpx.get(authorize_url, follow_redirects=False, timeout=30)
    assert authorized.status_code in (302, 303), authorized.text
    return httpx.URL(authorized.headers["location"])


def session_data(app: RunningApp, client: httpx.Client, cookie: str = COOKIE) -> dict[str, Any]:
    async def load() -> dict[str, Any]:
        async with app.services.sessionmaker() as db:
            session = await app.services.sessions.load(db, client.cookies.get(cookie))
            await db.commit()
        assert session is not None
        return session.data.model_dump()

    return app.call(load())  # type: ignore[no-any-return]


# ---- unregistered and hostile issuers ---------------------------------------------------------------


@pytest.mark.parametrize(
    "iss_template",
    [
        "http://127.0.0.1:{port}/fhir",  # other host (a different origin than the registration's)
        "http://2130706433:{port}/fhir",  # IP literal in decimal form (= 127.0.0.1)
        "http://[::ffff:127.0.0.1]:{port}/fhir",  # IPv6-mapped IP literal
        "{registered}@127.0.0.1:{port}/fhir",  # prefix look-alike: userinfo repeating the registered origin
        "{registered}.127.0.0.1.nip.io:{port}/fhir",  # prefix look-alike on another host
        "http://169.254.169.254/latest/meta-data/",  # cloud metadata address
    ],
)
def test_unregistered_iss_gets_400_and_no_connection_anywhere(
    sandbox: SandboxEHR, carecanvas: RunningApp, iss_template: str
) -> None:
    listener = CountingListener()
    registered_origin = origin_of(sandbox.fhir_base)
    fhir_requests_before = len(sandbox.fhir.requests())
    try:
        iss = iss_template.format(port=listener.port, registered=registered_origin)
        with outbound_requests(carecanvas) as sent:
            response = httpx.get(f"{carecanvas.url}/launch", params={"iss": iss, "launch": "x"}, timeout=30)
        time.sleep(0.3)
    finally:
        listener.close()
    assert response.status_code == 400
    assert "not registered" in response.text
    assert "set-cookie" not in response.headers
    assert listener.connections == 0
    assert sent == []
    assert len(sandbox.fhir.requests()) == fhir_requests_before


@pytest.mark.parametrize("switch", ["foreign_issuer", "foreign_token_endpoint"])
def test_discovery_naming_a_foreign_issuer_or_token_endpoint_is_refused_readably(
    sandbox: SandboxEHR, carecanvas: RunningApp, misbehave: Misbehaviour, switch: str
) -> None:
    setattr(misbehave, switch, True)
    with outbound_requests(carecanvas) as sent, httpx.Client(base_url=carecanvas.url, timeout=30) as client:
        launch_id = sandbox.create_launch("pat-1", "prac-1", None)
        response = client.get("/launch", params={"iss": sandbox.fhir_base, "launch": launch_id})
    assert response.status_code == 502
    assert "sign-in server that is not one of the addresses registered" in response.text
    assert "<h1" in response.text
    assert "Traceback" not in response.text
    assert "set-cookie" not in response.headers  # no session, no redirect to the foreign server
    assert [url.path for url in sent] == ["/fhir/.well-known/smart-configuration"]


# ---- state ----------------------------------------------------------------------------------------------


def test_forged_and_missing_state_are_refused_without_a_token_request(
    sandbox: SandboxEHR, carecanvas: RunningApp
) -> None:
    for params in ({"state": "forged-" + "A" * 43}, {}):
        with httpx.Client(base_url=carecanvas.url, timeout=30) as client:
            callback = authorize(start(client, sandbox))
            with outbound_requests(carecanvas) as sent:
                response = client.get("/callback", params={"code": callback.params["code"], **params})
            assert response.status_code == 400
            assert "launch CareCanvas again" in response.text
            assert token_requests(sent) == []
            assert client.get("/app").status_code == 401


def test_state_of_another_session_is_refused_and_leaves_that_session_usable(
    sandbox: SandboxEHR, carecanvas: RunningApp
) -> None:
    with (
        httpx.Client(base_url=carecanvas.url, timeout=30) as victim,
        httpx.Client(base_url=carecanvas.url, timeout=30) as attacker,
    ):
        victims_callback = authorize(start(victim, sandbox))
        start(attacker, sandbox)  # the attacker has a session with a pending authorization of its own
        with outbound_requests(carecanvas) as sent:
            stolen = attacker.get(victims_callback.path + "?" + victims_callback.query.decode())
        assert stolen.status_code == 400
        assert token_requests(sent) == []
        assert attacker.get("/app").status_code == 401
        finished = victim.get(victims_callback.path + "?" + victims_callback.query.decode())
        assert finished.status_code == 303
        assert victim.get("/app").status_code == 200


def test_reused_callback_is_refused_without_a_second_token_request(
    sandbox: SandboxEHR, carecanvas: RunningApp
) -> None:
    with httpx.Client(base_url=carecanvas.url, timeout=30) as client:
        callback = authorize(start(client, sandbox))
        target = callback.path + "?" + callback.query.decode()
        with outbound_requests(carecanvas) as sent:
            first = client.get(target)
            second = client.get(target)
        assert first.status_code == 303
        assert second.status_code == 400
        assert len(token_requests(sent)) == 1


def test_a_code_used_twice_is_refused_by_the_ehr_and_the_second_session_gets_nothing(
    sandbox: SandboxEHR, carecanvas: RunningApp
) -> None:
    with (
        httpx.Client(base_url=carecanvas.url, timeout=30) as first,
        httpx.Client(base_url=carecanvas.url, timeout=30) as second,
    ):
        used = authorize(start(first, sandbox))
        assert first.get(used.path + "?" + used.query.decode()).status_code == 303
        own_state = httpx.URL(start(second, sandbox)).params["state"]
        with outbound_requests(carecanvas) as sent:
            replay = second.get("/callback", params={"code": used.params["code"], "state": own_state})
        assert len(token_requests(sent)) == 1  # state was valid, so the code went to the EHR ...
        assert replay.status_code == 400  # ... which refused it
        assert "could not be verified" in replay.text
        assert second.get("/app").status_code == 401


# ---- id_token, scopes, refresh ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "switch",
    [
        "id_token_wrong_key",
        "id_token_alg_none",
        "id_token_wrong_aud",
        "id_token_expired",
        "id_token_wrong_nonce",
    ],
)
def test_bad_id_tokens_are_refused_with_a_readable_page(
    sandbox: SandboxEHR, carecanvas: RunningApp, misbehave: Misbehaviour, switch: str
) -> None:
    setattr(misbehave, switch, True)
    with httpx.Client(base_url=carecanvas.url, timeout=30) as client:
        callback = authorize(start(client, sandbox))
        response = client.get(callback.path + "?" + callback.query.decode())
        assert response.status_code == 400
        assert "could not be verified" in response.text
        assert "Traceback" not in response.text
        assert client.get("/app").status_code == 401


def test_narrower_scopes_degrade_the_app_instead_of_failing(
    sandbox: SandboxEHR, carecanvas: RunningApp, misbehave: Misbehaviour
) -> None:
    misbehave.grant_fewer_scopes = {"patient/DocumentReference.cruds"}
    with launch_session(carecanvas.url, sandbox) as client:
        assert "patient/DocumentReference.cruds" not in session_data(carecanvas, client)["token_set"]["scope"]
        workspace = client.get("/app")
        assert workspace.status_code == 200
        assert 'data-testid="degraded-notice"' in workspace.text
        csrf = csrf_from(workspace.text)
        created = client.post(
            "/illustrations",
            data={
                "condition_id": CONDITION.findall(workspace.text)[0],
                "style": "flat_vector",
                "language": "en",
                "csrf_token": csrf,
            },
        )
        assert created.status_code == 303, created.text
        job_id = created.headers["location"].rsplit("/", 1)[1]
        assert wait_for_job(client, job_id)["status"] == "succeeded"
        review = client.get(f"/review/{job_id}")
        assert review.status_code == 200
        assert "Approve and save to chart" not in review.text
        assert "not allowed for this launch" in review.text
        refused = client.post(
            f"/review/{job_id}/approve", data={"caption": "c", "alt_text": "a", "csrf_token": csrf}
        )
        assert refused.status_code == 403


def test_token_expiry_mid_session_costs_exactly_one_refresh(
    sandbox: SandboxEHR, carecanvas: RunningApp, misbehave: Misbehaviour
) -> None:
    misbehave.access_token_lifetime = 1
    with launch_session(carecanvas.url, sandbox) as client:
        misbehave.access_token_lifetime = None  # the refreshed token lives an hour
        time.sleep(1.5)
        with outbound_requests(carecanvas) as sent:
            workspace = client.get("/app")
        assert workspace.status_code == 200
        assert 'data-testid="patient-name"' in workspace.text
        assert len(token_requests(sent)) == 1
        with outbound_requests(carecanvas) as sent_later:
            assert client.get("/app").status_code == 200
        assert token_requests(sent_later) == []


def test_rotated_refresh_token_replaces_the_old_one(
    sandbox: SandboxEHR, carecanvas: RunningApp, misbehave: Misbehaviour
) -> None:
    misbehave.access_token_lifetime = 1
    misbehave.rotate_refresh_tokens = True
    with launch_session(carecanvas.url, sandbox) as client:
        misbehave.access_token_lifetime = None
        original = session_data(carecanvas, client)["token_set"]["refresh_token"]
        time.sleep(1.5)
        assert client.get("/app").status_code == 200
        rotated = session_data(carecanvas, client)["token_set"]["refresh_token"]
        assert rotated
        assert rotated != original
        assert sandbox.server.store.get_refresh(original).is_revoked()  # type: ignore[union-attr]
        assert not sandbox.server.store.get_refresh(rotated).is_revoked()  # type: ignore[union-attr]


def test_revoked_session_asks_for_a_new_launch_without_redirecting(
    sandbox: SandboxEHR, carecanvas: RunningApp, misbehave: Misbehaviour
) -> None:
    misbehave.access_token_lifetime = 1
    with launch_session(carecanvas.url, sandbox) as client:
        misbehave.access_token_lifetime = None
        refresh_token = session_data(carecanvas, client)["token_set"]["refresh_token"]
        sandbox.server.store.revoke_refresh(sandbox.server.store.get_refresh(refresh_token))  # type: ignore[arg-type]
        time.sleep(1.5)
        for _ in range(2):  # asking again gives the same page: no loop, no redirect
            response = client.get("/app")
            assert response.status_code == 401
            assert "location" not in response.headers
            assert "launch CareCanvas again" in response.text


def test_expired_server_session_asks_for_a_new_launch(sandbox: SandboxEHR, carecanvas: RunningApp) -> None:
    from sqlalchemy import update

    from service.db.models import WebSession as WebSessionRow
    from service.sessions import hash_session_id

    with launch_session(carecanvas.url, sandbox) as client:
        id_hash = hash_session_id(client.cookies[COOKIE])

        async def expire() -> None:
            async with carecanvas.services.sessionmaker() as db:
                await db.execute(
                    update(WebSessionRow)
                    .where(WebSessionRow.id_hash == id_hash)
                    .values(expires_at=WebSessionRow.created_at)
                )
                await db.commit()

        carecanvas.call(expire())
        response = client.get("/app")
        assert response.status_code == 401
        assert "location" not in response.headers
        assert "open CareCanvas again" in response.text


def test_another_patients_condition_gets_403(sandbox: SandboxEHR, carecanvas: RunningApp) -> None:
    with launch_session(carecanvas.url, sandbox) as client:
        csrf = csrf_from(client.get("/app").text)
        response = client.post(
            "/illustrations",
            data={
                "condition_id": OTHER_PATIENTS_CONDITION,
                "style": "flat_vector",
                "language": "en",
                "csrf_token": csrf,
            },
        )
        assert response.status_code == 403
        assert "Traceback" not in response.text


# ---- headers, cookies, CSRF, Origin ---------------------------------------------------------------------


def test_callback_sends_no_referrer_and_csp_names_the_ehr_origin(
    sandbox: SandboxEHR, carecanvas: RunningApp
) -> None:
    with httpx.Client(base_url=carecanvas.url, timeout=30) as client:
        callback = authorize(start(client, sandbox))
        finished = client.get(callback.path + "?" + callback.query.decode())
        assert finished.status_code == 303
        assert finished.headers["referrer-policy"] == "no-referrer"
        assert finished.headers["location"] == "/app"  # the code is gone from the address bar
        workspace = client.get("/app")
        csp = workspace.headers["content-security-policy"]
        ancestors = re.search(r"frame-ancestors ([^;]+)", csp)
        assert ancestors is not None
        assert origin_of(sandbox.ehr_url) in ancestors.group(1).split()
        assert "*" not in ancestors.group(1)


def post_routes(app: RunningApp) -> list[str]:
    def walk(routes: list[Any]) -> Iterator[Any]:
        for route in routes:
            included = getattr(route, "original_router", None)  # FastAPI ≥ 0.160 wraps included routers
            yield from walk(included.routes) if included is not None else [route]

    paths = [
        route.path for route in walk(app.app.routes) if "POST" in (getattr(route, "methods", None) or ())
    ]
    assert paths, "the app has POST routes"
    return [re.sub(r"\{[^}]+\}", "x", path) for path in paths]


@pytest.mark.parametrize(
    "headers",
    [
        {"Origin": "https://evil.example"},
        {"Origin": "null"},
        {"Sec-Fetch-Site": "cross-site"},
        {"Sec-Fetch-Site": "same-site"},
    ],
)
def test_every_post_from_another_site_is_refused(
    sandbox: SandboxEHR, carecanvas: RunningApp, headers: dict[str, str]
) -> None:
    with launch_session(carecanvas.url, sandbox) as client:
        csrf = csrf_from(client.get("/app").text)
        for path in post_routes(carecanvas):
            response = client.post(path, data={"csrf_token": csrf}, headers=headers)
            assert response.status_code == 403, path
            assert "came from another site" in response.text


def test_every_post_needs_the_sessions_csrf_token(sandbox: SandboxEHR, carecanvas: RunningApp) -> None:
    with launch_session(carecanvas.url, sandbox) as client:
        client.get("/app")
        form = {
            "csrf_token": "forged",
            "condition_id": "cond-1-diabetes",
            "style": "flat_vector",
            "language": "en",
            "caption": "c",
            "alt_text": "a",
        }
        same_origin = {"Origin": carecanvas.url, "Sec-Fetch-Site": "same-origin"}
        for path in post_routes(carecanvas):
            response = client.post(path, data=form, headers=same_origin)
            # The console's routes need a staff sign-in first: a clinician's session is not one (401).
            expected = 401 if path.startswith("/compliance") else 403
            assert response.status_code == expected, path


async def test_https_cookie_attributes_and_http_downgrade(sandbox: SandboxEHR, tmp_path: Path) -> None:
    listener = CountingListener()
    try:
        settings = Settings(
            data_dir=tmp_path,
            public_url="https://carecanvas.example",
            embedded_worker=False,
            ehrs=[
                EhrSettings(
                    name="sandbox",
                    iss=sandbox.fhir_base,
                    client_id="carecanvas-demo",
                    frame_origins=("https://ehr.example",),
                    auth_origins=(origin_of(sandbox.auth_base),),
                ),
                EhrSettings(name="tls-ehr", iss=f"https://127.0.0.1:{listener.port}/fhir", client_id="c"),
            ],
        )
        app = create_app(settings)
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="https://carecanvas.example"
            ) as client,
        ):
            launch_id = sandbox.create_launch("pat-1", "prac-1", None)
            started = await client.get("/launch", params={"iss": sandbox.fhir_base, "launch": launch_id})
            assert started.status_code == 302
            cookie = started.headers["set-cookie"]
            assert cookie.startswith(f"{SECURE_COOKIE_NAME}=")
            attributes = {part.strip().split("=")[0].lower() for part in cookie.split(";")[1:]}
            assert {"secure", "httponly", "samesite", "partitioned", "path"} <= attributes
            assert "samesite=none" in cookie.lower()
            assert "domain" not in attributes  # __Host- cookies must not name a domain
            ancestors = started.headers["content-security-policy"].split("frame-ancestors ")[1].split()
            assert "https://ehr.example" in ancestors
            downgraded = await client.get(
                "/launch", params={"iss": f"http://127.0.0.1:{listener.port}/fhir", "launch": "x"}
            )
            assert downgraded.status_code == 400
            cross_site = await client.post("/illustrations", headers={"Origin": "https://evil.example"})
            assert cross_site.status_code == 403
        await asyncio.sleep(0.3)
    finally:
        listener.close()
    assert listener.connections == 0


# ---- EHR styling -------------------------------------------------------------------------------------------


def test_smart_style_is_fetched_at_launch_and_served_as_css(
    sandbox: SandboxEHR, carecanvas: RunningApp
) -> None:
    with launch_session(carecanvas.url, sandbox) as client:
        workspace = client.get("/app")
        assert '<link rel="stylesheet" href="/style.css">' in workspace.text
        css = client.get("/style.css")
        assert css.status_code == 200
        assert css.headers["content-type"].startswith("text/css")
        assert "--smart-color-background: #f5f7fa;" in css.text
        assert "body { background: var(--smart-color-background); }" in css.text
    anonymous = httpx.get(f"{carecanvas.url}/style.css", timeout=30)
    assert anonymous.status_code == 200
    assert "--smart" not in anonymous.text


# ---- logs ------------------------------------------------------------------------------------------


def test_no_secret_or_patient_id_in_any_log_line_of_a_full_run(
    sandbox: SandboxEHR, carecanvas: RunningApp
) -> None:
    captured = io.StringIO()
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    configure_logging("DEBUG", stream=captured)
    # The sandbox EHR runs in this process too; its authlib logs issued tokens at DEBUG. That is the
    # EHR's log, not CareCanvas's (the service does not use authlib), so it is kept out of the scan.
    sandbox_logger = logging.getLogger("authlib")
    saved_sandbox_level = sandbox_logger.level
    sandbox_logger.setLevel(logging.WARNING)
    secrets: dict[str, str] = {}
    try:
        with httpx.Client(base_url=carecanvas.url, timeout=30) as client:
            authorize_url = start(client, sandbox)
            launch = carecanvas.services.sessions.open_pending(client.cookies[COOKIE])  # sealed in the cookie
            assert launch is not None
            pending = launch.pending
            secrets.update(verifier=pending["code_verifier"], nonce=pending["nonce"], state=pending["state"])
            callback = authorize(authorize_url)
            secrets["code"] = callback.params["code"]
            assert client.get(callback.path + "?" + callback.query.decode()).status_code == 303
            tokens = session_data(carecanvas, client)["token_set"]
            secrets.update(access_token=tokens["access_token"], refresh_token=tokens["refresh_token"])
            secrets["session_cookie"] = client.cookies[COOKIE]
            workspace = client.get("/app")
            csrf = csrf_from(workspace.text)
            # (The CSRF token is not scanned: at DEBUG, aiosqlite logs SQL parameters, the token among them.)
            created = client.post(
                "/illustrations",
                data={
                    "condition_id": CONDITION.findall(workspace.text)[0],
                    "style": "flat_vector",
                    "language": "en",
                    "csrf_token": csrf,
                },
            )
            job_id = created.headers["location"].rsplit("/", 1)[1]
            assert wait_for_job(client, job_id)["status"] == "succeeded"
            approved = client.post(
                f"/review/{job_id}/approve",
                data={"caption": "A picture about your health.", "alt_text": "Drawing.", "csrf_token": csrf},
            )
            assert approved.status_code == 200, approved.text
            client.get("/callback", params={"code": secrets["code"], "state": secrets["state"]})  # a refusal
    finally:
        structlog.reset_defaults()
        sandbox_logger.setLevel(saved_sandbox_level)
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
    lines = captured.getvalue().splitlines()
    assert len(lines) >= 3, "the run produced log lines to scan"
    for name, value in secrets.items():
        leaks = [line for line in lines if value in line]
        assert not leaks, f"{name} appears in a log line: {leaks[0][:300]}"
    patient_pattern = re.compile(r"\bpat-1\b")
    assert not [line for line in lines if patient_pattern.search(line)], (
        "the patient id appears in a log line"
    )


# ---- confidential asymmetric client (private_key_jwt) with our JWKS, end to end ------------------------


def write_key(path: Path, *, kind: str) -> Path:
    key = (
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
        if kind == "rsa"
        else ec.generate_private_key(ec.SECP384R1())
    )
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return path


@pytest.fixture(scope="module")
def asymmetric_app(sandbox: SandboxEHR, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningApp]:
    data_dir = tmp_path_factory.mktemp("carecanvas-asymmetric")
    old_key = write_key(data_dir / "old.pem", kind="rsa")
    new_key = write_key(data_dir / "new.pem", kind="ec")
    port = free_port()
    settings = Settings(
        data_dir=data_dir,
        public_url=f"http://127.0.0.1:{port}",
        embedded_worker=False,
        ehrs=[
            EhrSettings(
                name="sandbox-asymmetric",
                iss=sandbox.fhir_base,
                client_id="carecanvas-asymmetric",
                client_auth="private_key_jwt",
                private_key_files=(old_key, new_key),
                frame_origins=(origin_of(sandbox.ehr_url),),
                auth_origins=(origin_of(sandbox.auth_base),),
            )
        ],
    )
    with running_app(settings, port=port) as app:
        yield app


def register_asymmetric_client(sandbox: SandboxEHR, app: RunningApp, jwks: dict[str, Any]) -> None:
    sandbox.register_client(
        ClientRegistration(
            "carecanvas-asymmetric",
            client_type="confidential-asymmetric",
            redirect_uris=[f"{app.url}/callback"],
            jwks=jwks,
        )
    )


def test_jwks_endpoint_publishes_both_rotation_keys_without_private_parts(asymmetric_app: RunningApp) -> None:
    response = httpx.get(f"{asymmetric_app.url}/.well-known/jwks.json", timeout=30)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/jwk-set+json")
    keys = response.json()["keys"]
    assert [(key["kty"], key["alg"]) for key in keys] == [("RSA", "RS384"), ("EC", "ES384")]
    assert all(key["use"] == "sig" and key["kid"] for key in keys)
    assert not any(private in key for key in keys for private in ("d", "p", "q", "dp", "dq", "qi"))


def test_confidential_asymmetric_launch_end_to_end(sandbox: SandboxEHR, asymmetric_app: RunningApp) -> None:
    jwks = httpx.get(f"{asymmetric_app.url}/.well-known/jwks.json", timeout=30).json()
    register_asymmetric_client(sandbox, asymmetric_app, jwks)
    with launch_session(asymmetric_app.url, sandbox) as client:
        workspace = client.get("/app")
        assert workspace.status_code == 200
        assert 'data-testid="patient-name"' in workspace.text


def test_only_the_newest_key_signs(sandbox: SandboxEHR, asymmetric_app: RunningApp) -> None:
    jwks = httpx.get(f"{asymmetric_app.url}/.well-known/jwks.json", timeout=30).json()
    register_asymmetric_client(
        sandbox, asymmetric_app, {"keys": jwks["keys"][:1]}
    )  # the EHR knows only the old key
    try:
        with httpx.Client(base_url=asymmetric_app.url, timeout=30) as client:
            callback = authorize(start(client, sandbox))
            refused = client.get(callback.path + "?" + callback.query.decode())
            assert refused.status_code == 400
            assert client.get("/app").status_code == 401
    finally:
        register_asymmetric_client(sandbox, asymmetric_app, jwks)
