"""The audit checkpoint signing key: an Ed25519 PEM file of its own, apart from the data keyring.

Only the signer needs the private key (``CARECANVAS_AUDIT_SIGNING_KEY_FILE``); an auditor verifies with the
public key alone (``CARECANVAS_AUDIT_VERIFY_KEY_FILE`` or ``carecanvas audit verify --public-key``).
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey


class SigningKeyError(Exception):
    """The audit signing or verification key is missing, unreadable or not an Ed25519 key."""


def generate_signing_key(path: Path) -> Ed25519PrivateKey:
    """Write a new Ed25519 private key (PKCS#8 PEM, mode 0600); an existing file is never overwritten.

    The key is written whole to a temporary file and then hard-linked into place, so a process that starts
    at the same moment sees either no file or the complete key, never half of one.
    """
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(pem)
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(temporary, path)
        except FileExistsError:
            raise SigningKeyError(f"{path} exists; refusing to overwrite the audit signing key") from None
    finally:
        temporary.unlink(missing_ok=True)
    return key


def public_key_pem(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()


def load_signing_key(path: Path) -> Ed25519PrivateKey:
    """The private key in ``path``; a problem raises ``SigningKeyError`` naming the file, never its bytes."""
    data = _read(path)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise SigningKeyError(f"{path} is not an unencrypted PEM private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningKeyError(f"{path} holds a {type(key).__name__}, not an Ed25519 key")
    return key


def load_verify_key(path: Path) -> Ed25519PublicKey:
    """A public key PEM, or the public half of a private key PEM (so the signer's file also verifies)."""
    data = _read(path)
    if b"PRIVATE KEY" in data:
        return load_signing_key(path).public_key()
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError):
        raise SigningKeyError(f"{path} is not a PEM public key") from None
    if not isinstance(key, Ed25519PublicKey):
        raise SigningKeyError(f"{path} holds a {type(key).__name__}, not an Ed25519 key")
    return key


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise SigningKeyError(f"audit key file {path} is missing") from None
    except IsADirectoryError:
        raise SigningKeyError(f"audit key file {path} is a directory") from None
    except OSError as error:
        raise SigningKeyError(f"audit key file {path} cannot be read ({error.strerror})") from None
