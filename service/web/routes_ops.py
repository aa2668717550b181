"""Operations endpoints: liveness, readiness (database and keys), Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

from service.web.context import ServicesDep

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
        return JSONResponse({"status": "not ready", "reason": type(error).__name__}, status_code=503)
    return JSONResponse({"status": "ready"})


@router.get("/metrics")
async def metrics() -> Response:
    return PlainTextResponse(generate_latest(), media_type=CONTENT_TYPE_LATEST)
