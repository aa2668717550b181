"""Signing keys for the sandbox authorization server and helpers for clients that sign their own JWTs."""

from __future__ import annotations

import secrets
import time
import uuid
from collections.abc import Mapping
from typing import Any

from joserfc import jwt
from joserfc.jwk import ECKey, KeySet, RSAKey

# authlib.jose is deprecated (it warns on import, and warnings are errors in the tests); joserfc is the
# library authlib itself moved to, so every JWT here is made and checked with joserfc.

ServerKey = RSAKey
ClientKey = RSAKey | ECKey


def generate_signing_key(*, kid: str | None = None) -> RSAKey:
    """A fresh 2048-bit RSA key for RS256 access and id tokens."""
    key_id = kid or f"sandbox-{uuid.uuid4().hex[:12]}"
    return RSAKey.generate_key(2048, parameters={"kid": key_id, "use": "sig"})


def generate_client_key(*, alg: str = "RS384", kid: str | None = None) -> ClientKey:
    """A key pair for a confidential asymmetric (private_key_jwt) client: RS384 → RSA, ES384 → P-384."""
    key_id = kid or f"client-{uuid.uuid4().hex[:12]}"
    if alg == "RS384":
        return RSAKey.generate_key(2048, parameters={"kid": key_id, "alg": alg})
    if alg == "ES384":
        return ECKey.generate_key("P-384", parameters={"kid": key_id, "alg": alg})
    raise ValueError(f"unsupported client signing alg {alg!r}; allowed: RS384, ES384")


def public_jwks(*keys: RSAKey | ECKey) -> dict[str, Any]:
    """The public halves of the given keys as a JWKS document."""
    return {"keys": [key.as_dict(private=False) for key in keys]}


def key_set(jwks: Mapping[str, Any]) -> KeySet:
    """Import a JWKS document (public keys) for verification."""
    return KeySet.import_key_set(dict(jwks))  # type: ignore[arg-type]


def sign_jwt(claims: Mapping[str, Any], *, key: RSAKey | ECKey, alg: str) -> str:
    """Sign `claims` as a compact JWS with `alg`, naming the key's kid in the header."""
    header: dict[str, Any] = {"alg": alg}
    if key.kid:
        header["kid"] = key.kid
    return jwt.encode(header, dict(claims), key, algorithms=[alg])


def make_client_assertion(
    *,
    client_id: str,
    token_endpoint: str,
    key: ClientKey,
    alg: str = "RS384",
    lifetime_seconds: int = 240,
    jti: str | None = None,
) -> str:
    """A private_key_jwt client assertion (SMART Backend Services): iss = sub = client_id, aud = token URL."""
    now = int(time.time())
    claims = {
        "iss": client_id,
        "sub": client_id,
        "aud": token_endpoint,
        "exp": now + lifetime_seconds,
        "iat": now,
        "jti": jti or secrets.token_urlsafe(16),
    }
    return sign_jwt(claims, key=key, alg=alg)
