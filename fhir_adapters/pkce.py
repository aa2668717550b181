"""PKCE (RFC 7636, S256 only) and the random values of an authorization request."""

from __future__ import annotations

import base64
import hashlib
import secrets


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def new_code_verifier() -> str:
    """A 43-character verifier from 256 random bits (RFC 7636 §4.1)."""
    return _b64url(secrets.token_bytes(32))


def code_challenge_s256(code_verifier: str) -> str:
    """BASE64URL(SHA256(ASCII(code_verifier))) without padding (RFC 7636 §4.2)."""
    if not 43 <= len(code_verifier) <= 128:
        raise ValueError("code_verifier must be 43 to 128 characters long")
    return _b64url(hashlib.sha256(code_verifier.encode("ascii")).digest())


def new_state() -> str:
    """An unguessable state value: 256 random bits, URL-safe."""
    return _b64url(secrets.token_bytes(32))


def new_nonce() -> str:
    """An OpenID Connect nonce: 256 random bits, URL-safe."""
    return _b64url(secrets.token_bytes(32))
