"""Staff sign-in edge cases: the provider's discovery document, role claims, pending state, client auth."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from harness import free_port, running_app
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from test_compliance import OFFICER_ACTOR, records, sign_in

from sandbox.run import SandboxEHR, UvicornThread, bind_socket
from sandbox.staff_oidc import STAFF_CALLBACK_PATH, STAFF_CONFIDENTIAL_CLIENT_ID
from service.cli import demo_settings
from service.ehrs import origin_of
from service.settings import StaffOidcSettings
from service.staff_auth import (
    ProviderMetadata,
    SignInFailure,
    StaffPending,
    StaffSignInError,
    check_pending,
    claim_values,
    discover_provider,
    identity_from_claims,
    may_use_console,
)


@dataclass
class FakeProvider:
    """A real HTTP server whose discovery answer each test sets."""

    base: str
    status: int = 200
    body: bytes = b"{}"
    document: dict[str, Any] = field(default_factory=dict)

    def good_document(self) -> dict[str, Any]:
        return {
            "issuer": self.base,
            "authorization_endpoint": f"{self.base}/authorize",
            "token_endpoint": f"{self.base}/token",
            "jwks_uri": f"{self.base}/jwks",
            "code_challenge_methods_supported": ["S256"],
        }


@pytest.fixture(scope="module")
def provider() -> Iterator[FakeProvider]:
    sock = bind_socket()
    fake = FakeProvider(base=f"http://127.0.0.1:{sock.getsockname()[1]}")

    async def discovery(request: Request) -> Response:
        return Response(fake.body, status_code=fake.status, media_type="application/json")

    server = UvicornThread(Starlette(routes=[Route("/.well-known/openid-configuration", discovery)]), sock)
    server.start()
    try:
        yield fake
    finally:
        server.stop()


def answer(provider: FakeProvider, document: dict[str, Any] | None = None, *, status: int = 200) -> None:
    provider.status = status
    provider.body = json.dumps(document if document is not None else provider.good_document()).encode()


def discover(provider: FakeProvider, **settings: Any) -> ProviderMetadata:
    oidc = StaffOidcSettings(issuer=settings.pop("issuer", provider.base), client_id="c", **settings)

    async def run() -> ProviderMetadata:
        async with httpx.AsyncClient() as http:
            return await discover_provider(oidc, http=http)

    return asyncio.run(run())


def refused(provider: FakeProvider, words: str, **settings: Any) -> None:
    with pytest.raises(StaffSignInError, match=words) as caught:
        discover(provider, **settings)
    assert caught.value.reason is SignInFailure.DISCOVERY


def test_a_good_document_is_accepted(provider: FakeProvider) -> None:
    answer(provider)
    found = discover(provider)
    assert found.token_endpoint == f"{provider.base}/token"
    # A provider that does not list its PKCE methods still gets S256.
    answer(
        provider,
        {k: v for k, v in provider.good_document().items() if k != "code_challenge_methods_supported"},
    )
    assert discover(provider).issuer == provider.base


def test_another_issuer_is_refused(provider: FakeProvider) -> None:
    answer(provider, {**provider.good_document(), "issuer": "https://idp.example"})
    refused(provider, "different issuer")


def test_endpoints_on_a_foreign_origin_are_refused_unless_allowed(provider: FakeProvider) -> None:
    answer(provider, {**provider.good_document(), "token_endpoint": "https://evil.example/token"})
    refused(provider, "token_endpoint")
    found = discover(provider, auth_origins=("https://evil.example",))
    assert found.token_endpoint == "https://evil.example/token"
    answer(provider, {**provider.good_document(), "jwks_uri": "http://evil.example/jwks"})
    refused(provider, "jwks_uri", auth_origins=("http://evil.example",))


def test_pkce_without_s256_is_refused(provider: FakeProvider) -> None:
    answer(provider, {**provider.good_document(), "code_challenge_methods_supported": ["plain"]})
    refused(provider, "S256")


def test_broken_answers_are_refused(provider: FakeProvider) -> None:
    answer(provider, status=500)
    refused(provider, "answered 500")
    provider.status, provider.body = 200, b"<html>"
    refused(provider, "not a JSON object")
    provider.body = b"[" + b"1," * 200_000 + b"1]"
    refused(provider, "too large")
    refused(provider, "could not be reached", issuer=f"http://127.0.0.1:{free_port()}")
    refused(provider, "not an https URL", issuer="http://idp.example")


def test_role_claims_by_path_string_or_list() -> None:
    claims = {
        "groups": ["a", "carecanvas-compliance", 3],
        "realm_access": {"roles": ["x", "y"]},
        "scp": "one two",
    }
    assert claim_values(claims, "groups") == ("a", "carecanvas-compliance")
    assert claim_values(claims, "realm_access.roles") == ("x", "y")
    assert claim_values(claims, "scp") == ("one", "two")
    assert claim_values(claims, "missing.deeper") == ()
    settings = StaffOidcSettings(issuer="https://idp.example", client_id="c", role_claim="realm_access.roles")
    identity = identity_from_claims({**claims, "sub": "u1"}, settings=settings)
    assert not may_use_console(identity, settings)
    allowed = StaffOidcSettings(
        issuer="https://idp.example", client_id="c", role_claim="realm_access.roles", compliance_role="y"
    )
    assert may_use_console(identity_from_claims({**claims, "sub": "u1"}, settings=allowed), allowed)


def test_an_unusable_subject_is_refused() -> None:
    settings = StaffOidcSettings(issuer="https://idp.example", client_id="c")
    for subject in (None, "", "has space", "x" * 201, 42):
        with pytest.raises(StaffSignInError) as caught:
            identity_from_claims({"sub": subject}, settings=settings)
        assert caught.value.reason is SignInFailure.BAD_SUBJECT


def test_pending_sign_in_must_exist_match_and_be_fresh() -> None:
    provider = ProviderMetadata(
        "https://idp.example", "https://idp.example/a", "https://idp.example/t", "https://idp.example/j"
    )
    started = datetime.now(UTC)
    pending = StaffPending("s" * 43, "n" * 43, "v" * 43, started, "https://app/cb", provider)
    assert check_pending(pending.to_dict(), "s" * 43) == pending
    cases = [
        (None, "s" * 43, SignInFailure.NO_PENDING, started),
        ({"kind": "ehr", "state": "s"}, "s", SignInFailure.NO_PENDING, started),
        (pending.to_dict(), "t" * 43, SignInFailure.STATE_MISMATCH, started),
        (pending.to_dict(), None, SignInFailure.STATE_MISMATCH, started),
        (pending.to_dict(), "s" * 43, SignInFailure.EXPIRED, started + timedelta(minutes=11)),
    ]
    for raw, state, reason, now in cases:
        with pytest.raises(StaffSignInError) as caught:
            check_pending(raw, state, now=now)
        assert caught.value.reason is reason


def test_a_confidential_staff_client_signs_in_with_its_secret(sandbox: SandboxEHR, tmp_path: Path) -> None:
    port = free_port()
    secret = sandbox.staff_oidc.clients[STAFF_CONFIDENTIAL_CLIENT_ID].secret
    sandbox.staff_oidc.clients[STAFF_CONFIDENTIAL_CLIENT_ID].redirect_uris.append(
        f"http://127.0.0.1:{port}{STAFF_CALLBACK_PATH}"
    )
    base = demo_settings(
        data_dir=tmp_path,
        fhir_base=sandbox.fhir_base,
        auth_base=sandbox.auth_base,
        ehr_origin=origin_of(sandbox.ehr_url),
        port=port,
    )
    staff = StaffOidcSettings(
        issuer=sandbox.staff_oidc_issuer,
        client_id=STAFF_CONFIDENTIAL_CLIENT_ID,
        client_auth="client_secret_basic",
        client_secret=secret,
    )
    settings = base.model_copy(update={"embedded_worker": False, "staff_oidc": staff})
    with running_app(settings, port=port) as app:
        client, finished = sign_in(app.url, sandbox)
        with contextlib.closing(client):
            assert finished.status_code == 303, finished.text
        wrong = settings.model_copy(update={"staff_oidc": staff.model_copy(update={"client_secret": "nope"})})
        assert records(app, actor=OFFICER_ACTOR, action="login")[0].outcome == "success"
    port_b = free_port()
    sandbox.staff_oidc.clients[STAFF_CONFIDENTIAL_CLIENT_ID].redirect_uris.append(
        f"http://127.0.0.1:{port_b}{STAFF_CALLBACK_PATH}"
    )
    wrong = wrong.model_copy(update={"public_url": f"http://127.0.0.1:{port_b}", "data_dir": tmp_path / "b"})
    with running_app(wrong, port=port_b) as app:
        client, finished = sign_in(app.url, sandbox)
        with contextlib.closing(client):
            assert finished.status_code == 400
            assert "refused the code exchange" in finished.text
        failure = records(app, action="login", outcome="failure")[0]
        assert failure.detail["reason"] == "token_refused"
