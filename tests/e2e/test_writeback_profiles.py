"""Write-back through the service against each vendor profile of the sandbox FHIR server, exactly once."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from harness import CONDITION, RunningApp, csrf_from, free_port, launch_session, running_app, wait_for_job
from pypdf import PdfReader

from sandbox.run import SandboxEHR
from service.cli import demo_settings
from service.ehrs import origin_of
from service.settings import EhrSettings
from service.workflows.approve import IDENTIFIER_SYSTEM, artifact_identifier

pytestmark = pytest.mark.slow

# Registrations under test: what the integration team wrote about attachments (nothing, or an override).
DEFAULT_SCOPES: tuple[str, ...] = EhrSettings.model_fields["scopes"].default
WITH_BINARY = tuple(dict.fromkeys((*DEFAULT_SCOPES, "patient/Binary.cr")))
WITHOUT_BINARY = tuple(scope for scope in DEFAULT_SCOPES if not scope.startswith("patient/Binary."))
VARIANTS: dict[str, dict[str, Any]] = {
    "silent": {},
    "no-images": {"accept_images": False},
    "insists": {"accept_images": True, "max_inline_bytes": 5_000_000, "scopes": WITH_BINARY},
    "big-images": {"scopes": WITH_BINARY},
    "a4": {"handout_page_size": "a4"},
    # The default scopes ask for Binary; this registration leaves it out, as some EHRs' app galleries do.
    "big-images-no-binary-scope": {"scopes": WITHOUT_BINARY},
}
# 256x256 noise makes a PNG and a handout well above the small-inline server's 64 KiB inline limit.
IMAGE_SIZES = {"insists": 256, "big-images": 256, "big-images-no-binary-scope": 256}
INLINE_LIMIT = 64 * 1024


@pytest.fixture(scope="module")
def ports() -> dict[str, int]:
    return {name: free_port() for name in VARIANTS}


@pytest.fixture(scope="module")
def ehr(ports: dict[str, int]) -> Iterator[SandboxEHR]:
    callbacks = [f"http://127.0.0.1:{port}/callback" for port in ports.values()]
    with SandboxEHR(redirect_uris=callbacks) as sandbox:
        yield sandbox


@pytest.fixture(scope="module")
def apps(
    ehr: SandboxEHR, ports: dict[str, int], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, RunningApp]]:
    with contextlib.ExitStack() as stack:
        started = {}
        for name, overrides in VARIANTS.items():
            settings = demo_settings(
                data_dir=Path(tmp_path_factory.mktemp(f"writeback-{name}")),
                fhir_base=ehr.fhir_base,
                auth_base=ehr.auth_base,
                ehr_origin=origin_of(ehr.ehr_url),
                port=ports[name],
            )
            settings.image_size = IMAGE_SIZES.get(name, settings.image_size)
            # These tests switch the server's profile between requests: read its capabilities each time.
            settings.capabilities_max_age_seconds = 0
            base = settings.ehrs[0].model_dump(exclude_unset=True)
            settings.ehrs = [EhrSettings(**{**base, **overrides})]
            started[name] = stack.enter_context(running_app(settings, port=ports[name]))
        yield started


@pytest.fixture(autouse=True)
def fresh_server(ehr: SandboxEHR) -> Iterator[None]:
    ehr.fhir.set_profile("generic")
    ehr.fhir.reset()
    yield
    ehr.fhir.set_profile("generic")


def fhir_get(ehr: SandboxEHR, path: str, params: dict[str, str] | None = None) -> dict[str, Any]:
    token = ehr.mint_token()
    response = httpx.get(
        f"{ehr.fhir_base}/{path}", params=params, headers={"Authorization": f"Bearer {token}"}, timeout=30
    )
    response.raise_for_status()
    return response.json()  # type: ignore[no-any-return]


def make_picture(client: httpx.Client) -> tuple[str, str]:
    """Generate a picture for the first active condition; returns (job id, CSRF token)."""
    workspace = client.get("/app")
    assert workspace.status_code == 200, workspace.text
    csrf = csrf_from(workspace.text)
    created = client.post(
        "/illustrations",
        data={
            "condition_id": CONDITION.findall(workspace.text)[0],
            "style": "flat_vector",
            "language": "en",
            "csrf_token": csrf,
        },
    )
    assert created.status_code == 303, created.text
    job_id = created.headers["location"].rsplit("/", 1)[1]
    assert wait_for_job(client, job_id)["status"] == "succeeded"
    return job_id, csrf


def approve(client: httpx.Client, job_id: str, csrf: str) -> httpx.Response:
    form = {
        "caption": "A picture about your health.",
        "alt_text": "Drawing for the test.",
        "csrf_token": csrf,
    }
    return client.post(f"/review/{job_id}/approve", data=form)


def written_set(ehr: SandboxEHR, job_id: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The one DocumentReference for this picture and the Provenances that target it."""
    bundle = fhir_get(
        ehr, "DocumentReference", {"identifier": f"{IDENTIFIER_SYSTEM}|{artifact_identifier(job_id)}"}
    )
    documents = [entry["resource"] for entry in bundle.get("entry", [])]
    assert len(documents) == 1, f"expected exactly one DocumentReference, found {len(documents)}"
    provenances = fhir_get(ehr, "Provenance", {"target": f"DocumentReference/{documents[0]['id']}"})
    return documents[0], [entry["resource"] for entry in provenances.get("entry", [])]


def content_types(document: dict[str, Any]) -> list[str]:
    return [content["attachment"]["contentType"] for content in document["content"]]


def bytes_of(ehr: SandboxEHR, attachment: dict[str, Any]) -> bytes:
    if "data" in attachment:
        return base64.b64decode(attachment["data"])
    binary = fhir_get(ehr, attachment["url"])
    assert binary["securityContext"] == {"reference": "Patient/pat-1"}
    return base64.b64decode(binary["data"])


def writes(ehr: SandboxEHR) -> list[tuple[str, str, int]]:
    return [(r["method"], r["path"], r["status"]) for r in ehr.fhir.requests() if r["method"] != "GET"]


@pytest.mark.parametrize(
    ("profile", "variant", "expected_types", "transaction"),
    [
        ("generic", "silent", ["application/pdf", "image/png"], True),
        ("no-transactions", "silent", ["application/pdf", "image/png"], False),
        ("pdf-only", "no-images", ["application/pdf"], True),
        # The registration says nothing; the CapabilityStatement's accepted types narrow the policy.
        ("pdf-only", "silent", ["application/pdf"], True),
    ],
)
def test_each_profile_gets_what_it_accepts_exactly_once(
    ehr: SandboxEHR,
    apps: dict[str, RunningApp],
    profile: str,
    variant: str,
    expected_types: list[str],
    transaction: bool,
) -> None:
    ehr.fhir.set_profile(profile)
    with launch_session(apps[variant].url, ehr) as client:
        job_id, csrf = make_picture(client)
        saved = approve(client, job_id, csrf)
        assert saved.status_code == 200, saved.text
        assert 'data-testid="written"' in saved.text
        assert ("handout and picture were" in saved.text) == ("image/png" in expected_types)
        document, provenances = written_set(ehr, job_id)
    assert content_types(document) == expected_types
    assert len(provenances) == 1
    for attachment in (content["attachment"] for content in document["content"]):
        data = bytes_of(ehr, attachment)
        assert attachment["size"] == len(data)
        assert attachment["hash"] == base64.b64encode(hashlib.sha1(data).digest()).decode()  # noqa: S324
    posted = writes(ehr)
    assert all(status < 300 for _, _, status in posted), posted  # nothing was refused on the way
    bundle_posts = [w for w in posted if w[1].rstrip("/").endswith("/fhir")]
    assert bool(bundle_posts) == transaction, posted
    if not transaction:
        assert [path.rsplit("/", 1)[1] for _, path, _ in posted] == [
            "Device",
            "DocumentReference",
            "Provenance",
        ]


def test_small_inline_server_gets_binaries(ehr: SandboxEHR, apps: dict[str, RunningApp]) -> None:
    """The CapabilityStatement's inline limit sends the large attachments as Binaries, with no refusal."""
    ehr.fhir.set_profile("small-inline")
    with launch_session(apps["big-images"].url, ehr) as client:
        job_id, csrf = make_picture(client)
        saved = approve(client, job_id, csrf)
        assert saved.status_code == 200, saved.text
        assert "uploaded separately" not in saved.text
        document, provenances = written_set(ehr, job_id)
    assert len(provenances) == 1
    assert content_types(document) == ["application/pdf", "image/png"]
    for content in document["content"]:
        attachment = content["attachment"]
        assert attachment["size"] > INLINE_LIMIT
        assert "data" not in attachment
        assert attachment["url"].startswith("Binary/")
        data = bytes_of(ehr, attachment)
        assert attachment["hash"] == base64.b64encode(hashlib.sha1(data).digest()).decode()  # noqa: S324
    posted = writes(ehr)
    assert all(status < 300 for _, _, status in posted), posted
    assert sum(path.endswith("/Binary") for _, path, _ in posted) == 0, "Binaries go inside the transaction"


def test_binaries_without_the_binary_scope_get_a_clear_page_and_nothing_is_sent(
    ehr: SandboxEHR, apps: dict[str, RunningApp]
) -> None:
    ehr.fhir.set_profile("small-inline")
    with launch_session(apps["big-images-no-binary-scope"].url, ehr) as client:
        job_id, csrf = make_picture(client)
        refused = approve(client, job_id, csrf)
        assert refused.status_code == 502
        assert "patient/Binary.c" in refused.text
    assert writes(ehr) == []
    found = fhir_get(
        ehr, "DocumentReference", {"identifier": f"{IDENTIFIER_SYSTEM}|{artifact_identifier(job_id)}"}
    )
    assert found.get("entry", []) == []


def test_registration_that_insists_on_images_falls_back_to_pdf_and_says_so(
    ehr: SandboxEHR, apps: dict[str, RunningApp]
) -> None:
    """The registration wins over the CapabilityStatement; the server's 400 then narrows it, once."""
    ehr.fhir.set_profile("pdf-only")
    with launch_session(apps["insists"].url, ehr) as client:
        job_id, csrf = make_picture(client)
        saved = approve(client, job_id, csrf)
        assert saved.status_code == 200, saved.text
        assert 'data-testid="write-note"' in saved.text
        assert "does not take image files" in saved.text
        assert "image/png is not accepted" in saved.text  # the EHR's own OperationOutcome text
        document, provenances = written_set(ehr, job_id)
        again = approve(client, job_id, csrf)
        assert "already saved" in again.text
        assert "does not take image files" in again.text
    assert content_types(document) == ["application/pdf"]
    assert len(provenances) == 1
    statuses = [status for _, _, status in writes(ehr)]
    assert statuses.count(400) == 1, writes(ehr)


def test_registration_inline_limit_above_the_servers_falls_back_to_binaries(
    ehr: SandboxEHR, apps: dict[str, RunningApp]
) -> None:
    ehr.fhir.set_profile("small-inline")
    with launch_session(apps["insists"].url, ehr) as client:
        job_id, csrf = make_picture(client)
        saved = approve(client, job_id, csrf)
        assert saved.status_code == 200, saved.text
        assert "uploaded separately" in saved.text
        document, provenances = written_set(ehr, job_id)
    assert len(provenances) == 1
    assert all(content["attachment"]["url"].startswith("Binary/") for content in document["content"])
    posted = writes(ehr)
    assert [status for _, _, status in posted].count(413) == 1, posted


def test_commit_then_503_leaves_one_document_and_one_provenance(
    ehr: SandboxEHR, apps: dict[str, RunningApp]
) -> None:
    with launch_session(apps["silent"].url, ehr) as client:
        job_id, csrf = make_picture(client)
        ehr.fhir.set_profile("commit-then-503")
        saved = approve(client, job_id, csrf)
        assert saved.status_code in (200, 503), saved.text
        if saved.status_code == 503:
            assert "try again" in saved.text
            saved = approve(client, job_id, csrf)
        assert saved.status_code == 200, saved.text
        document, provenances = written_set(ehr, job_id)
    assert len(provenances) == 1
    assert 503 in [status for _, _, status in writes(ehr)], "the server did answer 503 once"
    assert document["id"] in saved.text


def test_two_approvals_at_once_write_one_document(ehr: SandboxEHR, apps: dict[str, RunningApp]) -> None:
    ehr.fhir.set_profile("no-transactions")  # the slower path: four requests in a row
    app = apps["silent"]
    with launch_session(app.url, ehr) as client:
        job_id, csrf = make_picture(client)
        answers: list[httpx.Response] = []
        barrier = threading.Barrier(2)

        def post() -> None:
            with httpx.Client(base_url=app.url, cookies=client.cookies, timeout=90) as other:
                barrier.wait()
                answers.append(approve(other, job_id, csrf))

        threads = [threading.Thread(target=post) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        document, provenances = written_set(ehr, job_id)
    assert [answer.status_code for answer in answers] == [200, 200], [a.text[:300] for a in answers]
    assert sum("already saved" in answer.text for answer in answers) == 1
    assert all(document["id"] in answer.text for answer in answers)
    assert len(provenances) == 1
    creates = [path for method, path, _ in writes(ehr) if method == "POST"]
    assert sum(path.endswith("/DocumentReference") for path in creates) == 1


class RefusingTransport(httpx.AsyncBaseTransport):
    """Passes everything to the real server, except DocumentReference writes while `refuse` is set.

    A business-rule refusal (422 with an OperationOutcome) is something the sandbox cannot be made to say.
    """

    def __init__(self) -> None:
        self.refuse = True
        self._real = httpx.AsyncHTTPTransport()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path.rstrip("/")
        if (
            self.refuse
            and request.method == "POST"
            and (path.endswith("/fhir") or "DocumentReference" in path)
        ):
            outcome = {
                "resourceType": "OperationOutcome",
                "issue": [
                    {
                        "severity": "error",
                        "code": "business-rule",
                        "diagnostics": "Education notes are closed for this encounter (rule EN-7)",
                    }
                ],
            }
            return httpx.Response(
                422, content=json.dumps(outcome).encode(), headers={"Content-Type": "application/fhir+json"}
            )
        return await self._real.handle_async_request(request)

    async def aclose(self) -> None:
        """Each FhirClient closes its transport when done; this one is shared, so it stays open."""

    async def close_for_good(self) -> None:
        await self._real.aclose()


def test_refusal_shows_the_ehrs_text_keeps_the_draft_and_retry_works(
    ehr: SandboxEHR, apps: dict[str, RunningApp]
) -> None:
    app = apps["silent"]
    transport = RefusingTransport()
    app.services.fhir_transport = transport
    try:
        with launch_session(app.url, ehr) as client:
            job_id, csrf = make_picture(client)
            refused = approve(client, job_id, csrf)
            assert refused.status_code == 502
            assert "Education notes are closed for this encounter (rule EN-7)" in refused.text
            assert "try again" in refused.text
            found = fhir_get(
                ehr, "DocumentReference", {"identifier": f"{IDENTIFIER_SYSTEM}|{artifact_identifier(job_id)}"}
            )
            assert found.get("entry", []) == []
            assert fhir_get(ehr, "Provenance").get("total") == 0
            review = client.get(f"/review/{job_id}")
            assert review.status_code == 200
            assert "already saved" not in review.text
            transport.refuse = False
            saved = approve(client, job_id, csrf)
            assert saved.status_code == 200, saved.text
            _, provenances = written_set(ehr, job_id)
            assert len(provenances) == 1
    finally:
        app.services.fhir_transport = None
        app.call(transport.close_for_good())


def test_handout_paper_size_follows_the_registration(ehr: SandboxEHR, apps: dict[str, RunningApp]) -> None:
    """A hospital that prints on A4 gets A4 handouts; the default is US Letter."""
    sizes = {}
    for name in ("silent", "a4"):
        with launch_session(apps[name].url, ehr) as client:
            job_id, csrf = make_picture(client)
            assert approve(client, job_id, csrf).status_code == 200
        document, _ = written_set(ehr, job_id)
        pdf = PdfReader(io.BytesIO(base64.b64decode(document["content"][0]["attachment"]["data"])))
        box = pdf.pages[0].mediabox
        sizes[name] = (round(float(box.width)), round(float(box.height)))
    assert sizes == {"silent": (612, 792), "a4": (595, 842)}
