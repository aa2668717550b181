"""Helpers for the API tests: a cookie session with its CSRF token, real EHR tokens, table counts."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
from harness import RunningApp, csrf_from, launch_session
from sqlalchemy import text

from sandbox.auth.config import DEMO_CLIENT_ID
from sandbox.run import SandboxEHR

API = "/api/v1"
EHR_SCOPES = (
    "launch openid fhirUser patient/Patient.rs patient/Condition.rs patient/Encounter.rs "
    "patient/DocumentReference.cruds patient/Provenance.cs patient/Device.cs patient/Binary.cr "
    "patient/QuestionnaireResponse.rs"
)


@dataclass
class ApiSession:
    client: httpx.Client
    csrf: str

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.client.get(API + path, **kwargs)

    def send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        headers = {"X-CSRF-Token": self.csrf, **kwargs.pop("headers", {})}
        return self.client.request(method, API + path, headers=headers, **kwargs)

    def post(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.send("POST", path, **kwargs)


@contextlib.contextmanager
def cookie_session(app_url: str, sandbox: SandboxEHR, *, patient: str = "pat-1") -> Iterator[ApiSession]:
    with launch_session(app_url, sandbox, patient=patient) as client:
        yield ApiSession(client=client, csrf=csrf_from(client.get("/app").text))


def bearer_token(
    sandbox: SandboxEHR, app_url: str, *, patient: str, scope: str = EHR_SCOPES, practitioner: str = "prac-1"
) -> str:
    """The authorization code flow as an EHR-embedded front end runs it (public client, PKCE)."""
    discovery = httpx.get(f"{sandbox.fhir_base}/.well-known/smart-configuration", timeout=10).json()
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    redirect_uri = f"{app_url}/callback"
    params = {
        "response_type": "code",
        "client_id": DEMO_CLIENT_ID,
        "redirect_uri": redirect_uri,
        "scope": scope,
        "state": secrets.token_urlsafe(16),
        "aud": sandbox.fhir_base,
        "launch": sandbox.create_launch(patient, practitioner, None),
        "code_challenge": challenge,
        "code_challenge_method": "S256",
        "nonce": secrets.token_urlsafe(16),
    }
    authorized = httpx.get(discovery["authorization_endpoint"], params=params, timeout=10)
    assert authorized.status_code in (302, 303), authorized.text
    code = parse_qs(urlsplit(authorized.headers["location"]).query)["code"][0]
    token = httpx.post(
        discovery["token_endpoint"],
        data={
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": redirect_uri,
            "client_id": DEMO_CLIENT_ID,
            "code_verifier": verifier,
        },
        timeout=10,
    )
    assert token.status_code == 200, token.text
    return str(token.json()["access_token"])


def bearer(app_url: str, token: str, **headers: str) -> httpx.Client:
    return httpx.Client(
        base_url=app_url + API, headers={"Authorization": f"Bearer {token}", **headers}, timeout=30
    )


def counts(app: RunningApp) -> dict[str, int]:
    """Rows in the tables a request could write to (nothing may change on a refused request).

    Read once the worker is idle, so an earlier test's job finishing in between cannot change them.
    """

    async def busy() -> int:
        async with app.services.sessionmaker() as db:
            query = text("SELECT count(*) FROM jobs WHERE status IN ('queued', 'running')")
            return int((await db.execute(query)).scalar_one())

    deadline = time.monotonic() + 120
    while app.call(busy()) and time.monotonic() < deadline:
        time.sleep(0.1)

    async def read() -> dict[str, int]:
        async with app.services.sessionmaker() as db:
            tables = ("jobs", "documents", "artifacts", "web_sessions")
            return {
                t: int((await db.execute(text(f"SELECT count(*) FROM {t}"))).scalar_one())  # noqa: S608
                for t in tables
            }

    result: dict[str, int] = app.call(read())
    return result


def audit_count(app: RunningApp) -> int:
    async def read() -> int:
        async with app.services.sessionmaker() as db:
            return int((await db.execute(text("SELECT count(*) FROM audit_records"))).scalar_one())

    result: int = app.call(read())
    return result


def wait_final(get: Any, job_id: str, *, timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body: dict[str, Any] = get(f"/jobs/{job_id}").json()
        if body["status"] in {"succeeded", "failed", "quarantined", "cancelled"}:
            return body
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} did not finish")
