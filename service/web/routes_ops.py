"""Operations endpoints: liveness, readiness (database commits, data dir writes, keys), Prometheus metrics."""

from __future__ import annotations

import structlog
from fastapi import APIRouter
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from service import metrics
from service.readiness import ReadinessProbe
from service.services import Services
from service.web.context import ServicesDep

log = structlog.get_logger("carecanvas.ops")

router = APIRouter()


@router.get("/healthz")
async def healthz() -> Response:
    return JSONResponse({"status": "ok"})


@router.get("/readyz")
async def readyz(services: ServicesDep) -> Response:
    """Ready while the database commits, the data directory takes writes and the keys encrypt."""
    readiness = await readiness_probe(services).check()
    body = readiness.body()
    try:
        services.keyring.encrypt(b"ready", aad=b"readyz")
    except Exception as error:  # readiness reports any key failure as not ready, without details
        body = {"status": "not ready", "reason": "keys", "checks": {"keys": type(error).__name__}}
    ready = body["status"] == "ready"
    metrics.READY.set(1 if ready else 0)
    _log_change(services, ready, body)
    return JSONResponse(body, status_code=200 if ready else 503)


def readiness_probe(services: Services) -> ReadinessProbe:
    """This process's probe (one per app, so its cache and lock are shared by every request)."""
    probe = services.extras.get("readiness_probe")
    if not isinstance(probe, ReadinessProbe):
        probe = ReadinessProbe(
            sessionmaker=services.sessionmaker,
            data_dir=services.settings.data_dir,
            cache_seconds=services.settings.readiness_cache_seconds,
            timeout_seconds=services.settings.readiness_timeout_seconds,
        )
        services.extras["readiness_probe"] = probe
    return probe


def _log_change(services: Services, ready: bool, body: dict[str, object]) -> None:
    # One line when readiness changes, not one per probe.
    if services.extras.get("readiness_last") is not ready:
        services.extras["readiness_last"] = ready
        if ready:
            log.info("ready")
        else:
            log.warning("not ready", reason=body.get("reason"), checks=body.get("checks"))


@router.get("/metrics")
async def metrics_page(services: ServicesDep) -> Response:
    try:
        snapshot: metrics.DatabaseSnapshot | None = await metrics.read_snapshot(services.sessionmaker)
    except Exception as error:  # the process metrics still answer; database_up says the rest is missing
        log.warning("metrics: database gauges unavailable", error_type=type(error).__name__)
        snapshot = None
    return PlainTextResponse(metrics.exposition(snapshot), media_type=CONTENT_TYPE_LATEST)
