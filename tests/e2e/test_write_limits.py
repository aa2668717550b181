"""Write-back within an EHR's body limit, against the sandbox's front-proxy profiles over HTTP; and the page a
broken `next` link gets."""

from __future__ import annotations

import base64
import contextlib
import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from harness import CONDITION, RunningApp, csrf_from, free_port, launch_session, running_app, wait_for_job
from structlog.testing import capture_logs

from sandbox.run import SandboxEHR
from service.cli import demo_settings
from service.ehrs import origin_of
from service.settings import EhrSettings
from service.workflows.approve import IDENTIFIER_SYSTEM, artifact_identifier

pytestmark = pytest.mark.slow

# 224x224 noise: a ~150 kB PNG and a ~160 kB handout, so one transaction is ~380-430 kB of JSON. That band
# holds none of the common proxy limits the service guesses from (256 KiB below it, 500 kB above), so the
# first refusal always teaches 256 KiB. (At 256x256 the transaction straddled 500 kB and 512 KiB: a first
# picture refused at 530 kB taught 512 KiB, and a second one of 480 kB was refused once more.)
IMAGE_SIZE = 224
# The registration allows more than the proxy does, so only the proxy's refusals can teach the limit. (A
# registration that knows the limit sends Binaries first with no refusal: tests/fhir_adapters.)
VARIANTS: dict[str, dict[str, Any]] = {"roomy": {"max_request_bytes": 5_000_000}}


@pytest.fixture(scope="module")
def ports() -> dict[str, int]:
    return {name: free_port() for name in VARIANTS}


@pytest.fixture(scope="module")
def ehr(ports: dict[str, int]) -> Iterator[SandboxEHR]:
    with SandboxEHR(
        redirect_uris=[f"http://127.0.0.1:{port}/callback" for port in ports.values()]
    ) as sandbox:
        yield sandbox


@pytest.fixture(scope="module")
def apps(
    ehr: SandboxEHR, ports: dict[str, int], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, RunningApp]]:
    with contextlib.ExitStack() as stack:
        started = {}
        for name, overrides in VARIANTS.items():
            settings = demo_settings(
                data_dir=Path(tmp_path_factory.mktemp(f"limits-{name}")),
                fhir_base=ehr.fhir_base,
                auth_base=ehr.auth_base,
                ehr_origin=origin_of(ehr.ehr_url),
                port=ports[name],
            )
            settings.image_size = IMAGE_SIZE
            settings.capabilities_max_age_seconds = 0
            base = settings.ehrs[0].model_dump(exclude_unset=True)
            settings.ehrs = [EhrSettings(**{**base, **overrides})]
            started[name] = stack.enter_context(running_app(settings, port=ports[name]))
        yield started


@pytest.fixture(autouse=True)
def fresh_server(ehr: SandboxEHR, apps: dict[str, RunningApp]) -> Iterator[None]:
    ehr.fhir.set_profile("generic")
    ehr.fhir.reset()
    for app in apps.values():
        app.services.profiles.forget_request_limits()
    yield
    ehr.fhir.set_profile("generic")


def fhir_get(ehr: SandboxEHR, path: str, params: dict[str, str] | None = None) -> dict[str, Any]:
    response = httpx.get(
        f"{ehr.fhir_base}/{path}",
        params=params,
        headers={"Authorization": f"Bearer {ehr.mint_token()}"},
        timeout=30,
    )
    response.raise_for_status()
    return response.json()  # type: ignore[no-any-return]


def make_picture(client: httpx.Client) -> tuple[str, str]:
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


def documents_for(ehr: SandboxEHR, job_id: str) -> list[dict[str, Any]]:
    query = {"identifier": f"{IDENTIFIER_SYSTEM}|{artifact_identifier(job_id)}"}
    return [entry["resource"] for entry in fhir_get(ehr, "DocumentReference", query).get("entry", [])]


def writes(ehr: SandboxEHR) -> list[tuple[str, str, int]]:
    return [(r["method"], r["path"], r["status"]) for r in ehr.fhir.requests() if r["method"] != "GET"]


def check_written_once(ehr: SandboxEHR, job_id: str) -> dict[str, Any]:
    (document,) = documents_for(ehr, job_id)
    provenances = fhir_get(ehr, "Provenance", {"target": f"DocumentReference/{document['id']}"})
    assert len(provenances.get("entry", [])) == 1
    for content in document["content"]:
        attachment = content["attachment"]
        if "data" in attachment:
            data = base64.b64decode(attachment["data"])
        else:
            data = base64.b64decode(fhir_get(ehr, attachment["url"])["data"])
        assert attachment["size"] == len(data)
        assert attachment["hash"] == base64.b64encode(hashlib.sha1(data).digest()).decode()  # noqa: S324
    return document


def test_a_proxys_413_moves_the_attachments_into_binaries_first_and_is_remembered(
    ehr: SandboxEHR, apps: dict[str, RunningApp]
) -> None:
    ehr.fhir.set_profile("body-limit", max_body_bytes=350_000)
    with launch_session(apps["roomy"].url, ehr) as client:
        job_id, csrf = make_picture(client)
        with capture_logs() as logs:
            saved = approve(client, job_id, csrf)
        assert saved.status_code == 200, (writes(ehr), [e for e in logs if e["log_level"] == "warning"])
        assert 'data-testid="written"' in saved.text
        document = check_written_once(ehr, job_id)
        assert [c["attachment"]["contentType"] for c in document["content"]] == [
            "application/pdf",
            "image/png",
        ]
        posted = writes(ehr)
        assert [status for _, _, status in posted].count(413) == 1, posted
        # After the refusal: the largest attachment alone first, then a transaction that fits.
        after = posted[[status for _, _, status in posted].index(413) + 1 :]
        assert [path.rsplit("/", 1)[-1] for _, path, _ in after] == ["Binary", "fhir"], posted
        assert document["content"][0]["attachment"]["url"].startswith("Binary/")
        warnings = [entry for entry in logs if entry["log_level"] == "warning"]
        assert any(entry.get("ehr") == "sandbox" and entry.get("status") == 413 for entry in warnings), logs

        # The limit was learned: the next approval sends within it at once, with no refusal.
        ehr.fhir.reset()
        second_job, csrf = make_picture(client)
        assert approve(client, second_job, csrf).status_code == 200
        check_written_once(ehr, second_job)
        assert all(status < 300 for _, _, status in writes(ehr)), writes(ehr)


def test_too_large_even_apart_is_reported_as_too_large_not_try_again(
    ehr: SandboxEHR, apps: dict[str, RunningApp]
) -> None:
    """A proxy's bare 500 "request entity too large" is not a timeout; once the handout alone is too big
    the clinician hears that, and nothing is written."""
    ehr.fhir.set_profile("body-limit-500", max_body_bytes=150_000)
    with launch_session(apps["roomy"].url, ehr) as client:
        job_id, csrf = make_picture(client)
        refused = approve(client, job_id, csrf)
        assert refused.status_code == 502, refused.text
        assert "too big for this EHR" in refused.text
        assert "Trying again will not help" in refused.text
        assert "did not answer in time" not in refused.text
        assert "try again in a minute" not in refused.text
    assert documents_for(ehr, job_id) == []
    statuses = [status for _, _, status in writes(ehr)]
    # The transaction, then the handout's Binary alone: each refused once, never resent (it used to be 4x).
    assert statuses.count(500) == 2, writes(ehr)


def test_a_next_link_with_control_characters_gets_a_readable_error_page(
    ehr: SandboxEHR, apps: dict[str, RunningApp]
) -> None:
    with launch_session(apps["roomy"].url, ehr) as client:
        ehr.fhir.set_profile("broken-next-link")
        page = client.get("/app")
    # Before: httpx.InvalidURL escaped every error handler (a bare 500).
    assert page.status_code == 502, page.text[:500]
    assert "The EHR answered with an error" in page.text
    assert "text/html" in page.headers["content-type"]
