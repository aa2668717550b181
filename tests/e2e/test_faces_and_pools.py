"""The two faces' shared plumbing: one pool per EHR, sign-out, the live reading grade, CSRF edge cases."""

from __future__ import annotations

import concurrent.futures
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from harness import RunningApp, csrf_from, free_port, launch_session, running_app, wait_for_job

from sandbox.run import SandboxEHR
from service.cli import demo_settings
from service.ehrs import origin_of
from service.settings import EhrSettings

COOKIE = "carecanvas_session"


class SilentEhr:
    """A loopback server that accepts connections and never answers: an EHR that has stopped responding."""

    def __init__(self) -> None:
        self._socket = socket.socket()
        self._socket.bind(("127.0.0.1", 0))
        self._socket.listen(100)
        self.port = self._socket.getsockname()[1]
        self.connections = 0
        self._held: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        self._socket.settimeout(0.2)
        while not self._stop.is_set():
            try:
                connection, _ = self._socket.accept()
            except TimeoutError:
                continue
            self.connections += 1
            self._held.append(connection)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        for connection in self._held:
            connection.close()
        self._socket.close()


@pytest.fixture
def silent_ehr() -> Iterator[SilentEhr]:
    server = SilentEhr()
    yield server
    server.close()


def test_a_silent_ehr_fills_only_its_own_pool(
    sandbox: SandboxEHR, silent_ehr: SilentEhr, tmp_path: Path
) -> None:
    """Launches at a healthy EHR go through while a dead one holds every connection it is allowed."""
    port = free_port()
    settings = demo_settings(
        data_dir=tmp_path,
        fhir_base=sandbox.fhir_base,
        auth_base=sandbox.auth_base,
        ehr_origin=origin_of(sandbox.ehr_url),
        port=port,
    )
    silent_iss = f"http://127.0.0.1:{silent_ehr.port}/fhir"
    silent = EhrSettings(
        name="silent", iss=silent_iss, client_id="x", max_connections=2, pool_wait_seconds=1.0
    )
    settings = settings.model_copy(update={"ehrs": [*settings.ehrs, silent], "embedded_worker": False})
    with (
        running_app(settings, port=port) as app,
        concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool,
    ):
        stuck = [
            pool.submit(httpx.get, f"{app.url}/launch", params={"iss": silent_iss, "launch": "x"}, timeout=60)
            for _ in range(12)
        ]
        time.sleep(0.5)  # the silent EHR's pool is full now
        started = time.monotonic()
        healthy = [pool.submit(_launch_status, app, sandbox) for _ in range(4)]
        assert [future.result(timeout=60) for future in healthy] == [302] * 4
        healthy_seconds = time.monotonic() - started
        answers = [future.result(timeout=60) for future in stuck]
    # The dead EHR never got more connections than its own limit, and every launch there got a page.
    assert silent_ehr.connections <= 2
    assert {answer.status_code for answer in answers} == {502}
    assert all("sign-in settings could not be used" in answer.text for answer in answers)
    assert healthy_seconds < 10, healthy_seconds  # not behind the silent EHR's 10 s read timeout


def _launch_status(app: RunningApp, sandbox: SandboxEHR) -> int:
    launch_id = sandbox.create_launch("pat-1", "prac-1", "enc-1")
    response = httpx.get(
        f"{app.url}/launch", params={"iss": sandbox.fhir_base, "launch": launch_id}, timeout=60
    )
    return response.status_code


def test_sign_out_ends_the_server_side_session(sandbox: SandboxEHR, carecanvas: RunningApp) -> None:
    with launch_session(carecanvas.url, sandbox) as client:
        csrf = csrf_from(client.get("/app").text)
        cookie = client.cookies.get(COOKIE)
        assert client.post("/logout", data={"csrf_token": "wrong"}).status_code == 403
        signed_out = client.post("/logout", data={"csrf_token": csrf})
        assert signed_out.status_code == 200
        assert 'data-testid="signed-out"' in signed_out.text
        assert (
            "Max-Age=0" in signed_out.headers["set-cookie"] or "expires=" in signed_out.headers["set-cookie"]
        )
        # The old cookie value is worth nothing now: the row is gone, not just the browser's copy.
        replay = httpx.get(f"{carecanvas.url}/app", cookies={COOKIE: cookie or ""})
        assert replay.status_code == 401

        async def rows() -> int:
            async with carecanvas.services.sessionmaker() as db:
                found = await carecanvas.services.sessions.load(db, cookie)
                await db.commit()
            return 0 if found is None else 1

        assert carecanvas.call(rows()) == 0


def test_a_non_ascii_csrf_token_is_refused_not_a_server_error(
    sandbox: SandboxEHR, carecanvas: RunningApp
) -> None:
    with launch_session(carecanvas.url, sandbox) as client:
        client.get("/app")
        for token in ("é", "\u202e", "токен"):
            response = client.post(
                "/illustrations",
                data={
                    "csrf_token": token,
                    "condition_id": "cond-1-diabetes",
                    "style": "flat_vector",
                    "language": "en",
                },
            )
            assert response.status_code == 403, token
        header = client.post("/logout", headers={"X-CSRF-Token": "ü".encode()})
        assert header.status_code == 403


def test_the_reading_grade_follows_the_caption(sandbox: SandboxEHR, carecanvas: RunningApp) -> None:
    with launch_session(carecanvas.url, sandbox) as client:
        workspace = client.get("/app").text
        csrf = csrf_from(workspace)
        created = client.post(
            "/illustrations",
            data={
                "csrf_token": csrf,
                "condition_id": "cond-1-diabetes",
                "style": "flat_vector",
                "language": "en",
            },
        )
        assert created.status_code == 303, created.text[-400:]
        job_id = created.headers["location"].rsplit("/", 1)[-1]
        headers = {"X-CSRF-Token": csrf}
        easy = client.post(
            f"/review/{job_id}/grade",
            data={"caption": "Your body needs sugar.", "language": "en"},
            headers=headers,
        )
        hard = client.post(
            f"/review/{job_id}/grade",
            data={
                "caption": "Hyperglycaemia necessitates comprehensive pharmacological intervention and "
                "multidisciplinary endocrinological surveillance.",
                "language": "en",
            },
            headers=headers,
        )
        assert easy.status_code == hard.status_code == 200
        assert "please simplify" not in easy.text
        assert "please simplify" in hard.text
        assert (
            client.post(f"/review/{job_id}/grade", data={"caption": "x", "language": "en"}).status_code == 403
        )
        other = client.post(
            "/review/00000000-0000-0000-0000-000000000000/grade",
            data={"caption": "x", "language": "en"},
            headers=headers,
        )
        assert other.status_code == 404


def test_the_capability_statement_is_read_once_per_ehr_not_per_approval(
    sandbox: SandboxEHR, carecanvas: RunningApp
) -> None:
    """Two approvals (and the retract that reads the profile too) cost at most one GET /metadata."""

    def metadata_reads() -> int:
        return sum(
            1 for r in sandbox.fhir.requests() if r["method"] == "GET" and r["path"].endswith("/metadata")
        )

    carecanvas.services.profiles.forget()  # start from a cold cache for this count
    before = metadata_reads()
    with launch_session(carecanvas.url, sandbox) as client:
        for condition in ("cond-1-diabetes", "cond-1-hypertension"):
            csrf = csrf_from(client.get("/app").text)
            created = client.post(
                "/illustrations",
                data={
                    "csrf_token": csrf,
                    "condition_id": condition,
                    "style": "flat_vector",
                    "language": "en",
                },
            )
            job_id = created.headers["location"].rsplit("/", 1)[-1]
            assert wait_for_job(client, job_id)["status"] == "succeeded"
            approved = client.post(
                f"/review/{job_id}/approve",
                data={"csrf_token": csrf, "caption": "A picture.", "alt_text": "A."},
            )
            assert approved.status_code == 200, approved.text[-300:]
    assert metadata_reads() - before == 1
