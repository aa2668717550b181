"""Cancelling a picture from the job page: CSRF-checked, owner-only, and the job ends cancelled."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import CONDITION, RunningApp, csrf_from, free_port, launch_session, running_app

from sandbox.run import SandboxEHR
from service.cli import demo_settings
from service.ehrs import origin_of


@pytest.fixture(scope="module")
def queued_only(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[SandboxEHR, RunningApp]]:
    """An app without a worker, so a job stays queued until the test decides what happens to it."""
    port = free_port()
    with SandboxEHR(redirect_uris=[f"http://127.0.0.1:{port}/callback"]) as ehr:
        settings = demo_settings(
            data_dir=Path(tmp_path_factory.mktemp("cancel")),
            fhir_base=ehr.fhir_base,
            auth_base=ehr.auth_base,
            ehr_origin=origin_of(ehr.ehr_url),
            port=port,
        )
        settings.embedded_worker = False
        with running_app(settings, port=port) as app:
            yield ehr, app


def test_a_queued_job_is_cancelled_from_its_page(queued_only: tuple[SandboxEHR, RunningApp]) -> None:
    ehr, app = queued_only
    with launch_session(app.url, ehr) as client:
        workspace = client.get("/app")
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
        job_id = created.headers["location"].rsplit("/", 1)[1]
        page = client.get(f"/jobs/{job_id}")
        assert 'id="cancel-form"' in page.text

        forged = client.post(f"/jobs/{job_id}/cancel", data={"csrf_token": "forged"})
        assert forged.status_code == 403
        assert client.get(f"/jobs/{job_id}/status").json()["status"] == "queued"

        cancelled = client.post(f"/jobs/{job_id}/cancel", data={"csrf_token": csrf})
        assert cancelled.status_code == 303
        assert client.get(f"/jobs/{job_id}/status").json()["status"] == "cancelled"
        assert 'id="cancel-form"' not in client.get(f"/jobs/{job_id}").text
        # Nothing to review or approve for a cancelled job.
        assert client.get(f"/artifacts/{job_id}/png").status_code == 404

    with launch_session(app.url, ehr, patient="pat-2", encounter="enc-2") as other:
        refused = other.post(f"/jobs/{job_id}/cancel", data={"csrf_token": csrf_from(other.get("/app").text)})
        assert refused.status_code == 404  # another session cannot even see the job
