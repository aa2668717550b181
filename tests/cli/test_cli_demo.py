"""`scripts/demo` from a fresh clone, as a newcomer runs it: URLs printed once they answer; Ctrl-C stops it.

The clone is of HEAD (what CI checks out). It reuses the install the tests run in, honestly: the venv only
while its install stamp matches the clone's pyproject.toml and scripts/bootstrap (so the clone's bootstrap is
a no-op and never installs into it), the npm packages only while the lock files match. The code that runs is
the clone's own (checked on every module the demo process imports), not this checkout's.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest

from service.cli import DEMO_FHIR_STATE_FILE

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("service", "sandbox", "fhir_adapters")
NODE_PACKAGES = ("sandbox/fhir_server", "tests/e2e/node")
READY_WITHIN_S = 480  # a cold start on a loaded 2-core machine; the printed URLs must then answer at once


def fresh_clone(destination: Path) -> Path:
    """HEAD of the repository the tests run in, cloned; the checkout's installs reused where still current."""
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(destination)], check=True, timeout=300)
    venv = Path(sys.prefix)
    check = subprocess.run(
        ["sha256sum", "--status", "--check", str(venv / ".carecanvas-installed")],
        cwd=destination,
        check=False,
    )
    assert check.returncode == 0, (
        f"{venv} was not installed from HEAD's pyproject.toml and scripts/bootstrap: run scripts/bootstrap "
        "(and commit what it installs from), or the clone's bootstrap would install for minutes"
    )
    for package in NODE_PACKAGES:
        lock = "package-lock.json"
        assert (destination / package / lock).read_bytes() == (ROOT / package / lock).read_bytes(), package
        assert (ROOT / package / "node_modules").is_dir(), f"{package}: run scripts/bootstrap"
        (destination / package / "node_modules").symlink_to(ROOT / package / "node_modules")
    return destination


def demo_environment(data_dir: Path) -> dict[str, str]:
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("CARECANVAS_") and name not in {"PYTHONPATH", "PYTHONSAFEPATH", "VIRTUAL_ENV"}
    }
    # PYTHONVERBOSE: the interpreter names the file of every module it imports (checked below).
    env.update(CARECANVAS_DATA_DIR=str(data_dir), CARECANVAS_VENV=sys.prefix, PYTHONVERBOSE="1")
    return env


class Output:
    """Reads the demo's output as it comes (a full pipe would stall the demo), and waits for a line."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        self._process = process
        self._announced = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self._process.stdout is not None
        for line in self._process.stdout:
            self.lines.append(line)
            if "Ctrl-C stops everything" in line:
                self._announced.set()
        self._announced.set()  # the demo ended before announcing: the wait returns, the test says why

    def wait_for_announcement(self, timeout: float) -> bool:
        return self._announced.wait(timeout)

    def join(self) -> None:
        self._thread.join(timeout=60)
        assert self._process.stdout is not None
        self._process.stdout.close()

    def text(self) -> str:
        """What a newcomer sees: without the interpreter's import lines."""
        return "".join(line for line in self.lines if not line.startswith(("# ", "import ")))


def listening(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(5)
        return probe.connect_ex(("127.0.0.1", port)) == 0


def live_processes_in_group(pgid: int) -> list[str]:
    """The processes (not zombies) still in the demo's process group."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # ended while we looked
        state, pgrp = fields[0], int(fields[2])
        if pgrp == pgid and state != "Z":
            found.append(stat.parent.name)
    return found


def test_a_fresh_clones_scripts_demo_answers_its_printed_urls_at_once_and_stops_on_ctrl_c(
    tmp_path: Path,
) -> None:
    assert shutil.which("node"), "the sandbox FHIR server needs Node.js"
    clone = fresh_clone(tmp_path / "clone")
    data_dir = tmp_path / "data"
    stamp = Path(sys.prefix) / ".carecanvas-installed"
    stamp_before = stamp.stat().st_mtime_ns
    process = subprocess.Popen(
        [str(clone / "scripts" / "demo"), "--port", "0"],  # any free port on 127.0.0.1; the sandbox's too
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=demo_environment(data_dir),
        cwd=tmp_path,
        start_new_session=True,
    )
    output = Output(process)
    ports: list[int] = []
    try:
        announced = output.wait_for_announcement(READY_WITHIN_S)
        text = output.text()
        assert announced, f"no URLs within {READY_WITHIN_S} s:\n{text[-4000:]}"
        urls = dict(
            re.findall(
                r"^  (Sandbox EHR|CareCanvas|Compliance|Reviewer|FHIR server):\s+(http://\S+)", text, re.M
            )
        )
        printed = {"Sandbox EHR", "CareCanvas", "Compliance", "Reviewer", "FHIR server"}
        assert set(urls) == printed, text[-4000:]
        assert all(url.startswith("http://127.0.0.1:") for url in urls.values()), urls
        ports = sorted({int(re.findall(r":(\d+)", url)[0]) for url in urls.values()})
        assert text.index("Starting CareCanvas") < text.index("Sandbox EHR:")

        # At once, each printed address once, no retry: a newcomer who clicks gets a page.
        with httpx.Client(timeout=30, follow_redirects=True) as browser:
            ehr = browser.get(urls["Sandbox EHR"])
            home = browser.get(urls["CareCanvas"])
            console = browser.get(urls["Compliance"])
            reviewer = browser.get(urls["Reviewer"])
            fhir = browser.get(f"{urls['FHIR server']}/metadata")
            ready = browser.get(f"{urls['CareCanvas']}/readyz")
            icon = browser.get(f"{urls['CareCanvas']}/favicon.ico")
        assert ehr.status_code == 200
        assert "Launch CareCanvas" in ehr.text
        assert home.status_code == 200
        assert (
            str(home.url) == f"{urls['CareCanvas']}/welcome"
        )  # the landing page, not {"detail":"Not Found"}
        assert 'data-testid="demo-ehr"' in home.text
        assert f'href="{urls["Sandbox EHR"]}"' in home.text
        assert console.status_code == 200
        assert (
            "Staff sign-in" in console.text
        )  # the console sends the officer to the sandbox's identity provider
        # The demo has portrait reviewers: the queue sends the artist to the sandbox's staff sign-in.
        assert reviewer.status_code == 200
        assert "Rosa Alvarez-Test" in reviewer.text
        assert "sign in as Rosa Alvarez-Test" in text
        assert 'data-testid="reviewer-link"' in home.text
        assert (fhir.status_code, fhir.json()["resourceType"]) == (200, "CapabilityStatement")
        assert ready.json() == {"status": "ready"}
        assert (icon.status_code, icon.headers["content-type"]) == (200, "image/x-icon")

        # The clone's own code answered: every project module the demo imported is the clone's file.
        imported = "".join(line for line in output.lines if line.startswith("# "))
        for package in PACKAGES:
            assert f"{clone}/{package}/" in imported, f"{package} was not imported from the clone"
            assert f"{ROOT}/{package}/" not in imported, f"{package} was imported from {ROOT}, not the clone"
        # The clone's bootstrap reused the venv as it was: nothing installed.
        assert stamp.stat().st_mtime_ns == stamp_before
        # All state lives in the data directory, encrypted key file included; nothing in the clone.
        assert (data_dir / "carecanvas.db").exists()
        assert (data_dir / "keys.json").stat().st_mode & 0o077 == 0
        # The sandbox's FHIR data next to CareCanvas's database: a restart keeps both, never half of each.
        assert (data_dir / DEMO_FHIR_STATE_FILE).is_file()
        assert not (clone / ".carecanvas").exists()
    finally:
        with contextlib.suppress(ProcessLookupError):  # (it may have ended by itself: the output says why)
            os.killpg(process.pid, signal.SIGINT)  # Ctrl-C in the terminal: the whole process group
        try:
            process.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            raise
        finally:
            output.join()
    assert process.returncode == 0, output.text()[-4000:]
    # Ctrl-C stopped everything: the Node FHIR server too; nothing is left listening.
    assert [port for port in ports if listening(port)] == []
    assert live_processes_in_group(process.pid) == []
