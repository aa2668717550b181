"""Envelope encryption (AES-256-GCM) and the keyring of key-encryption keys."""

from service.crypto.envelope import DecryptionError, EnvelopeCipher, aad_for, blob_body, parse_blob
from service.crypto.keyring import (
    EnvKeyProvider,
    KeyMaterial,
    KeyProvider,
    Keyring,
    KeyringError,
    KeyUsage,
    LocalKeyFileProvider,
    ManagedKeyProvider,
)
from service.crypto.secret_file import SecretFileKeyProvider

__all__ = [
    "DecryptionError",
    "EnvKeyProvider",
    "EnvelopeCipher",
    "KeyMaterial",
    "KeyProvider",
    "KeyUsage",
    "Keyring",
    "KeyringError",
    "LocalKeyFileProvider",
    "ManagedKeyProvider",
    "SecretFileKeyProvider",
    "aad_for",
    "blob_body",
    "parse_blob",
]
