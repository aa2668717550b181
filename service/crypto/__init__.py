"""Envelope encryption (AES-256-GCM) and the keyring of key-encryption keys."""

from service.crypto.envelope import DecryptionError, EnvelopeCipher, aad_for, blob_body, parse_blob
from service.crypto.keyring import (
    EnvKeyProvider,
    KeyMaterial,
    KeyProvider,
    Keyring,
    KeyringError,
    LocalKeyFileProvider,
)

__all__ = [
    "DecryptionError",
    "EnvKeyProvider",
    "EnvelopeCipher",
    "KeyMaterial",
    "KeyProvider",
    "Keyring",
    "KeyringError",
    "LocalKeyFileProvider",
    "aad_for",
    "blob_body",
    "parse_blob",
]
