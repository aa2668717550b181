"""US Core whatever the configuration: custodian and onBehalfOf from the registration, else the clinician's
PractitionerRole, else a clear refusal; the written resources checked against the US Core rules."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from harness import CONDITION, RunningApp, csrf_from, free_port, launch_session, running_app, wait_for_job

from fhir_adapters import ResourceValidationError
from fhir_adapters.us_core import check_us_core, document_reference_problems, provenance_problems
from sandbox.run import SandboxEHR
from service.cli import demo_settings
from service.ehrs import EhrRegistry, origin_of
from service.settings import EhrSettings
from service.workflows.approve import IDENTIFIER_SYSTEM, artifact_identifier

EXAMPLES = Path(__file__).resolve().parents[2] / "docs" / "fhir-examples"
NO_ROLE_SCOPES = tuple(s for s in EhrSettings.model_fields["scopes"].default if "PractitionerRole" not in s)


def test_a_registration_with_no_organization_source_refuses_to_start() -> None:
    ehr = EhrSettings(name="clinic", iss="https://ehr.example/fhir", client_id="c", scopes=NO_ROLE_SCOPES)
    with pytest.raises(ValueError, match="set organization_id") as caught:
        EhrRegistry([ehr], redirect_uri="https://carecanvas.example/callback")
    assert "clinic" in str(caught.value)
    assert "PractitionerRole" in str(caught.value)
    # Either source is enough.
    EhrRegistry([ehr.model_copy(update={"organization_id": "org-1"})], redirect_uri="https://x.example/cb")
    EhrRegistry(
        [EhrSettings(name="c2", iss="https://e.example/fhir", client_id="c")], redirect_uri="https://x/cb"
    )


def test_provenance_1_and_the_document_rules() -> None:
    import json

    provenance = json.loads((EXAMPLES / "Provenance-ai-generated.json").read_text(encoding="utf-8"))
    assert provenance_problems(provenance) == []
    # What the builders wrote without organization_id: Device and Practitioner agents with no onBehalfOf.
    stripped = copy.deepcopy(provenance)
    for agent in stripped["agent"]:
        agent.pop("onBehalfOf", None)
    problems = provenance_problems(stripped)
    assert len(problems) == 2
    assert all("provenance-1" in problem for problem in problems)
    with pytest.raises(ResourceValidationError, match="provenance-1"):
        check_us_core(stripped)
    wrong = copy.deepcopy(provenance)
    wrong["agent"][0]["onBehalfOf"] = {"reference": "Practitioner/prac-1"}
    assert any("must reference an Organization" in p for p in provenance_problems(wrong))

    document = json.loads(
        (EXAMPLES / "DocumentReference-education-illustration.json").read_text(encoding="utf-8")
    )
    assert document_reference_problems(document) == []
    bare = copy.deepcopy(document)
    bare.pop("custodian")
    del bare["content"][0]["attachment"]["data"]
    bare["content"][0]["attachment"].pop("url", None)
    problems = document_reference_problems(bare)
    assert any("custodian" in problem for problem in problems)
    assert any("us-core-6" in problem for problem in problems)


@pytest.fixture(scope="module")
def from_role(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[SandboxEHR, RunningApp]]:
    """A registration without organization_id: the organization comes from the PractitionerRole."""
    port = free_port()
    with SandboxEHR(redirect_uris=[f"http://127.0.0.1:{port}/callback"]) as ehr:
        settings = demo_settings(
            data_dir=Path(tmp_path_factory.mktemp("us-core")),
            fhir_base=ehr.fhir_base,
            auth_base=ehr.auth_base,
            ehr_origin=origin_of(ehr.ehr_url),
            port=port,
        )
        base = settings.ehrs[0].model_dump(exclude_unset=True)
        settings.ehrs = [EhrSettings(**{**base, "organization_id": None})]
        with running_app(settings, port=port) as app:
            yield ehr, app


def fhir_get(ehr: SandboxEHR, path: str, params: dict[str, str] | None = None) -> dict[str, Any]:
    response = httpx.get(
        f"{ehr.fhir_base}/{path}",
        params=params,
        headers={"Authorization": f"Bearer {ehr.mint_token()}"},
        timeout=30,
    )
    response.raise_for_status()
    return response.json()  # type: ignore[no-any-return]


def picture_and_approval(client: httpx.Client) -> tuple[str, httpx.Response]:
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
    form = {
        "caption": "A picture about your health.",
        "alt_text": "Drawing for the test.",
        "csrf_token": csrf,
    }
    return job_id, client.post(f"/review/{job_id}/approve", data=form)


def documents_for(ehr: SandboxEHR, job_id: str) -> list[dict[str, Any]]:
    query = {"identifier": f"{IDENTIFIER_SYSTEM}|{artifact_identifier(job_id)}"}
    return [entry["resource"] for entry in fhir_get(ehr, "DocumentReference", query).get("entry", [])]


@pytest.mark.slow
def test_without_organization_id_the_practitioner_role_names_the_custodian(
    from_role: tuple[SandboxEHR, RunningApp],
) -> None:
    ehr, app = from_role
    ehr.fhir.reset()
    with launch_session(app.url, ehr, practitioner="prac-1") as client:
        job_id, saved = picture_and_approval(client)
        assert saved.status_code == 200, saved.text
    (document,) = documents_for(ehr, job_id)
    (provenance,) = [
        e["resource"]
        for e in fhir_get(ehr, "Provenance", {"target": f"DocumentReference/{document['id']}"})["entry"]
    ]
    # Read back from the server: what the EHR holds conforms, not only what we meant to send.
    assert document["custodian"] == {"reference": "Organization/org-1"}
    assert document_reference_problems(document) == []
    assert [agent["onBehalfOf"] for agent in provenance["agent"]] == [{"reference": "Organization/org-1"}] * 2
    assert provenance_problems(provenance) == []


@pytest.mark.slow
def test_without_any_organization_the_approval_is_refused_clearly_and_nothing_is_sent(
    from_role: tuple[SandboxEHR, RunningApp],
) -> None:
    ehr, app = from_role
    ehr.fhir.reset()
    with launch_session(app.url, ehr, practitioner="prac-3") as client:  # prac-3 has no PractitionerRole
        job_id, refused = picture_and_approval(client)
    assert refused.status_code == 409, refused.text
    assert "organization_id" in refused.text
    assert "Nothing was sent" in refused.text
    assert documents_for(ehr, job_id) == []
    assert not [r for r in ehr.fhir.requests() if r["method"] == "POST"]
