"""Starts and stops the sandbox FHIR server (Node) as a child process and talks to its loopback admin API."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

SERVER_DIR = Path(__file__).resolve().parent / "fhir_server"
DEFAULT_DATA_FILE = Path(__file__).resolve().parent / "data" / "synthetic.json"
PROFILES = (
    "generic",
    "no-transactions",
    "pdf-only",
    "small-inline",
    "commit-then-503",
    "body-limit",
    "body-limit-500",
    "broken-next-link",
)

_npm_install_lock = threading.Lock()


class FhirServerError(RuntimeError):
    """The sandbox FHIR server could not be started or did not answer as expected."""


def _ensure_node_modules(npm: str | None) -> None:
    """Installs the pinned packages once (from package-lock.json) when node_modules is missing."""
    with _npm_install_lock:
        if (SERVER_DIR / "node_modules" / "@medplum" / "fhir-router").is_dir():
            return
        if npm is None:
            raise FhirServerError("npm is not on PATH and sandbox/fhir_server/node_modules is missing")
        command = "ci" if (SERVER_DIR / "package-lock.json").exists() else "install"
        result = subprocess.run(
            [npm, command, "--no-audit", "--no-fund"],
            cwd=SERVER_DIR,
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise FhirServerError(f"npm {command} failed in {SERVER_DIR}: {result.stderr[-2000:]}")


class FhirServerProcess:
    """Context manager: the Node FHIR server on a loopback port, stopped (terminate, then kill) on exit."""

    def __init__(
        self,
        *,
        jwks_url: str,
        issuer: str,
        smart_config_file: Path | None = None,
        data_file: Path | None = None,
        profile: str = "generic",
        port: int = 0,
        startup_timeout: float = 30.0,
        state_file: Path | None = None,
        max_body_bytes: int | None = None,
    ) -> None:
        if profile not in PROFILES:
            raise ValueError(f"profile {profile!r} is unknown; allowed: {', '.join(PROFILES)}")
        self.jwks_url = jwks_url
        self.issuer = issuer
        self.smart_config_file = smart_config_file
        self.data_file = data_file if data_file is not None else DEFAULT_DATA_FILE
        self.profile = profile
        self.requested_port = port
        self.startup_timeout = startup_timeout
        self.max_body_bytes = max_body_bytes  # the body-limit profiles' proxy limit (None: 1 MiB)
        # Current resources kept here across restarts (the demo's data dir); None: every start is the seed.
        self.state_file = state_file
        self.port: int = 0
        self._process: subprocess.Popen[str] | None = None
        self._stderr_lines: list[str] = []

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/fhir"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/_admin"

    @property
    def process(self) -> subprocess.Popen[str] | None:
        return self._process

    def start(self) -> FhirServerProcess:
        node = shutil.which("node")
        if node is None:
            raise FhirServerError("node is not on PATH; the sandbox FHIR server needs Node.js 20 or newer")
        _ensure_node_modules(shutil.which("npm"))
        command = [
            node,
            # Medplum 5 declares Node 22; on Node 20 its WebSocket use needs this flag (harmless on 22).
            "--experimental-websocket",
            str(SERVER_DIR / "server.mjs"),
            "--port",
            str(self.requested_port),
            "--jwks-url",
            self.jwks_url,
            "--issuer",
            self.issuer,
            "--data",
            str(self.data_file),
            "--profile",
            self.profile,
        ]
        if self.smart_config_file is not None:
            command += ["--smart-config-file", str(self.smart_config_file)]
        if self.max_body_bytes is not None:
            command += ["--max-body-bytes", str(self.max_body_bytes)]
        if self.state_file is not None:
            command += ["--state-file", str(self.state_file)]
        # stdin stays open for the server's lifetime: if this process dies, the pipe closes and node exits.
        self._process = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=SERVER_DIR,
        )
        threading.Thread(target=self._collect_stderr, daemon=True).start()
        ready = self._read_ready_line()
        self.port = int(ready["port"])
        return self

    def _running(self) -> subprocess.Popen[str]:
        if self._process is None:
            raise FhirServerError("the sandbox FHIR server has not been started")
        return self._process

    def _collect_stderr(self) -> None:
        stderr = self._running().stderr
        if stderr is None:
            return
        # Kept only for start-up failure messages; the server never writes request bodies to stderr.
        for line in stderr:
            self._stderr_lines.append(line.rstrip())

    def _read_ready_line(self) -> dict[str, Any]:
        stdout = self._running().stdout
        if stdout is None:
            raise FhirServerError("the sandbox FHIR server's stdout is not piped")
        result: dict[str, Any] = {}

        def read() -> None:
            result["line"] = stdout.readline()

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        reader.join(self.startup_timeout)
        line = result.get("line")
        if not line:
            self.stop()
            reason = "timed out" if reader.is_alive() else "exited"
            detail = "; ".join(self._stderr_lines[-5:])
            raise FhirServerError(f"sandbox FHIR server {reason} before it was ready: {detail}")
        try:
            ready = json.loads(line)
        except json.JSONDecodeError:
            self.stop()
            raise FhirServerError("sandbox FHIR server printed something other than its ready line") from None
        if ready.get("ready") is not True or not isinstance(ready.get("port"), int):
            self.stop()
            raise FhirServerError("sandbox FHIR server's ready line lacks ready/port")
        return ready

    def stop(self, *, timeout: float = 5.0) -> None:
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout)
        for stream in (process.stdin, process.stdout, process.stderr):
            if stream is not None:
                stream.close()

    def __enter__(self) -> FhirServerProcess:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def _admin(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        response = httpx.request(method, f"{self.admin_url}/{path}", json=body, timeout=10.0)
        if response.status_code != 200:
            raise FhirServerError(
                f"admin {method} {path} answered {response.status_code}: {response.text[:500]}"
            )
        return response.json()

    def set_profile(self, name: str, *, max_body_bytes: int | None = None) -> None:
        """Switches the server's behaviour profile (see PROFILES); commit-then-503 re-arms its single 503.

        `max_body_bytes` sets the body-limit profiles' front-proxy limit (it stays until changed again).
        """
        if name not in PROFILES:
            raise ValueError(f"profile {name!r} is unknown; allowed: {', '.join(PROFILES)}")
        body: dict[str, Any] = {"profile": name}
        if max_body_bytes is not None:
            body["max_body_bytes"] = max_body_bytes
        self._admin("PUT", "profile", body)
        self.profile = name

    def get_profile(self) -> str:
        return str(self._admin("GET", "profile")["profile"])

    def requests(self) -> list[dict[str, Any]]:
        """The FHIR requests served since start or the last reset: method, path (no query) and status."""
        return list(self._admin("GET", "requests"))

    def reset(self) -> None:
        """Reloads the data file, forgetting every write, paging token and logged request."""
        self._admin("POST", "reset")
