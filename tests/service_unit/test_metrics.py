"""The database gauges of /metrics on SQLite and PostgreSQL, and the FHIR transport meter's outcomes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from service import metrics
from service.crypto import Keyring
from service.crypto.keyring import new_key_material
from service.jobs import JobQueue

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


def samples(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text.decode()):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


async def test_queue_gauges_follow_the_database(sessionmaker: async_sessionmaker[AsyncSession]) -> None:
    clock = {"now": NOW - timedelta(minutes=10)}
    queue = JobQueue(sessionmaker, Keyring(new_key_material()), max_attempts=1, clock=lambda: clock["now"])
    async with sessionmaker() as session, session.begin():
        for minutes_ago, bucket in ((10, "a"), (4, "a"), (2, "b"), (1, "b"), (1, "b")):
            clock["now"] = NOW - timedelta(minutes=minutes_ago)
            await queue.enqueue(session, kind="illustration", bucket=bucket, spec={}, session_id_hash=None)
    clock["now"] = NOW
    (claimed,) = await queue.claim_batch(worker_id="w", max_jobs=1, bucket="a")
    snapshot = await metrics.read_snapshot(sessionmaker, now=NOW)
    by_bucket = {b.bucket: b for b in snapshot.buckets}
    assert (by_bucket["a"].queued, by_bucket["a"].running) == (1, 1)
    assert by_bucket["a"].oldest_queued_seconds == pytest.approx(240)
    assert (by_bucket["b"].queued, by_bucket["b"].oldest_queued_seconds) == (3, pytest.approx(120))
    assert snapshot.quarantined_recent == 0

    # Its only attempt fails: quarantined, and the gauge of recent quarantines moves.
    assert await queue.fail(claimed.id, "w", "generation failed: RuntimeError") == "quarantined"
    snapshot = await metrics.read_snapshot(sessionmaker, now=NOW)
    assert snapshot.quarantined_recent == 1
    assert {b.bucket: b.running for b in snapshot.buckets} == {"a": 0, "b": 0}

    exported = samples(metrics.exposition(snapshot))
    assert exported[("carecanvas_queue_depth", (("bucket", "b"),))] == 3
    assert exported[("carecanvas_queue_oldest_age_seconds", (("bucket", "a"),))] == pytest.approx(240)
    assert exported[("carecanvas_queue_depth_total", ())] == 4
    assert exported[("carecanvas_jobs_quarantined_recent", ())] == 1
    assert exported[("carecanvas_metrics_database_up", ())] == 1


def test_without_a_database_the_process_metrics_still_answer() -> None:
    exported = samples(metrics.exposition(None))
    assert exported[("carecanvas_metrics_database_up", ())] == 0
    assert not any(name == "carecanvas_queue_depth_total" for name, _ in exported)


async def test_the_transport_meter_counts_statuses_errors_and_timeouts() -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/down":
            raise httpx.ConnectError("refused", request=request)
        if request.url.path == "/slow":
            raise httpx.ReadTimeout("slow", request=request)
        return httpx.Response(503 if request.url.path == "/busy" else 200)

    def count(outcome: str) -> float:
        value = metrics.FHIR_REQUESTS.labels(ehr="meter-test", method="GET", outcome=outcome)._value.get()
        return float(value)

    before = {outcome: count(outcome) for outcome in ("2xx", "5xx", "error", "timeout")}
    transport = metrics.MeteredTransport(httpx.MockTransport(answer), ehr="meter-test")
    async with httpx.AsyncClient(transport=transport, base_url="http://ehr.test") as client:
        assert (await client.get("/ok")).status_code == 200
        assert (await client.get("/busy")).status_code == 503
        with pytest.raises(httpx.ConnectError):
            await client.get("/down")
        with pytest.raises(httpx.ReadTimeout):
            await client.get("/slow")
    moved = {outcome: count(outcome) - before[outcome] for outcome in before}
    assert moved == {"2xx": 1, "5xx": 1, "error": 1, "timeout": 1}
