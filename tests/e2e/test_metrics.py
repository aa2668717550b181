"""/metrics after a real launch → generate → approve run: the application metrics exist and moved."""

from __future__ import annotations

import httpx
import pytest
from harness import CONDITION, RunningApp, csrf_from, launch_session, wait_for_job
from prometheus_client.parser import text_string_to_metric_families

from sandbox.run import SandboxEHR

pytestmark = pytest.mark.slow


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics as (name, sorted labels) → value."""
    response = httpx.get(f"{url}/metrics", timeout=30)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def total(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    """The sum of a metric's samples whose labels include ``labels``."""
    return sum(
        value
        for (sample_name, sample_labels), value in samples.items()
        if sample_name == name and set(labels.items()) <= set(sample_labels)
    )


def test_metrics_move_after_an_end_to_end_run(sandbox: SandboxEHR, carecanvas: RunningApp) -> None:
    assert httpx.get(f"{carecanvas.url}/readyz", timeout=30).status_code == 200
    before = scrape(carecanvas.url)
    with launch_session(carecanvas.url, sandbox) as client:
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
        assert created.status_code == 303, created.text
        job_id = created.headers["location"].rsplit("/", 1)[1]
        finished = wait_for_job(client, job_id)
        assert finished["status"] == "succeeded", finished
        form = {"caption": "A picture about your health.", "alt_text": "Drawing.", "csrf_token": csrf}
        assert client.post(f"/review/{job_id}/approve", data=form).status_code == 200
    after = scrape(carecanvas.url)

    def moved(name: str, **labels: str) -> float:
        return total(after, name, **labels) - total(before, name, **labels)

    # FHIR reads at launch and the write-back transaction, counted and timed by EHR.
    assert moved("carecanvas_fhir_requests_total", ehr="sandbox", outcome="2xx") >= 3
    assert moved("carecanvas_fhir_requests_total", ehr="sandbox", method="POST") >= 1
    assert moved("carecanvas_fhir_request_duration_seconds_count", ehr="sandbox") >= 3
    assert moved("carecanvas_writeback_total", ehr="sandbox", outcome="written") == 1
    # The embedded worker ran one pipeline call with this job in it and stored its image.
    assert moved("carecanvas_worker_batch_size_count") >= 1
    assert moved("carecanvas_generation_duration_seconds_count", model="carecanvas-tiny-test") >= 1
    assert moved("carecanvas_worker_images_total") >= 1
    # The audit chain grew; the gauges read from the database are there.
    assert moved("carecanvas_audit_chain_head_seq") >= 1
    assert total(after, "carecanvas_metrics_database_up") == 1
    assert ("carecanvas_queue_depth_total", ()) in after
    assert ("carecanvas_jobs_quarantined_recent", ()) in after
    assert total(after, "carecanvas_ready") == 1
    # No label carries patient data: the only EHR label values are registered EHR names.
    ehr_values = {dict(labels).get("ehr") for _, labels in after if dict(labels).get("ehr")}
    assert ehr_values <= {"sandbox"}
