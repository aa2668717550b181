"""Operations endpoints: liveness, readiness (database and keys), Prometheus metrics."""

from __future__ import annotations

import structlog
from fastapi import APIRouter
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from sqlalchemy import text

from service import metrics
from service.web.context import ServicesDep

log = structlog.get_logger("carecanvas.ops")

router = APIRouter()


@router.get("/healthz")
async def healthz() -> Response:
    return JSONResponse({"status": "ok"})


@router.get("/readyz")
async def readyz(services: ServicesDep) -> Response:
    try:
        async with services.engine.connect() as connection:
            await connection.execute(text("SELECT 1"))
        services.keyring.encrypt(b"ready", aad=b"readyz")
    except Exception as error:  # readiness reports any failure as not ready, without details
        metrics.READY.set(0)
        return JSONResponse({"status": "not ready", "reason": type(error).__name__}, status_code=503)
    metrics.READY.set(1)
    return JSONResponse({"status": "ready"})


@router.get("/metrics")
async def metrics_page(services: ServicesDep) -> Response:
    try:
        snapshot: metrics.DatabaseSnapshot | None = await metrics.read_snapshot(services.sessionmaker)
    except Exception as error:  # the process metrics still answer; database_up says the rest is missing
        log.warning("metrics: database gauges unavailable", error_type=type(error).__name__)
        snapshot = None
    return PlainTextResponse(metrics.exposition(snapshot), media_type=CONTENT_TYPE_LATEST)
