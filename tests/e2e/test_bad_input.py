"""Bad input gets a clear page, nothing half-written, and no request to an unknown host."""

from __future__ import annotations

import socket
import threading
import time

import httpx
import pytest
from harness import RunningApp, csrf_from, launch_session

from sandbox.run import SandboxEHR


class CountingListener:
    """A loopback TCP listener that counts connections, to prove nothing was contacted."""

    def __init__(self) -> None:
        self.connections = 0
        self._socket = socket.socket()
        self._socket.bind(("127.0.0.1", 0))
        self._socket.listen()
        self._socket.settimeout(0.2)
        self.port = self._socket.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                connection, _ = self._socket.accept()
            except TimeoutError:
                continue
            self.connections += 1
            connection.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._socket.close()


@pytest.mark.parametrize(
    "iss_template",
    [
        "http://127.0.0.1:{port}/fhir",
        "https://127.0.0.1:{port}/fhir",
        "http://localhost:{port}/fhir",
    ],
)
def test_unregistered_iss_is_refused_without_contacting_it(carecanvas: RunningApp, iss_template: str) -> None:
    listener = CountingListener()
    try:
        iss = iss_template.format(port=listener.port)
        response = httpx.get(f"{carecanvas.url}/launch", params={"iss": iss, "launch": "x"}, timeout=30)
        time.sleep(0.3)
    finally:
        listener.close()
    assert response.status_code == 400
    assert "not registered" in response.text
    assert listener.connections == 0


@pytest.mark.parametrize("iss", ["https://evil.example/fhir", "http://169.254.169.254/latest/meta-data", ""])
def test_foreign_or_missing_iss_is_refused(carecanvas: RunningApp, iss: str) -> None:
    response = httpx.get(f"{carecanvas.url}/launch", params={"iss": iss, "launch": "x"}, timeout=30)
    assert response.status_code == 400
    assert "not registered" in response.text


def test_prefix_look_alike_of_the_registered_iss_is_refused(
    sandbox: SandboxEHR, carecanvas: RunningApp
) -> None:
    before = len(sandbox.fhir.requests())
    for iss in (sandbox.fhir_base + ".evil.test", sandbox.fhir_base + "/", sandbox.fhir_base.upper()):
        response = httpx.get(f"{carecanvas.url}/launch", params={"iss": iss, "launch": "x"}, timeout=30)
        assert response.status_code == 400
    assert len(sandbox.fhir.requests()) == before


def test_callback_with_wrong_or_missing_state_is_refused(sandbox: SandboxEHR, carecanvas: RunningApp) -> None:
    with httpx.Client(base_url=carecanvas.url, follow_redirects=False, timeout=30) as client:
        started = client.get(
            "/launch", params={"iss": sandbox.fhir_base, "launch": sandbox.create_launch("pat-1", "prac-1")}
        )
        authorized = httpx.get(started.headers["location"], follow_redirects=False, timeout=30)
        callback = httpx.URL(authorized.headers["location"])
        code = callback.params["code"]
        missing = client.get("/callback", params={"code": code})
        assert missing.status_code == 400
        assert "launch CareCanvas again" in missing.text
        # The pending state is spent by the failed attempt: even the right state no longer works.
        replay = client.get("/callback", params={"code": code, "state": callback.params["state"]})
        assert replay.status_code == 400
        assert client.get("/app").status_code == 401


def test_callback_without_a_session_is_refused(carecanvas: RunningApp) -> None:
    response = httpx.get(f"{carecanvas.url}/callback", params={"code": "c", "state": "s"}, timeout=30)
    assert response.status_code == 400


def test_authorization_error_is_shown_readably(sandbox: SandboxEHR, carecanvas: RunningApp) -> None:
    with httpx.Client(base_url=carecanvas.url, follow_redirects=False, timeout=30) as client:
        client.get(
            "/launch", params={"iss": sandbox.fhir_base, "launch": sandbox.create_launch("pat-1", "prac-1")}
        )
        response = client.get(
            "/callback", params={"error": "access_denied", "error_description": "User said no"}
        )
        assert response.status_code == 400
        assert "User said no" in response.text


def test_unknown_condition_gets_a_clear_page_and_no_job(sandbox: SandboxEHR, carecanvas: RunningApp) -> None:
    with launch_session(carecanvas.url, sandbox) as client:
        csrf = csrf_from(client.get("/app").text)
        response = client.post(
            "/illustrations",
            data={
                "condition_id": "does-not-exist",
                "style": "flat_vector",
                "language": "en",
                "csrf_token": csrf,
            },
        )
        assert response.status_code == 404
        assert "Condition not found" in response.text


def test_generate_without_csrf_token_is_refused(sandbox: SandboxEHR, carecanvas: RunningApp) -> None:
    with launch_session(carecanvas.url, sandbox) as client:
        response = client.post(
            "/illustrations",
            data={"condition_id": "cond-1", "style": "flat_vector", "language": "en", "csrf_token": "forged"},
        )
        assert response.status_code == 403


def test_fhir_server_errors_become_readable_pages(sandbox: SandboxEHR, carecanvas: RunningApp) -> None:
    with launch_session(carecanvas.url, sandbox) as client:
        outcome = {
            "resourceType": "OperationOutcome",
            "issue": [{"severity": "error", "code": "processing", "diagnostics": "Search is disabled today"}],
        }
        answers = {
            503: (503, "not answering right now"),
            400: (502, "Search is disabled today"),
        }
        for status, (page_status, text) in answers.items():
            carecanvas.services.fhir_transport = httpx.MockTransport(
                lambda request, status=status: httpx.Response(
                    status, json=outcome, headers={"Retry-After": "0"}
                )
            )
            try:
                response = client.get("/app")
            finally:
                carecanvas.services.fhir_transport = None
            assert response.status_code == page_status
            assert text in response.text
