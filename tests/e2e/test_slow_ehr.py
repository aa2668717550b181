"""A slow EHR (5 s per response): the event loop stays responsive, another EHR's launches are unaffected."""

from __future__ import annotations

import concurrent.futures
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from harness import RunningApp, free_port, running_app

from sandbox.run import SandboxEHR
from service.cli import demo_settings
from service.ehrs import origin_of
from service.settings import EhrSettings

pytestmark = pytest.mark.slow

DELAY_SECONDS = 5.0


class SlowEhr:
    """Answers every request, but only after DELAY_SECONDS (and with nothing a SMART client can use)."""

    def __init__(self) -> None:
        self.requests = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.requests += 1
                time.sleep(DELAY_SECONDS)
                body = b"{}"
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def slow_ehr() -> Iterator[SlowEhr]:
    server = SlowEhr()
    yield server
    server.close()


def _healthy_launch(app: RunningApp, sandbox: SandboxEHR) -> tuple[int, float]:
    """A launch at the healthy EHR: its status and how long it took."""
    launch_id = sandbox.create_launch("pat-1", "prac-1", "enc-1")
    started = time.monotonic()
    response = httpx.get(
        f"{app.url}/launch", params={"iss": sandbox.fhir_base, "launch": launch_id}, timeout=60
    )
    return response.status_code, time.monotonic() - started


def test_a_slow_ehr_leaves_the_loop_and_other_ehrs_responsive(
    sandbox: SandboxEHR, slow_ehr: SlowEhr, tmp_path: Path
) -> None:
    port = free_port()
    settings = demo_settings(
        data_dir=tmp_path,
        fhir_base=sandbox.fhir_base,
        auth_base=sandbox.auth_base,
        ehr_origin=origin_of(sandbox.ehr_url),
        port=port,
    )
    slow_iss = f"http://127.0.0.1:{slow_ehr.port}/fhir"
    # Enough connections that every slow launch waits on the EHR itself, not on its pool.
    slow = EhrSettings(name="slow", iss=slow_iss, client_id="x", max_connections=8, pool_wait_seconds=10.0)
    settings = settings.model_copy(update={"ehrs": [*settings.ehrs, slow], "embedded_worker": False})
    with (
        running_app(settings, port=port) as app,
        concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool,
    ):
        # The baseline, in the same run: healthy launches with nothing else going on.
        idle = [
            future.result(timeout=60)
            for future in [pool.submit(_healthy_launch, app, sandbox) for _ in range(3)]
        ]
        started = time.monotonic()
        stuck = [
            pool.submit(
                lambda: (
                    httpx.get(f"{app.url}/launch", params={"iss": slow_iss, "launch": "x"}, timeout=60),
                    time.monotonic(),
                )
            )
            for _ in range(6)
        ]
        while slow_ehr.requests < 6 and time.monotonic() - started < DELAY_SECONDS / 2:
            time.sleep(0.05)
        # While six launches wait on the slow EHR: the loop answers at once ...
        pauses = []
        for _ in range(10):
            before = time.monotonic()
            assert httpx.get(f"{app.url}/healthz", timeout=10).status_code == 200
            pauses.append(time.monotonic() - before)
        # ... and launches at the healthy EHR go through.
        healthy = [pool.submit(_healthy_launch, app, sandbox) for _ in range(3)]
        healthy_results = [future.result(timeout=60) for future in healthy]
        slow_results = [future.result(timeout=60) for future in stuck]
    assert [status for status, _ in idle + healthy_results] == [302] * 6
    # The slow launches really waited on the slow EHR ...
    assert min(finished for _, finished in slow_results) - started >= DELAY_SECONDS
    # ... but no healthy launch waited for even one slow answer: compared with the idle baseline of this
    # run (the machine's load moves both alike), it took less than one slow response longer.
    slowest_idle = max(seconds for _, seconds in idle)
    assert max(seconds for _, seconds in healthy_results) - slowest_idle < DELAY_SECONDS
    # The loop never waited on the slow EHR (that would be a whole 5 s pause); the typical probe is quick
    # (bounds loose enough for a loaded 2-core machine, tight enough to catch a blocked loop).
    assert max(pauses) < DELAY_SECONDS, pauses
    assert sorted(pauses)[len(pauses) // 2] < 1.0, pauses
    # The slow EHR's own launches got a readable page, not a 500.
    assert {response.status_code for response, _ in slow_results} == {502}
    assert all("sign-in settings could not be used" in response.text for response, _ in slow_results)
