"""SandboxEHR: runs the SMART authorization server (uvicorn thread) and the FHIR server on loopback."""

from __future__ import annotations

import argparse
import json
import secrets
import shutil
import signal
import socket
import tempfile
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

import uvicorn
from starlette.applications import Starlette

from sandbox.auth.config import (
    DEFAULT_DATA_FILE,
    DEMO_CLIENT_ID,
    AuthServerConfig,
    ClientRegistration,
    Misbehaviour,
    demo_client,
)
from sandbox.auth.oauth import SmartAuthorizationServer
from sandbox.auth_server import create_auth_app, smart_configuration
from sandbox.staff_oidc import (
    STAFF_CALLBACK_PATH,
    STAFF_PATH,
    StaffOidcConfig,
    StaffOpenIDProvider,
    staff_clients,
)

START_TIMEOUT_SECONDS = 20.0


def bind_socket(host: str = "127.0.0.1", port: int = 0) -> socket.socket:
    """Bind (not yet listen) so the real port is known before the app, whose issuer names it, is built."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    return sock


class UvicornThread:
    """Serves an ASGI app with uvicorn on an already-bound socket in a daemon thread."""

    def __init__(self, app: Starlette, sock: socket.socket) -> None:
        self._sock = sock
        # A uvicorn server outside the main thread installs no signal handlers (uvicorn checks the thread).
        self.server = uvicorn.Server(
            uvicorn.Config(app, log_level="warning", lifespan="off", access_log=False)
        )
        self._thread = threading.Thread(target=self._serve, name="sandbox-auth-server", daemon=True)
        self._error: BaseException | None = None

    @property
    def port(self) -> int:
        return int(self._sock.getsockname()[1])

    def _serve(self) -> None:
        try:
            self.server.run(sockets=[self._sock])
        except BaseException as error:  # reported to the starting thread, which raises it
            self._error = error

    def start(self) -> None:
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while not self.server.started:
            if self._error is not None or not self._thread.is_alive():
                raise RuntimeError(f"sandbox auth server did not start: {self._error!r}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"sandbox auth server did not start within {START_TIMEOUT_SECONDS:.0f} s")
            time.sleep(0.01)

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=10)
        self._sock.close()


def callback_for(app_launch_url: str, path: str = "/callback") -> str:
    """The service's redirect URI next to its launch URL (`/launch` → `/callback`, see DESIGN)."""
    parts = urlsplit(app_launch_url)
    return f"{parts.scheme}://{parts.netloc}{path}"


class SandboxEHR:
    """Context manager running the whole sandbox EHR: authorization server, EHR page and FHIR server."""

    def __init__(
        self,
        *,
        app_launch_url: str | None = None,
        clients: list[ClientRegistration] | None = None,
        fhir_profile: str = "generic",
        host: str = "127.0.0.1",
        auth_port: int = 0,
        fhir_port: int = 0,
        data_file: Path | None = None,
        portal_url: str | None = None,
        redirect_uris: list[str] | None = None,
        fhir_state_file: Path | None = None,
        fhir_max_body_bytes: int | None = None,
    ) -> None:
        self._app_launch_url = app_launch_url
        self._fhir_max_body_bytes = fhir_max_body_bytes
        self._clients = list(clients or [])
        self._fhir_profile = fhir_profile
        self._host = host
        self._auth_port = auth_port
        self._fhir_port = fhir_port
        self._data_file = Path(data_file) if data_file else DEFAULT_DATA_FILE
        self._portal_url = portal_url
        self._redirect_uris = list(redirect_uris or [])
        self._fhir_state_file = fhir_state_file
        self._uvicorn: UvicornThread | None = None
        self._server: SmartAuthorizationServer | None = None
        self._staff: StaffOpenIDProvider | None = None
        self._workdir: Path | None = None
        self._fhir: Any = None

    # --- lifecycle -----------------------------------------------------------------------------------
    def __enter__(self) -> SandboxEHR:
        try:
            self._start()
        except BaseException:
            self._stop()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop()

    def _start(self) -> None:
        # Imported here: the FHIR wrapper is a separate part and only this runner needs it.
        from sandbox.fhir_process import FhirServerProcess

        sock = bind_socket(self._host, self._auth_port)
        issuer = f"http://{self._host}:{sock.getsockname()[1]}"
        clients = self._clients
        if not any(client.client_id == DEMO_CLIENT_ID for client in clients):
            redirects = self._redirect_uris or (
                [callback_for(self._app_launch_url)] if self._app_launch_url else []
            )
            clients = [*clients, demo_client(redirects)]
        config = AuthServerConfig(
            issuer=issuer,
            clients=clients,
            data_file=self._data_file,
            app_launch_url=self._app_launch_url,
            portal_url=self._portal_url,
        )
        staff_redirects = (
            [callback_for(self._app_launch_url, STAFF_CALLBACK_PATH)] if self._app_launch_url else []
        )
        staff = StaffOidcConfig(issuer=f"{issuer}{STAFF_PATH}", clients=staff_clients(staff_redirects))
        app = create_auth_app(config, staff=staff)
        self._server = app.state.server
        self._staff = app.state.staff
        self._uvicorn = UvicornThread(app, sock)
        self._uvicorn.start()
        self._workdir = Path(tempfile.mkdtemp(prefix="carecanvas-sandbox-"))
        self._write_smart_config()
        config.misbehave.on_change(lambda _name: self._write_smart_config())
        self._fhir = FhirServerProcess(
            jwks_url=config.jwks_uri,
            issuer=issuer,
            smart_config_file=self.smart_config_file,
            data_file=self._data_file,
            profile=self._fhir_profile,
            port=self._fhir_port,
            state_file=self._fhir_state_file,
            max_body_bytes=self._fhir_max_body_bytes,
        )
        self._fhir.__enter__()
        config.fhir_base = self._fhir.base_url.rstrip("/")

    def _stop(self) -> None:
        if self._fhir is not None:
            self._fhir.__exit__(None, None, None)
            self._fhir = None
        if self._uvicorn is not None:
            self._uvicorn.stop()
            self._uvicorn = None
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    # --- what tests and the demo use ---------------------------------------------------------------
    @property
    def server(self) -> SmartAuthorizationServer:
        if self._server is None:
            raise RuntimeError("SandboxEHR is not running; use it as a context manager")
        return self._server

    @property
    def config(self) -> AuthServerConfig:
        return self.server.config

    @property
    def auth_base(self) -> str:
        """The issuer URL of the authorization server."""
        return self.config.issuer

    @property
    def fhir_base(self) -> str:
        return self.config.fhir_base

    @property
    def staff_oidc(self) -> StaffOpenIDProvider:
        """The staff OpenID Provider (users, clients, `config.misbehave` switches)."""
        if self._staff is None:
            raise RuntimeError("SandboxEHR is not running; use it as a context manager")
        return self._staff

    @property
    def staff_oidc_issuer(self) -> str:
        """The staff identity provider's issuer (discovery: `{issuer}/.well-known/openid-configuration`)."""
        return self.staff_oidc.config.issuer

    @property
    def ehr_url(self) -> str:
        return self.config.ehr_url

    @property
    def fhir(self) -> Any:
        """The running FhirServerProcess (`set_profile`, `requests`, `reset`, `admin_url`)."""
        if self._fhir is None:
            raise RuntimeError("SandboxEHR is not running; use it as a context manager")
        return self._fhir

    @property
    def misbehave(self) -> Misbehaviour:
        return self.config.misbehave

    @property
    def smart_config_file(self) -> Path:
        if self._workdir is None:
            raise RuntimeError("SandboxEHR is not running; use it as a context manager")
        return self._workdir / "smart-configuration.json"

    def _write_smart_config(self) -> None:
        # Written to a new file and renamed, so the FHIR server never reads a half-written document.
        target = self.smart_config_file
        partial = target.with_suffix(".tmp")
        partial.write_text(json.dumps(smart_configuration(self.config), indent=2), encoding="utf-8")
        partial.replace(target)

    def create_launch(self, patient_id: str, practitioner_id: str, encounter_id: str | None = None) -> str:
        """An EHR launch id, as pressing "Launch CareCanvas" on the EHR page would create."""
        return self.server.create_launch(
            patient_id=patient_id, practitioner_id=practitioner_id, encounter_id=encounter_id
        )

    def mint_token(self, **claims: Any) -> str:
        """An RS256 access token for calling the FHIR server directly; `claims` override (None removes)."""
        now = int(time.time())
        practitioners = self.server.directory.practitioners
        defaults: dict[str, Any] = {
            "iss": self.auth_base,
            "aud": self.fhir_base,
            "iat": now,
            "exp": now + self.config.access_token_lifetime,
            "jti": secrets.token_urlsafe(16),
            "scope": "user/*.cruds",
            "client_id": DEMO_CLIENT_ID,
            "sub": f"Practitioner/{practitioners[0].id}" if practitioners else DEMO_CLIENT_ID,
        }
        if practitioners:
            defaults["fhirUser"] = f"{self.fhir_base}/Practitioner/{practitioners[0].id}"
        merged = {key: value for key, value in {**defaults, **claims}.items() if value is not None}
        return self.server.mint_access_token(merged)

    def set_app_launch_url(self, url: str) -> None:
        """Point the EHR page at the service (which may start after the sandbox) and allow its callback."""
        self.config.app_launch_url = url
        registration = self.server.clients.get(DEMO_CLIENT_ID)
        if registration is not None and callback_for(url) not in registration.redirect_uris:
            registration.redirect_uris.append(callback_for(url))
        for staff_client in self.staff_oidc.clients.values():
            if callback_for(url, STAFF_CALLBACK_PATH) not in staff_client.redirect_uris:
                staff_client.redirect_uris.append(callback_for(url, STAFF_CALLBACK_PATH))

    def set_portal_url(self, url: str | None) -> None:
        self.config.portal_url = url

    def register_client(self, registration: ClientRegistration) -> None:
        """Add or replace a client registration while the sandbox runs."""
        self.server.register_client(registration)


def main(argv: list[str] | None = None) -> None:
    """`python -m sandbox.run`: start the sandbox and print its URLs until Ctrl-C."""
    parser = argparse.ArgumentParser(description="Run the CareCanvas sandbox EHR (FHIR + SMART auth server).")
    parser.add_argument("--app-launch-url", help="CareCanvas launch URL, e.g. http://127.0.0.1:8000/launch")
    parser.add_argument("--portal-url", help="patient portal URL for standalone launch")
    parser.add_argument("--auth-port", type=int, default=0)
    parser.add_argument("--fhir-port", type=int, default=0)
    parser.add_argument("--profile", default="generic", help="FHIR server behaviour profile")
    parser.add_argument(
        "--max-body-bytes", type=int, default=None, help="front-proxy body limit of the body-limit profiles"
    )
    parser.add_argument("--data", type=Path, default=None, help="FHIR Bundle with the synthetic data")
    args = parser.parse_args(argv)
    with SandboxEHR(
        app_launch_url=args.app_launch_url,
        portal_url=args.portal_url,
        auth_port=args.auth_port,
        fhir_port=args.fhir_port,
        fhir_profile=args.profile,
        data_file=args.data,
        fhir_max_body_bytes=args.max_body_bytes,
    ) as sandbox:
        print(f"EHR page:     {sandbox.ehr_url}")
        print(f"FHIR base:    {sandbox.fhir_base}")
        print(f"Auth issuer:  {sandbox.auth_base}")
        print(f"Client id:    {DEMO_CLIENT_ID} (public, PKCE S256)")
        print(f"Discovery:    {sandbox.smart_config_file}")
        print(f"Staff OIDC:   {sandbox.staff_oidc_issuer} (compliance officers sign in here)")
        print("Press Ctrl-C to stop.", flush=True)
        # SIGTERM ends the loop like Ctrl-C, so the context manager stops node and removes the work dir.
        signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass


def _raise_keyboard_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    main()
