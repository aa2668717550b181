"""`carecanvas demo` as a newcomer runs it: prints its URLs once they answer, serves, stops on Ctrl-C."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.slow


def test_demo_starts_everything_on_loopback_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    env = {**os.environ, "CARECANVAS_DATA_DIR": str(tmp_path / "data"), "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "demo", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,
    )
    output: list[str] = []
    try:
        assert process.stdout is not None
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            line = process.stdout.readline()
            if not line:
                break
            output.append(line)
            if "Ctrl-C stops everything" in line:
                break
        text = "".join(output)
        ehr_url = re.search(r"Sandbox EHR:\s+(http://127\.0\.0\.1:\d+/ehr)", text)
        app_url = re.search(r"CareCanvas:\s+(http://127\.0\.0\.1:\d+)", text)
        assert ehr_url, text
        assert app_url, text
        # Printed only once CareCanvas answers: the very first request, with no retry, succeeds.
        assert httpx.get(f"{app_url.group(1)}/readyz", timeout=5).json() == {"status": "ready"}
        assert text.index("Starting CareCanvas") < text.index("Sandbox EHR:")
        # The printed address is a page, not {"detail":"Not Found"}: / leads to the landing page.
        home = httpx.get(app_url.group(1), timeout=30, follow_redirects=True)
        assert home.status_code == 200
        assert str(home.url).endswith("/welcome")
        assert 'data-testid="demo-ehr"' in home.text
        assert ehr_url.group(1) in home.text
        icon = httpx.get(f"{app_url.group(1)}/favicon.ico", timeout=30)
        assert (icon.status_code, icon.headers["content-type"]) == (200, "image/x-icon")
        page = httpx.get(ehr_url.group(1), timeout=30)
        assert page.status_code == 200
        assert "Launch CareCanvas" in page.text
        assert httpx.get(f"{app_url.group(1)}/readyz", timeout=30).json() == {"status": "ready"}
        # All state lives in the data directory, encrypted key file included.
        assert (tmp_path / "data" / "carecanvas.db").exists()
        assert (tmp_path / "data" / "keys.json").stat().st_mode & 0o077 == 0
    finally:
        os.killpg(process.pid, signal.SIGINT)
        try:
            remaining, _ = process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            raise
    assert process.returncode == 0, remaining
    # Ctrl-C stopped the Node FHIR server too: nothing is left listening.
    with pytest.raises(httpx.ConnectError):
        httpx.get(ehr_url.group(1).replace("/ehr", "/"), timeout=5)
