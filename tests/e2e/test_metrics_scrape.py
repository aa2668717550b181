"""After a real launch, generation and approval: the metrics moved; log lines name request, job and EHR."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import structlog
import structlog.testing
from harness import RunningApp, approve_picture, generate_picture, launch_session
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


@dataclass
class Run:
    before: dict[tuple[str, tuple[tuple[str, str], ...]], float]
    after: dict[tuple[str, tuple[tuple[str, str], ...]], float]
    logs: list[dict[str, Any]]
    job_id: str


@pytest.fixture(scope="module")
def run(sandbox: SandboxEHR, carecanvas: RunningApp) -> Run:
    """One clinician run, every structlog line of the app captured (contextvars merged as in production)."""
    assert httpx.get(f"{carecanvas.url}/readyz", timeout=30).status_code == 200
    before = scrape(carecanvas.url)
    with (
        structlog.testing.capture_logs(processors=[structlog.contextvars.merge_contextvars]) as logs,
        launch_session(carecanvas.url, sandbox) as client,
    ):
        job_id, csrf = generate_picture(client)
        approve_picture(client, job_id, csrf, caption="A picture about your health.", alt_text="Drawing.")
    return Run(before=before, after=scrape(carecanvas.url), logs=list(logs), job_id=job_id)


def test_metrics_move_after_an_end_to_end_run(run: Run) -> None:
    before, after = run.before, run.after

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
    # (other tests in this process register EHRs of their own: any registration name may appear)
    assert "sandbox" in ehr_values
    assert all(
        re.fullmatch(r"[a-z][a-z0-9-]*", value) and not value.startswith("pat-") for value in ehr_values
    )


def test_log_lines_carry_request_job_and_ehr(run: Run) -> None:
    fhir_lines = [line for line in run.logs if line.get("event") == "fhir.request"]
    assert fhir_lines, "no FHIR request was logged"
    request_lines = [line for line in fhir_lines if "request_id" in line]
    # Every FHIR call made while handling a request names that request and the session's EHR ...
    assert request_lines
    assert all(line.get("ehr") == "sandbox" for line in request_lines), request_lines[:3]
    # ... and the write-back's calls (POST /review/{job_id}/approve) name the job too.
    posts = [line for line in request_lines if line.get("method") == "POST"]
    assert posts
    assert all(line.get("job_id") == run.job_id for line in posts)
    # One request's lines share one id; different requests have different ids.
    assert len({line["request_id"] for line in request_lines}) >= 2
