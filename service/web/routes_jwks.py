"""`/.well-known/jwks.json`: the public keys EHRs use to check our private_key_jwt client assertions."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from service.web.context import ServicesDep

router = APIRouter()

# EHRs fetch this document now and then and cache it; a short max-age lets a rotation reach them quickly.
JWKS_CACHE_SECONDS = 300


@router.get("/.well-known/jwks.json")
async def jwks(services: ServicesDep) -> Response:
    """Every registration's public keys (rotation: old and new are listed while both may be in use)."""
    return JSONResponse(
        services.ehrs.public_jwks(),
        media_type="application/jwk-set+json",
        headers={"Cache-Control": f"public, max-age={JWKS_CACHE_SECONDS}"},
    )
