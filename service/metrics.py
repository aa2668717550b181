"""Prometheus metrics: in-process counters and histograms, and queue/audit gauges read from the database.

Each process exports its own registry (the API on /metrics, a `carecanvas worker` on its metrics port), so no
multiprocess mode is needed. What every process would disagree on (queue depth, oldest queued job, the audit
chain head) is read from the database when /metrics is scraped, not counted in memory: it is right after a
restart and the same on every API replica (alerts take max() over replicas).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import httpx
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from service.db.models import AuditRecord, Job
from service.http_gate import GatedTransport

_LATENCY_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_GENERATION_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
# The window for "recently quarantined/failed" gauges: long enough for a 30 s scrape to never miss one.
RECENT_WINDOW = timedelta(hours=1)

FHIR_REQUESTS = Counter(
    "carecanvas_fhir_requests_total",
    "HTTP requests to an EHR's FHIR server, by EHR, method and outcome (2xx..5xx, timeout, error).",
    ["ehr", "method", "outcome"],
)
FHIR_SECONDS = Histogram(
    "carecanvas_fhir_request_duration_seconds",
    "Time to the response headers of a FHIR request (or to its failure), by EHR and method.",
    ["ehr", "method"],
    buckets=_LATENCY_BUCKETS,
)
WRITEBACKS = Counter(
    "carecanvas_writeback_total",
    "Approved pictures written to the chart (outcome written) or refused/failed (outcome failed), by EHR.",
    ["ehr", "outcome"],
)
BATCH_SIZE = Histogram(
    "carecanvas_worker_batch_size",
    "Jobs per pipeline call in this worker.",
    buckets=(1, 2, 4, 8, 16, 32, 64),
)
GENERATION_SECONDS = Histogram(
    "carecanvas_generation_duration_seconds",
    "Wall time of one pipeline call (a whole batch), by model.",
    ["model"],
    buckets=_GENERATION_BUCKETS,
)
IMAGES_STORED = Counter(
    "carecanvas_worker_images_total",
    "Images this worker generated and stored as a job's result.",
)
CHECKPOINT_FAILURES = Counter(
    "carecanvas_audit_checkpoint_failures_total",
    "Rounds in which the signed audit checkpoint could not be written.",
)
CHECKPOINT_SUCCESS = Gauge(
    "carecanvas_audit_checkpoint_last_success_timestamp_seconds",
    "When this process last knew the audit chain head to be covered by a signed checkpoint (Unix time).",
)
READY = Gauge(
    "carecanvas_ready",
    "1 when this API process answers /readyz with ready, else 0 (set by each /readyz probe).",
)


def fhir_outcome(status: int) -> str:
    return f"{status // 100}xx"


def record_writeback(ehr: str, *, written: bool) -> None:
    WRITEBACKS.labels(ehr=ehr, outcome="written" if written else "failed").inc()


def record_checkpoint_round(*, ok: bool) -> None:
    """One checkpoint round: the head is covered (ok), or the write failed."""
    if ok:
        CHECKPOINT_SUCCESS.set_to_current_time()
    else:
        CHECKPOINT_FAILURES.inc()


class MeteredTransport(httpx.AsyncBaseTransport):
    """Wraps an EHR's connection pool: every request counted and timed by EHR, whatever its outcome.

    At the transport, not in FhirClient, so retries count as the requests they are and fhir_adapters stays
    free of service code. Labels are bounded: the EHR's registered name, the method and an outcome class.
    """

    def __init__(self, inner: httpx.AsyncBaseTransport, *, ehr: str) -> None:
        self._inner = inner
        self._ehr = ehr

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        started = time.perf_counter()
        outcome = "error"
        try:
            response = await self._inner.handle_async_request(request)
        except (httpx.TimeoutException, TimeoutError, asyncio.CancelledError):
            # The caller's deadline cancels the request mid-flight: that is a timeout too.
            outcome = "timeout"
            raise
        else:
            outcome = fhir_outcome(response.status_code)
            return response
        finally:
            FHIR_SECONDS.labels(ehr=self._ehr, method=request.method).observe(time.perf_counter() - started)
            FHIR_REQUESTS.labels(ehr=self._ehr, method=request.method, outcome=outcome).inc()

    async def aclose(self) -> None:
        await self._inner.aclose()


def metered_fhir_transport(
    ehr: str, *, max_connections: int, verify: bool = True
) -> httpx.AsyncBaseTransport:
    """The pool's own transport (limits and TLS verification live there once a transport is given).

    Requests beyond the pool's size wait at the gate (service.http_gate), not in httpcore's pool.
    """
    inner = httpx.AsyncHTTPTransport(
        verify=verify,
        limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
        trust_env=False,
    )
    return MeteredTransport(GatedTransport(inner, max_in_flight=max_connections), ehr=ehr)


@dataclass(frozen=True)
class BucketQueue:
    bucket: str
    queued: int
    oldest_queued_seconds: float
    running: int


@dataclass(frozen=True)
class DatabaseSnapshot:
    """What the database says at scrape time."""

    buckets: list[BucketQueue] = field(default_factory=list)
    quarantined_recent: int = 0
    failed_recent: int = 0
    audit_head_seq: int = 0
    audit_head_age_seconds: float = 0.0


async def read_snapshot(
    sessionmaker: async_sessionmaker[AsyncSession], *, now: datetime | None = None
) -> DatabaseSnapshot:
    """Queue depth, oldest queued age and running jobs by bucket; recent quarantines; the audit head."""
    now = now or datetime.now(UTC)
    since = now - RECENT_WINDOW
    queued = (
        select(Job.bucket, func.count(), func.min(Job.created_at))
        .where(Job.status == "queued")
        .group_by(Job.bucket)
    )
    running = select(Job.bucket, func.count()).where(Job.status == "running").group_by(Job.bucket)
    recent = (
        select(Job.status, func.count())
        .where(Job.status.in_(("quarantined", "failed")), Job.finished_at >= since)
        .group_by(Job.status)
    )
    head = select(AuditRecord.seq, AuditRecord.recorded_at).order_by(AuditRecord.seq.desc()).limit(1)
    async with sessionmaker() as session, session.begin():
        queued_rows = (await session.execute(queued)).all()
        running_rows = {row[0]: row[1] for row in (await session.execute(running)).all()}
        recent_rows = {row[0]: row[1] for row in (await session.execute(recent)).all()}
        head_row = (await session.execute(head)).first()
    buckets: dict[str, BucketQueue] = {}
    for bucket, count, oldest in queued_rows:
        oldest_at = _aware(oldest) if oldest is not None else now
        buckets[bucket] = BucketQueue(
            bucket=bucket,
            queued=int(count),
            oldest_queued_seconds=max(0.0, (now - oldest_at).total_seconds()),
            running=int(running_rows.get(bucket, 0)),
        )
    for bucket, count in running_rows.items():
        buckets.setdefault(bucket, BucketQueue(bucket, 0, 0.0, int(count)))
    return DatabaseSnapshot(
        buckets=sorted(buckets.values(), key=lambda b: b.bucket),
        quarantined_recent=int(recent_rows.get("quarantined", 0)),
        failed_recent=int(recent_rows.get("failed", 0)),
        audit_head_seq=int(head_row.seq) if head_row else 0,
        audit_head_age_seconds=max(0.0, (now - _aware(head_row.recorded_at)).total_seconds())
        if head_row
        else 0.0,
    )


def _aware(value: datetime) -> datetime:
    # SQLite hands back naive UTC for aggregates (the column type's converter does not run on min()).
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


class SnapshotCollector(Collector):
    """Exposes one DatabaseSnapshot as gauges (a fresh collector per scrape: no stale label sets)."""

    def __init__(self, snapshot: DatabaseSnapshot) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        snapshot = self._snapshot
        depth = GaugeMetricFamily(
            "carecanvas_queue_depth",
            "Queued jobs waiting for a worker, by batching bucket.",
            labels=["bucket"],
        )
        age = GaugeMetricFamily(
            "carecanvas_queue_oldest_age_seconds",
            "Age of the oldest queued job, by batching bucket.",
            labels=["bucket"],
        )
        running = GaugeMetricFamily(
            "carecanvas_jobs_running", "Jobs a worker holds under a lease, by bucket.", labels=["bucket"]
        )
        for bucket in snapshot.buckets:
            depth.add_metric([bucket.bucket], bucket.queued)
            age.add_metric([bucket.bucket], bucket.oldest_queued_seconds)
            running.add_metric([bucket.bucket], bucket.running)
        yield from (depth, age, running)
        yield GaugeMetricFamily(
            "carecanvas_queue_depth_total", "Queued jobs in every bucket.", value=_total(snapshot.buckets)
        )
        yield GaugeMetricFamily(
            "carecanvas_jobs_quarantined_recent",
            "Jobs quarantined (attempts used up) in the last hour.",
            value=snapshot.quarantined_recent,
        )
        yield GaugeMetricFamily(
            "carecanvas_jobs_failed_recent", "Jobs failed in the last hour.", value=snapshot.failed_recent
        )
        yield GaugeMetricFamily(
            "carecanvas_audit_chain_head_seq",
            "Sequence number of the newest audit record.",
            value=snapshot.audit_head_seq,
        )
        yield GaugeMetricFamily(
            "carecanvas_audit_chain_head_age_seconds",
            "Age of the newest audit record.",
            value=snapshot.audit_head_age_seconds,
        )


def _total(buckets: Iterable[BucketQueue]) -> int:
    return sum(bucket.queued for bucket in buckets)


class _DatabaseUp(Collector):
    def __init__(self, up: bool) -> None:
        self._up = up

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "carecanvas_metrics_database_up",
            "1 when this scrape could read the queue and audit gauges from the database.",
            value=1 if self._up else 0,
        )


def exposition(snapshot: DatabaseSnapshot | None) -> bytes:
    """The process registry, plus the database gauges (absent, with database_up 0, when unreadable)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_DatabaseUp(snapshot is not None))
    if snapshot is not None:
        registry.register(SnapshotCollector(snapshot))
    return generate_latest(REGISTRY) + generate_latest(registry)
