"""FhirClient against real loopback HTTP servers: retries, re-auth, limits, paging, parsing, errors."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import httpx
import pytest
from fhir_test_servers import Reply, Request, ScriptedServer, outcome
from structlog.testing import capture_logs

from fhir_adapters import (
    FatalFhirError,
    FhirClient,
    ForbiddenError,
    InvalidResponseError,
    NotFoundError,
    PreconditionFailedError,
    TemporaryFhirError,
    UnauthorizedError,
)
from fhir_adapters.client import parse_retry_after

PATIENT = {"resourceType": "Patient", "id": "pat-1"}


def make_client(server: ScriptedServer, **kwargs: Any) -> FhirClient:
    kwargs.setdefault("auth", None)
    kwargs.setdefault("backoff_seconds", 0.01)
    return FhirClient(f"{server.url}/fhir", **kwargs)


class CountingTokens:
    def __init__(self) -> None:
        self.refreshes = 0

    async def access_token(self) -> str:
        return f"token-{self.refreshes}"

    async def refreshed_token(self) -> str:
        self.refreshes += 1
        return f"token-{self.refreshes}"


def condition_page(count: int, *, start: int = 0, next_url: str | None = None) -> dict[str, Any]:
    bundle: dict[str, Any] = {
        "resourceType": "Bundle",
        "type": "searchset",
        "entry": [
            {"resource": {"resourceType": "Condition", "id": f"c{start + i}"}, "search": {"mode": "match"}}
            for i in range(count)
        ],
    }
    if next_url:
        bundle["link"] = [{"relation": "next", "url": next_url}]
    return bundle


async def test_read_sends_fhir_accept_and_returns_resource(server: ScriptedServer) -> None:
    server.handle = lambda r: Reply(body=PATIENT)
    async with make_client(server) as client:
        assert await client.read("Patient", "pat-1") == PATIENT
    assert server.requests[0].path == "/fhir/Patient/pat-1"
    assert server.requests[0].headers["accept"] == "application/fhir+json"
    assert "authorization" not in server.requests[0].headers


async def test_503_then_200_is_retried(server: ScriptedServer) -> None:
    replies = iter([Reply(503, outcome("busy")), Reply(body=PATIENT)])
    server.handle = lambda r: next(replies)
    async with make_client(server) as client:
        assert (await client.read("Patient", "pat-1"))["id"] == "pat-1"
    assert len(server.requests) == 2


async def test_429_honours_retry_after_seconds(server: ScriptedServer) -> None:
    replies = iter([Reply(429, headers={"Retry-After": "1"}), Reply(body=PATIENT)])
    server.handle = lambda r: next(replies)
    async with make_client(server) as client:
        started = time.monotonic()
        await client.read("Patient", "pat-1")
        elapsed = time.monotonic() - started
    assert elapsed >= 0.95
    assert len(server.requests) == 2


async def test_retry_after_beyond_deadline_fails_at_once_with_the_hint(server: ScriptedServer) -> None:
    server.handle = lambda r: Reply(429, headers={"Retry-After": "120"})
    async with make_client(server, deadline_seconds=2) as client:
        started = time.monotonic()
        with pytest.raises(TemporaryFhirError) as caught:
            await client.read("Patient", "pat-1")
    assert time.monotonic() - started < 1
    assert caught.value.status == 429
    assert caught.value.retry_after == 120
    assert len(server.requests) == 1


def test_retry_after_http_date_is_parsed() -> None:
    now = datetime(2026, 6, 2, 12, 0, 0, tzinfo=UTC)
    header = format_datetime(now + timedelta(seconds=7), usegmt=True)
    assert parse_retry_after(header, now=now) == pytest.approx(7)
    assert parse_retry_after("5") == 5
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None


async def test_retries_are_capped(server: ScriptedServer) -> None:
    server.handle = lambda r: Reply(502)
    async with make_client(server, retries=2) as client:
        with pytest.raises(TemporaryFhirError) as caught:
            await client.read("Patient", "pat-1")
    assert caught.value.status == 502
    assert len(server.requests) == 3


@pytest.mark.parametrize(
    ("status", "error_class"),
    [
        (400, FatalFhirError),
        (404, NotFoundError),
        (410, NotFoundError),
        (403, ForbiddenError),
        (412, PreconditionFailedError),
        (501, FatalFhirError),
    ],
)
async def test_fatal_statuses_are_not_retried(server: ScriptedServer, status: int, error_class: type) -> None:
    server.handle = lambda r: Reply(status, outcome("nope"))
    async with make_client(server) as client:
        with pytest.raises(error_class) as caught:
            await client.read("Patient", "pat-1")
    assert not isinstance(caught.value, TemporaryFhirError)
    assert caught.value.status == status
    assert len(server.requests) == 1


async def test_operation_outcome_text_is_kept_but_not_in_the_message(server: ScriptedServer) -> None:
    server.handle = lambda r: Reply(422, outcome("Condition.code is required"))
    async with make_client(server) as client:
        with pytest.raises(FatalFhirError) as caught:
            await client.create({"resourceType": "Condition"})
    assert caught.value.diagnostics == "Condition.code is required"
    assert caught.value.operation_outcome is not None
    assert caught.value.operation_outcome["issue"][0]["code"] == "processing"
    assert "required" not in str(caught.value)
    assert "422" in str(caught.value)


async def test_401_refreshes_once_then_succeeds(server: ScriptedServer) -> None:
    server.handle = lambda r: (
        Reply(body=PATIENT) if r.headers["authorization"] == "Bearer token-1" else Reply(401)
    )
    tokens = CountingTokens()
    async with make_client(server, auth=tokens) as client:
        assert (await client.read("Patient", "pat-1"))["id"] == "pat-1"
    assert tokens.refreshes == 1
    assert [r.headers["authorization"] for r in server.requests] == ["Bearer token-0", "Bearer token-1"]


async def test_refresh_happens_once_even_when_retries_follow(server: ScriptedServer) -> None:
    replies = iter([Reply(401), Reply(503), Reply(body=PATIENT)])
    server.handle = lambda r: next(replies)
    tokens = CountingTokens()
    async with make_client(server, auth=tokens) as client:
        await client.read("Patient", "pat-1")
    assert tokens.refreshes == 1
    assert [r.headers["authorization"] for r in server.requests] == ["Bearer token-0"] + [
        "Bearer token-1"
    ] * 2


async def test_401_after_refresh_is_unauthorized(server: ScriptedServer) -> None:
    server.handle = lambda r: Reply(401, outcome("token rejected"))
    tokens = CountingTokens()
    async with make_client(server, auth=tokens) as client:
        with pytest.raises(UnauthorizedError) as caught:
            await client.read("Patient", "pat-1")
    assert tokens.refreshes == 1
    assert len(server.requests) == 2
    assert caught.value.diagnostics == "token rejected"


async def test_redirect_is_refused(server: ScriptedServer, other_server: ScriptedServer) -> None:
    server.handle = lambda r: Reply(302, headers={"Location": f"{other_server.url}/fhir/Patient/pat-1"})
    other_server.handle = lambda r: Reply(body=PATIENT)
    async with make_client(server) as client:
        with pytest.raises(InvalidResponseError, match="redirect 302"):
            await client.read("Patient", "pat-1")
    assert other_server.requests == []


async def test_search_follows_same_origin_next_links(server: ScriptedServer) -> None:
    def handle(request: Request) -> Reply:
        if "page=2" in request.path:
            return Reply(body=condition_page(2, start=3))
        return Reply(body=condition_page(3, next_url=f"{server.url}/fhir/Condition?page=2"))

    server.handle = handle
    async with make_client(server) as client:
        found = await client.search("Condition", {"patient": "pat-1", "clinical-status": "active"})
    assert [c["id"] for c in found] == ["c0", "c1", "c2", "c3", "c4"]
    assert server.requests[0].query == {"patient": ["pat-1"], "clinical-status": ["active"]}


@pytest.mark.parametrize("link", ["/fhir/Condition?page=2", "Condition?page=2"])
async def test_relative_next_links_resolve_against_the_base(server: ScriptedServer, link: str) -> None:
    def handle(request: Request) -> Reply:
        if "page=2" in request.path:
            return Reply(body=condition_page(1, start=1))
        return Reply(body=condition_page(1, next_url=link))

    server.handle = handle
    async with make_client(server) as client:
        assert [c["id"] for c in await client.search("Condition", {})] == ["c0", "c1"]
    assert server.requests[1].path == "/fhir/Condition?page=2"


async def test_protocol_relative_next_link_to_another_host_is_refused(server: ScriptedServer) -> None:
    server.handle = lambda r: Reply(body=condition_page(1, next_url="//evil.example/fhir/Condition?page=2"))
    async with make_client(server) as client:
        with pytest.raises(InvalidResponseError, match="another origin"):
            await client.search("Condition", {})


async def test_search_ignores_included_and_outcome_entries(server: ScriptedServer) -> None:
    bundle = condition_page(1)
    bundle["entry"].append(
        {"resource": {"resourceType": "Patient", "id": "p"}, "search": {"mode": "include"}}
    )
    bundle["entry"].append({"resource": outcome("warning"), "search": {"mode": "outcome"}})
    server.handle = lambda r: Reply(body=bundle)
    async with make_client(server) as client:
        assert [c["id"] for c in await client.search("Condition", {})] == ["c0"]


async def test_next_link_to_another_origin_is_refused(
    server: ScriptedServer, other_server: ScriptedServer
) -> None:
    server.handle = lambda r: Reply(
        body=condition_page(1, next_url=f"{other_server.url}/fhir/Condition?page=2")
    )
    other_server.handle = lambda r: Reply(body=condition_page(1))
    async with make_client(server) as client:
        with pytest.raises(InvalidResponseError, match="another origin"):
            await client.search("Condition", {})
    assert other_server.requests == []


async def test_next_link_with_other_scheme_is_refused(server: ScriptedServer) -> None:
    server.handle = lambda r: Reply(
        body=condition_page(1, next_url=f"https://127.0.0.1:{server.port}/fhir/x")
    )
    async with make_client(server) as client:
        with pytest.raises(InvalidResponseError, match="another origin"):
            await client.search("Condition", {})


async def test_looping_next_link_is_stopped(server: ScriptedServer) -> None:
    def handle(request: Request) -> Reply:
        other = "a" if "page=b" in request.path else "b"
        return Reply(body=condition_page(1, next_url=f"{server.url}/fhir/Condition?page={other}"))

    server.handle = handle
    async with make_client(server) as client:
        with pytest.raises(InvalidResponseError, match="loop"):
            await client.search("Condition", {})
    assert len(server.requests) == 3


async def test_page_limit(server: ScriptedServer) -> None:
    server.handle = lambda r: Reply(
        body=condition_page(1, next_url=f"{server.url}/fhir/Condition?page={len(server.requests)}")
    )
    async with make_client(server, max_pages=4) as client:
        with pytest.raises(InvalidResponseError, match="more than 4 pages"):
            await client.search("Condition", {})
    assert len(server.requests) == 4


async def test_huge_bundle_hits_the_entry_limit(server: ScriptedServer) -> None:
    huge = json.dumps(condition_page(100_000)).encode()
    server.handle = lambda r: Reply(body=huge)
    async with make_client(server) as client:
        with pytest.raises(InvalidResponseError, match="more than 5000 entries"):
            await client.search("Condition", {})


async def test_byte_limit_stops_reading(server: ScriptedServer) -> None:
    server.handle = lambda r: Reply(body=condition_page(2000))
    async with make_client(server, max_bytes=10_000) as client:
        with pytest.raises(InvalidResponseError, match="10000-byte limit"):
            await client.search("Condition", {})


async def test_malformed_json(server: ScriptedServer) -> None:
    server.handle = lambda r: Reply(body=b'{"resourceType": "Patient", ')
    async with make_client(server) as client:
        with pytest.raises(InvalidResponseError, match="not valid JSON"):
            await client.read("Patient", "pat-1")


async def test_wrong_resource_type(server: ScriptedServer) -> None:
    server.handle = lambda r: Reply(body={"resourceType": "Observation", "id": "pat-1"})
    async with make_client(server) as client:
        with pytest.raises(InvalidResponseError, match="expected a Patient"):
            await client.read("Patient", "pat-1")


async def test_read_with_other_id_is_refused(server: ScriptedServer) -> None:
    server.handle = lambda r: Reply(body={"resourceType": "Patient", "id": "pat-2"})
    async with make_client(server) as client:
        with pytest.raises(InvalidResponseError, match="another id"):
            await client.read("Patient", "pat-1")


async def test_html_content_type_is_refused(server: ScriptedServer) -> None:
    server.handle = lambda r: Reply(body=b"<html>login</html>", content_type="text/html")
    async with make_client(server) as client:
        with pytest.raises(InvalidResponseError, match="text/html"):
            await client.read("Patient", "pat-1")


async def test_ids_that_would_change_the_path_are_refused(server: ScriptedServer) -> None:
    async with make_client(server) as client:
        with pytest.raises(ValueError, match="resource id"):
            await client.read("Patient", "../metadata")
        with pytest.raises(ValueError, match="resource type"):
            await client.read("patient?x=1", "a")
    assert server.requests == []


async def test_connection_refused_is_temporary() -> None:
    probe = ScriptedServer()
    base = f"{probe.url}/fhir"
    probe.close()
    async with FhirClient(base, auth=None, retries=1, backoff_seconds=0.01) as client:
        with pytest.raises(TemporaryFhirError, match="could not connect"):
            await client.read("Patient", "pat-1")


async def test_deadline_bounds_a_slow_server(server: ScriptedServer) -> None:
    server.handle = lambda r: Reply(body=PATIENT, delay=2)
    async with make_client(server, deadline_seconds=0.5) as client:
        started = time.monotonic()
        with pytest.raises(TemporaryFhirError, match="deadline"):
            await client.read("Patient", "pat-1")
    assert time.monotonic() - started < 1.5


async def test_plain_create_is_not_retried_after_503(server: ScriptedServer) -> None:
    server.handle = lambda r: Reply(503)
    async with make_client(server) as client:
        with pytest.raises(TemporaryFhirError):
            await client.create({"resourceType": "Device"})
    assert len(server.requests) == 1


async def test_conditional_create_is_retried_and_reports_existing(server: ScriptedServer) -> None:
    created = {"resourceType": "Device", "id": "d1", "meta": {"versionId": "1"}}
    replies = iter([Reply(503), Reply(200, created)])
    server.handle = lambda r: next(replies)
    async with make_client(server) as client:
        result = await client.create({"resourceType": "Device"}, if_none_exist="identifier=s|v")
    assert (result.id, result.version_id, result.created, result.status) == ("d1", "1", False, 200)
    assert [r.headers["if-none-exist"] for r in server.requests] == ["identifier=s|v"] * 2
    assert server.requests[0].headers["content-type"] == "application/fhir+json"


async def test_create_without_body_reads_the_location(server: ScriptedServer) -> None:
    def handle(request: Request) -> Reply:
        if request.method == "POST":
            return Reply(201, headers={"Location": f"{server.url}/fhir/Device/d9/_history/1"})
        return Reply(body={"resourceType": "Device", "id": "d9", "meta": {"versionId": "1"}})

    server.handle = handle
    async with make_client(server) as client:
        result = await client.create({"resourceType": "Device"})
    assert result.created
    assert result.id == "d9"
    assert server.requests[1].path == "/fhir/Device/d9/_history/1"


async def test_update_sends_if_match_and_is_retried(server: ScriptedServer) -> None:
    replies = iter(
        [Reply(500), Reply(200, {"resourceType": "Device", "id": "d1", "meta": {"versionId": "3"}})]
    )
    server.handle = lambda r: next(replies)
    async with make_client(server) as client:
        result = await client.update({"resourceType": "Device", "id": "d1"}, if_match='W/"2"')
    assert result.version_id == "3"
    assert not result.created
    assert server.requests[0].method == "PUT"
    assert server.requests[0].headers["if-match"] == 'W/"2"'


@pytest.mark.parametrize(("conditional", "attempts"), [(True, 2), (False, 1)])
async def test_transaction_retried_only_when_all_creates_are_conditional(
    server: ScriptedServer, conditional: bool, attempts: int
) -> None:
    response = {
        "resourceType": "Bundle",
        "type": "transaction-response",
        "entry": [{"response": {"status": "201"}}],
    }
    replies = iter([Reply(503), Reply(body=response)])
    server.handle = lambda r: next(replies)
    request: dict[str, Any] = {"method": "POST", "url": "Device"}
    if conditional:
        request["ifNoneExist"] = "identifier=s|v"
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [{"resource": {}, "request": request}],
    }
    async with make_client(server) as client:
        if conditional:
            assert (await client.transaction(bundle))["type"] == "transaction-response"
        else:
            with pytest.raises(TemporaryFhirError):
                await client.transaction(bundle)
    assert len(server.requests) == attempts


async def test_capabilities_are_cached(server: ScriptedServer) -> None:
    server.handle = lambda r: Reply(body={"resourceType": "CapabilityStatement"})
    async with make_client(server) as client:
        await client.capabilities()
        await client.capabilities()
    assert len(server.requests) == 1


async def test_read_reference_forms(server: ScriptedServer) -> None:
    server.handle = lambda r: Reply(body={"resourceType": "Condition", "id": "x"})
    async with make_client(server) as client:
        await client.read_reference("Condition/x")
        await client.read_reference("Condition/x/_history/2")
        await client.read_reference(f"{server.url}/fhir/Condition/x")
        with pytest.raises(ValueError, match="this client's FHIR base"):
            await client.read_reference("https://elsewhere.example/fhir/Condition/x")
        with pytest.raises(ValueError, match="reference must look like"):
            await client.read_reference("Condition")
    assert [r.path for r in server.requests] == [
        "/fhir/Condition/x",
        "/fhir/Condition/x/_history/2",
        "/fhir/Condition/x",
    ]


async def test_logs_hold_no_ids_queries_or_tokens(server: ScriptedServer) -> None:
    server.handle = lambda r: Reply(body=condition_page(1))
    async with make_client(server, auth=CountingTokens()) as client:
        with capture_logs() as logs:
            await client.search("Condition", {"patient": "pat-secret-1"})
    assert logs, "a request log line is expected"
    assert set(logs[0]) <= {"event", "log_level", "method", "resource_type", "status", "duration_ms"}
    text = json.dumps(logs)
    assert "pat-secret-1" not in text
    assert "token-0" not in text
    assert "127.0.0.1" not in text


async def test_mock_transport_read_error_on_post_is_not_retried() -> None:
    # A connection dropped after the request was sent: only MockTransport produces this reliably.
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        raise httpx.ReadError("connection reset", request=request)

    transport = httpx.MockTransport(handler)
    async with FhirClient(
        "https://ehr.example/fhir", auth=None, transport=transport, backoff_seconds=0
    ) as client:
        with pytest.raises(TemporaryFhirError, match="ReadError"):
            await client.create({"resourceType": "Device"})
        with pytest.raises(TemporaryFhirError):
            await client.read("Device", "d1")
    assert len(calls) == 1 + 4  # the POST once; the GET with three retries
