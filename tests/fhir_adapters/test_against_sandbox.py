"""fhir_adapters against the sandbox EHR: a real FHIR server (Medplum) and the SMART authorization server."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from fhir_adapters import (
    AttachmentPolicy,
    DiscoveryError,
    DocumentReferenceInput,
    EhrRegistration,
    FatalFhirError,
    FhirClient,
    IdTokenError,
    SmartTokenSource,
    TokenSet,
    apply_attachment_policy,
    attachment_policy_from_capabilities,
    begin_authorization,
    build_document_reference,
    build_model_device,
    build_provenance,
    check_state,
    discover,
    exchange_code,
    mark_entered_in_error,
    refresh,
    requested_scopes,
    summarize_condition,
    summarize_patient,
    write_document_set,
)
from sandbox.run import SandboxEHR

pytestmark = pytest.mark.slow

REDIRECT_URI = "http://127.0.0.1:9/callback"
SYSTEM = "urn:carecanvas:artifact"
NOW = datetime(2026, 6, 2, 15, 4, 5, tzinfo=UTC)


@pytest.fixture(scope="module")
def ehr() -> Iterator[SandboxEHR]:
    with SandboxEHR(redirect_uris=[REDIRECT_URI]) as sandbox:
        yield sandbox


@pytest.fixture
def reset_sandbox(ehr: SandboxEHR) -> Iterator[SandboxEHR]:
    yield ehr
    ehr.misbehave.reset()
    ehr.fhir.set_profile("generic")


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient() as client:
        yield client


def registration(ehr: SandboxEHR) -> EhrRegistration:
    return EhrRegistration(
        name="sandbox",
        iss=ehr.fhir_base,
        client_id="carecanvas-demo",
        client_auth="public",
        redirect_uri=REDIRECT_URI,
        auth_origins=(ehr.auth_base,),
    )


async def launch(ehr: SandboxEHR, http: httpx.AsyncClient) -> tuple[EhrRegistration, Any, TokenSet]:
    """The EHR launch as the service performs it, with the browser's redirect followed by hand."""
    reg = registration(ehr)
    config = await discover(reg.iss, http=http, registration=reg)
    pending = begin_authorization(
        registration=reg,
        config=config,
        redirect_uri=REDIRECT_URI,
        launch=ehr.create_launch("pat-1", "prac-1", "enc-1"),
        scopes=requested_scopes(capabilities=config.capabilities, purpose="ehr-launch"),
    )
    answer = await http.get(pending.url, follow_redirects=False)
    assert answer.status_code == 302, answer.text[:300]
    callback = parse_qs(urlsplit(answer.headers["Location"]).query)
    check_state(pending, callback["state"][0])
    tokens = await exchange_code(
        registration=reg, config=config, code=callback["code"][0], pending=pending, http=http
    )
    return reg, config, tokens


async def test_ehr_launch_then_read_patient_and_conditions(
    reset_sandbox: SandboxEHR, http: httpx.AsyncClient
) -> None:
    ehr = reset_sandbox
    reg, config, tokens = await launch(ehr, http)
    assert tokens.patient == "pat-1"
    assert tokens.encounter == "enc-1"
    assert tokens.id_token_claims is not None
    assert tokens.fhir_user is not None
    assert tokens.fhir_user.endswith("Practitioner/prac-1")
    assert tokens.scopes.allows("Condition", "search")
    source = SmartTokenSource(registration=reg, config=config, token_set=tokens, http=http)
    async with FhirClient(ehr.fhir_base, auth=source) as client:
        banner = summarize_patient(await client.read("Patient", "pat-1"))
        conditions = await client.search("Condition", {"patient": "pat-1"})
    assert banner.display_name
    assert conditions
    summaries = [summarize_condition(c) for c in conditions]
    assert all(s.text and s.text != "None" for s in summaries)
    assert any(s.is_active for s in summaries)


async def test_condition_paging_over_all_patients(ehr: SandboxEHR) -> None:
    async with sandbox_client(ehr) as client:
        everything = await client.search("Condition", {"_count": "2"})
        pages = await client.search_bundles("Condition", {"_count": "2"})
    assert len(pages) > 1
    assert len({c["id"] for c in everything}) == len(everything)
    assert all(summarize_condition(c).text != "None" for c in everything)


async def test_refresh_against_the_sandbox(reset_sandbox: SandboxEHR, http: httpx.AsyncClient) -> None:
    reg, config, tokens = await launch(reset_sandbox, http)
    if tokens.refresh_token is None:
        pytest.fail("the sandbox issued no refresh token for online_access")
    renewed = await refresh(registration=reg, config=config, token_set=tokens, http=http)
    assert renewed.access_token != tokens.access_token
    assert renewed.refresh_token
    assert renewed.patient == "pat-1"


@pytest.mark.parametrize(
    "misbehaviour",
    [
        "id_token_wrong_nonce",
        "id_token_alg_none",
        "id_token_wrong_aud",
        "id_token_expired",
        "id_token_wrong_key",
    ],
)
async def test_bad_id_tokens_from_the_sandbox_are_refused(
    reset_sandbox: SandboxEHR, http: httpx.AsyncClient, misbehaviour: str
) -> None:
    setattr(reset_sandbox.misbehave, misbehaviour, True)
    with pytest.raises(IdTokenError):
        await launch(reset_sandbox, http)


async def test_foreign_token_endpoint_is_refused(reset_sandbox: SandboxEHR, http: httpx.AsyncClient) -> None:
    reset_sandbox.misbehave.foreign_token_endpoint = True
    reg = registration(reset_sandbox)
    with pytest.raises(DiscoveryError, match="token_endpoint"):
        await discover(reg.iss, http=http, registration=reg)


def document_set(value: str, *, png: bytes) -> dict[str, Any]:
    document = build_document_reference(
        DocumentReferenceInput(
            identifier_value=value,
            patient_id="pat-1",
            practitioner_id="prac-1",
            organization_id="org-1",
            encounter_id="enc-1",
            condition_id="cond-1",
            description="Patient education illustration",
            language="en",
            pdf=b"%PDF-1.7\n" + b"p" * 200,
            png=png,
            alt_text="A drawing for the patient.",
            created=NOW,
            date=NOW,
        )
    )
    provenance = build_provenance(
        target_ref=f"urn:uuid:{uuid.uuid4()}",
        device_ref=f"urn:uuid:{uuid.uuid4()}",
        practitioner_id="prac-1",
        organization_id="org-1",
        condition_id="cond-1",
        prompt_markdown="education illustration prompt",
        started=NOW,
        ended=NOW,
        recorded=NOW,
    )
    device = build_model_device(device_id_value="tiny-sd@1", model_name="tiny-sd", model_version="1")
    return {"document": document, "device": device, "provenance": provenance}


class StaticToken:
    """A sandbox access token minted for calling the FHIR server directly."""

    def __init__(self, token: str) -> None:
        self.token = token

    async def access_token(self) -> str:
        return self.token

    async def refreshed_token(self) -> str:
        return self.token


def sandbox_client(ehr: SandboxEHR) -> FhirClient:
    return FhirClient(ehr.fhir_base, auth=StaticToken(ehr.mint_token()), backoff_seconds=0.1)


async def write(
    client: FhirClient, ehr: SandboxEHR, *, profile: str, png: bytes, policy: AttachmentPolicy
) -> tuple[Any, str]:
    ehr.fhir.set_profile(profile)
    value = f"sandbox-{profile}-{uuid.uuid4()}"
    parts = document_set(value, png=png)
    parts["document"], binaries = apply_attachment_policy(
        parts["document"], policy=policy, patient_id="pat-1"
    )
    written = await write_document_set(
        client, **parts, binaries=binaries, identifier_system=SYSTEM, identifier_value=value
    )
    return written, value


async def assert_exactly_one(client: FhirClient, value: str, document_id: str) -> dict[str, Any]:
    [stored] = await client.search("DocumentReference", {"identifier": f"{SYSTEM}|{value}"})
    assert stored["id"] == document_id
    provenances = await client.search("Provenance", {"target": f"DocumentReference/{document_id}"})
    assert len(provenances) == 1
    assert provenances[0]["agent"][0]["who"]["reference"].startswith("Device/")
    return stored


@pytest.mark.parametrize(
    ("profile", "strategy"),
    [("generic", "transaction"), ("no-transactions", "single-requests"), ("commit-then-503", None)],
)
async def test_write_back_profiles(reset_sandbox: SandboxEHR, profile: str, strategy: str | None) -> None:
    async with sandbox_client(reset_sandbox) as client:
        written, value = await write(
            client,
            reset_sandbox,
            profile=profile,
            png=b"\x89PNG\r\n\x1a\n" + b"i" * 100,
            policy=AttachmentPolicy(),
        )
        stored = await assert_exactly_one(client, value, written.document_id)
        if strategy is not None:
            assert written.strategy == strategy
        assert [c["attachment"]["contentType"] for c in stored["content"]] == ["application/pdf", "image/png"]
        assert stored["meta"]["security"][0]["code"] == "AIAST"
        # Writing the same set again changes nothing.
        again = await write_document_set(
            client,
            **document_set(value, png=b"\x89PNG\r\n\x1a\n" + b"i" * 100),
            identifier_system=SYSTEM,
            identifier_value=value,
        )
        assert again.document_id == written.document_id
        await assert_exactly_one(client, value, written.document_id)
    if profile == "commit-then-503":
        # The transaction was committed and answered 503; the retry found it instead of writing it again.
        assert ("POST", "/fhir", 503) in [
            (r["method"], r["path"], r["status"]) for r in reset_sandbox.fhir.requests()
        ]


async def test_commit_then_503_with_single_requests(reset_sandbox: SandboxEHR) -> None:
    """The sandbox loses the answer to the first create after committing it; one document results."""
    ehr = reset_sandbox
    ehr.fhir.reset()
    async with sandbox_client(ehr) as client:
        # Learn the transaction capability first, then take it away so the ordered single requests run.
        ehr.fhir.set_profile("no-transactions")
        await client.capabilities()
        written, value = await write(
            client, ehr, profile="commit-then-503", png=b"\x89PNG\r\n\x1a\n", policy=AttachmentPolicy()
        )
        await assert_exactly_one(client, value, written.document_id)
    statuses = [(r["method"], r["path"].rsplit("/", 1)[-1], r["status"]) for r in ehr.fhir.requests()]
    assert ("POST", "Device", 503) in statuses  # the first create was committed and then answered 503
    assert written.strategy == "single-requests"


async def test_pdf_only_server_needs_images_dropped(reset_sandbox: SandboxEHR) -> None:
    png = b"\x89PNG\r\n\x1a\n"
    async with sandbox_client(reset_sandbox) as client:
        with pytest.raises(FatalFhirError) as caught:
            await write(client, reset_sandbox, profile="pdf-only", png=png, policy=AttachmentPolicy())
        assert caught.value.status == 400
        assert "image/png" in caught.value.diagnostics
        written, value = await write(
            client, reset_sandbox, profile="pdf-only", png=png, policy=AttachmentPolicy(accept_images=False)
        )
        stored = await assert_exactly_one(client, value, written.document_id)
    assert [c["attachment"]["contentType"] for c in stored["content"]] == ["application/pdf"]


@pytest.mark.parametrize("transactions", [True, False])
async def test_small_inline_server_gets_a_binary(reset_sandbox: SandboxEHR, transactions: bool) -> None:
    big_png = b"\x89PNG\r\n\x1a\n" + b"i" * 70_000
    async with sandbox_client(reset_sandbox) as client:
        written, value = await write(
            client,
            reset_sandbox,
            profile="small-inline" if transactions else "no-transactions",
            png=big_png,
            policy=AttachmentPolicy(max_inline_bytes=64 * 1024),
        )
        stored = await assert_exactly_one(client, value, written.document_id)
        url = stored["content"][1]["attachment"]["url"]
        assert url.startswith("Binary/")
        binary = await client.read_reference(url)
    assert binary["contentType"] == "image/png"
    assert stored["content"][1]["attachment"]["size"] == len(big_png)


async def test_mark_entered_in_error_on_the_sandbox(reset_sandbox: SandboxEHR) -> None:
    async with sandbox_client(reset_sandbox) as client:
        written, _value = await write(
            client, reset_sandbox, profile="generic", png=b"\x89PNG\r\n\x1a\n", policy=AttachmentPolicy()
        )
        result = await mark_entered_in_error(client, written.document_id)
        assert result is not None
        assert (await client.read("DocumentReference", written.document_id))["status"] == "entered-in-error"
        assert await mark_entered_in_error(client, written.document_id) is None


@pytest.mark.parametrize(
    ("profile", "expected"),
    [
        ("generic", AttachmentPolicy(accept_images=True, max_inline_bytes=1_000_000)),
        ("pdf-only", AttachmentPolicy(accept_images=False, max_inline_bytes=1_000_000)),
        ("small-inline", AttachmentPolicy(accept_images=True, max_inline_bytes=64 * 1024)),
    ],
)
async def test_attachment_policy_from_sandbox_capabilities(
    reset_sandbox: SandboxEHR, profile: str, expected: AttachmentPolicy
) -> None:
    reset_sandbox.fhir.set_profile(profile)
    async with sandbox_client(reset_sandbox) as client:
        capabilities = await client.capabilities()
    default = AttachmentPolicy(accept_images=True, max_inline_bytes=1_000_000)
    assert attachment_policy_from_capabilities(capabilities, default=default) == expected
