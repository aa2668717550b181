"""Rate limits per client on sign-ins and job POSTs: 429 with Retry-After, readable, before any work."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select

from sandbox.run import SandboxEHR
from service.app import create_app
from service.db.models import Job
from service.ehrs import origin_of
from service.generation.readability import caption_grade
from service.settings import EhrSettings, Settings
from service.web.rate_limit import RateGroup, TokenBuckets, client_key, rate_group


class Clients:
    """In-process clients of one app, each with its own address (as uvicorn would see it)."""

    def __init__(self, app: object) -> None:
        self.app = app
        self._clients: dict[str, httpx.AsyncClient] = {}

    def __call__(self, address: str) -> httpx.AsyncClient:
        if address not in self._clients:
            transport = httpx.ASGITransport(app=self.app, client=(address, 40000))  # type: ignore[arg-type]
            self._clients[address] = httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8000")
        return self._clients[address]

    async def aclose(self) -> None:
        for client in self._clients.values():
            await client.aclose()


@pytest.fixture
async def limited(sandbox: SandboxEHR, tmp_path: Path) -> AsyncIterator[Clients]:
    settings = Settings(
        data_dir=tmp_path,
        embedded_worker=False,
        ehrs=[
            EhrSettings(
                name="sandbox",
                iss=sandbox.fhir_base,
                client_id="carecanvas-demo",
                auth_origins=(origin_of(sandbox.auth_base),),
            )
        ],
        launch_burst=3,
        launch_rate_per_minute=60,  # one a second
        job_post_burst=2,
        job_post_rate_per_minute=6,  # one every 10 s
    )
    app = create_app(settings)
    clients = Clients(app)
    async with app.router.lifespan_context(app):
        try:
            yield clients
        finally:
            await clients.aclose()


async def test_sign_ins_beyond_the_burst_get_a_readable_429_and_other_clients_do_not(
    sandbox: SandboxEHR, limited: Clients
) -> None:
    params = {"iss": sandbox.fhir_base, "launch": "x"}
    first = [await limited("203.0.113.7").get("/launch", params=params) for _ in range(3)]
    assert [answer.status_code for answer in first] == [302, 302, 302]
    refused = await limited("203.0.113.7").get("/launch", params=params)
    assert refused.status_code == 429
    assert refused.headers["retry-after"] == "1"
    assert "set-cookie" not in refused.headers
    assert "Content-Security-Policy" in refused.headers  # answered inside the security headers
    assert "<h1" in refused.text
    assert "Too many requests" in refused.text
    assert "Please wait 1 second, then try again." in refused.text
    assert "Traceback" not in refused.text
    assert (await limited("203.0.113.7").get("/portal/launch", params={"ehr": "sandbox"})).status_code == 429
    # Another address has a bucket of its own.
    assert (await limited("203.0.113.8").get("/launch", params=params)).status_code == 302
    await asyncio.sleep(1.05)  # one token back
    assert (await limited("203.0.113.7").get("/launch", params=params)).status_code == 302


async def test_job_posts_beyond_the_burst_get_429_as_json_or_a_page_and_queue_nothing(
    limited: Clients,
) -> None:
    client = limited("203.0.113.9")
    body = {"condition_id": "c", "style": "flat_vector", "language": "en"}
    # No session: the first two are refused by the routes (401), then the limit answers before them.
    before = [await client.post("/api/v1/illustrations", json=body) for _ in range(2)]
    assert [answer.status_code for answer in before] == [401, 401]
    api = await client.post("/api/v1/illustrations", json=body)
    assert api.status_code == 429
    assert api.json()["code"] == "rate_limited"
    assert 1 <= int(api.headers["retry-after"]) <= 10
    page = await client.post("/illustrations", data=body)
    assert page.status_code == 429
    assert page.headers["content-type"].startswith("text/html")
    assert "Too many requests" in page.text
    for path in ("/portraits", "/documents/0b7e7c3e-2f0a-4c1e-9f4e-1a2b3c4d5e6f/regenerate"):
        assert (await client.post(path, data={})).status_code == 429
    # Reading is never limited.
    assert (await client.get("/healthz")).status_code == 200
    assert (await limited("203.0.113.10").post("/api/v1/illustrations", json=body)).status_code == 401
    services = client._transport.app.state.services  # type: ignore[attr-defined]
    async with services.sessionmaker() as db:
        assert (await db.execute(select(func.count()).select_from(Job))).scalar_one() == 0


def test_refusal_messages_are_plain_language() -> None:
    from service.web.rate_limit import too_many_requests

    for group in RateGroup:
        error = too_many_requests(group, 30)
        assert caption_grade(error.message, "en") <= 6, error.message


def test_which_requests_are_limited() -> None:
    assert rate_group("GET", "/launch") is RateGroup.SIGN_IN
    assert rate_group("GET", "/compliance/login") is RateGroup.SIGN_IN
    assert rate_group("POST", "/illustrations") is RateGroup.JOB_POST
    assert rate_group("POST", "/api/v1/portraits") is RateGroup.JOB_POST
    assert rate_group("POST", "/documents/abc/regenerate") is RateGroup.JOB_POST
    for method, path in (
        ("GET", "/app"),
        ("GET", "/callback"),
        ("POST", "/jobs/x/cancel"),
        ("GET", "/illustrations"),
    ):
        assert rate_group(method, path) is None


def test_token_buckets_refill_and_stay_bounded() -> None:
    now = [0.0]
    buckets = TokenBuckets(per_minute=60, burst=2, max_keys=3, clock=lambda: now[0])
    assert [buckets.take("a") for _ in range(2)] == [0.0, 0.0]
    assert buckets.take("a") == pytest.approx(1.0)
    now[0] = 0.5
    assert buckets.take("a") == pytest.approx(0.5)
    now[0] = 1.0
    assert buckets.take("a") == 0.0
    for key in ("b", "c", "d"):
        buckets.take(key)
    assert len(buckets._buckets) == 3
    assert "a" not in buckets._buckets  # the least recently used went


def test_clients_are_keyed_by_address_and_ipv6_by_its_64() -> None:
    assert client_key("203.0.113.7") == "203.0.113.7"
    assert client_key("2001:db8:1:2:aaaa::1") == client_key("2001:db8:1:2:bbbb::9") == "2001:db8:1:2::/64"
    assert client_key("2001:db8:1:3::1") != client_key("2001:db8:1:2::1")
    assert client_key("::ffff:203.0.113.7") == "203.0.113.7"
    assert client_key(None) == "unknown"
    assert client_key("testclient") == "testclient"
