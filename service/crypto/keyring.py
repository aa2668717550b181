"""Keyring of key-encryption keys (one primary, older ones for decryption) behind a provider interface.

Key material document (JSON; the same shape in a key file and in the ``CARECANVAS_KEKS`` variable)::

    {
      "format": "carecanvas-keyring/1",
      "primary": "kek-20261121-1a2b3c4d",
      "keks": {"kek-20261121-1a2b3c4d": "<base64 of 32 random bytes>", ...},
      "digest_key": "<base64 of 32 random bytes>",          # HMAC key for searchable digests; never rotated
      "audit_signing_key": "<base64 of a 32-byte Ed25519 seed>",  # optional: signs audit checkpoints
      "retired": [{"kid": "...", "retired_at": "..."}]      # bookkeeping only, no key material
    }

The digest key is deliberately outside rotation: changing it would make every stored audit digest
unsearchable. Anything missing or malformed raises ``KeyringError`` (fail closed); an unknown or retired KEK
at decryption raises ``DecryptionError``.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import dataclasses
import hashlib
import hmac
import json
import os
import secrets
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from service.crypto.envelope import KEY_BYTES, EnvelopeCipher, parse_blob

KEYRING_FORMAT = "carecanvas-keyring/1"
ENV_VARIABLE = "CARECANVAS_KEKS"


class KeyringError(Exception):
    """The key material is missing, malformed or unsafe to use."""


@dataclass(frozen=True)
class KeyMaterial:
    """Everything a keyring needs, as loaded by a provider."""

    primary_kek_id: str
    keks: Mapping[str, bytes]
    digest_key: bytes
    audit_signing_seed: bytes | None = None
    retired: tuple[Mapping[str, str], ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.primary_kek_id not in self.keks:
            raise KeyringError("the primary key id has no key in the keyring")
        for kid, key in self.keks.items():
            if not kid or len(kid.encode()) > 255:
                raise KeyringError("key ids must be 1..255 bytes")
            if len(key) != KEY_BYTES:
                raise KeyringError(f"key {kid!r} must be 32 bytes")
        if len(self.digest_key) != KEY_BYTES:
            raise KeyringError("the digest key must be 32 bytes")
        if self.audit_signing_seed is not None and len(self.audit_signing_seed) != 32:
            raise KeyringError("the audit signing key must be a 32-byte Ed25519 seed")

    @classmethod
    def from_document(cls, document: Any) -> KeyMaterial:
        if not isinstance(document, dict):
            raise KeyringError("key material must be a JSON object")
        if document.get("format") != KEYRING_FORMAT:
            raise KeyringError(f"key material format must be {KEYRING_FORMAT!r}")
        keks = document.get("keks")
        primary = document.get("primary")
        if not isinstance(keks, dict) or not keks or not isinstance(primary, str):
            raise KeyringError("key material needs 'primary' and a non-empty 'keks' object")
        signing = document.get("audit_signing_key")
        retired = document.get("retired", [])
        if not isinstance(retired, list):
            raise KeyringError("'retired' must be a list")
        return cls(
            primary_kek_id=primary,
            keks={str(kid): _b64(value, f"key {kid!r}") for kid, value in keks.items()},
            digest_key=_b64(document.get("digest_key"), "digest_key"),
            audit_signing_seed=None if signing is None else _b64(signing, "audit_signing_key"),
            retired=tuple(retired),
        )

    def to_document(self) -> dict[str, Any]:
        document: dict[str, Any] = {
            "format": KEYRING_FORMAT,
            "primary": self.primary_kek_id,
            "keks": {kid: base64.b64encode(key).decode() for kid, key in self.keks.items()},
            "digest_key": base64.b64encode(self.digest_key).decode(),
            "retired": list(self.retired),
        }
        if self.audit_signing_seed is not None:
            document["audit_signing_key"] = base64.b64encode(self.audit_signing_seed).decode()
        return document


def _b64(value: Any, what: str) -> bytes:
    if not isinstance(value, str):
        raise KeyringError(f"{what} must be a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise KeyringError(f"{what} is not valid base64") from None


def new_kek_id() -> str:
    return f"kek-{datetime.now(UTC):%Y%m%d}-{secrets.token_hex(4)}"


def new_key_material() -> KeyMaterial:
    kid = new_kek_id()
    return KeyMaterial(
        primary_kek_id=kid,
        keks={kid: secrets.token_bytes(KEY_BYTES)},
        digest_key=secrets.token_bytes(KEY_BYTES),
        audit_signing_seed=secrets.token_bytes(32),
    )


@runtime_checkable
class KeyProvider(Protocol):
    """Where key material comes from: a file, an environment variable, or (later) a cloud KMS."""

    def load(self) -> KeyMaterial: ...


class EnvKeyProvider:
    """Key material from a JSON string (the value of ``CARECANVAS_KEKS``), passed in by the caller."""

    def __init__(self, value: str) -> None:
        self._value = value

    @classmethod
    def from_environ(cls, environ: Mapping[str, str], name: str = ENV_VARIABLE) -> EnvKeyProvider:
        value = environ.get(name)
        if not value:
            raise KeyringError(f"environment variable {name} is not set")
        return cls(value)

    def load(self) -> KeyMaterial:
        try:
            document = json.loads(self._value)
        except json.JSONDecodeError:
            raise KeyringError("key material is not valid JSON") from None
        return KeyMaterial.from_document(document)


class LocalKeyFileProvider:
    """Key material in a local JSON file that only its owner may read (mode 0600)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    @classmethod
    def generate(cls, path: str | os.PathLike[str]) -> LocalKeyFileProvider:
        """Create a new key file (refuses to overwrite one) with a primary KEK, digest and signing keys."""
        provider = cls(path)
        provider.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        payload = json.dumps(new_key_material().to_document(), indent=2).encode()
        try:
            fd = os.open(provider.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            raise KeyringError(f"key file {provider.path} already exists; refusing to overwrite it") from None
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), 0o600)
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        return provider

    def load(self) -> KeyMaterial:
        try:
            info = self.path.stat()
        except FileNotFoundError:
            raise KeyringError(f"key file {self.path} does not exist") from None
        if not stat.S_ISREG(info.st_mode):
            raise KeyringError(f"key file {self.path} is not a regular file")
        if info.st_mode & 0o077:
            raise KeyringError(
                f"key file {self.path} has mode {stat.S_IMODE(info.st_mode):o}; it must be 600 (owner only)"
            )
        try:
            document = json.loads(self.path.read_bytes())
        except json.JSONDecodeError:
            raise KeyringError(f"key file {self.path} is not valid JSON") from None
        return KeyMaterial.from_document(document)

    def add_key(self) -> str:
        """Add a new KEK (not yet primary); returns its id."""
        material = self.load()
        kid = new_kek_id()
        while kid in material.keks:
            kid = new_kek_id()
        self._write(_replace(material, keks={**material.keks, kid: secrets.token_bytes(KEY_BYTES)}))
        return kid

    def promote(self, kid: str) -> None:
        """Make ``kid`` the primary: new ciphertexts are wrapped by it."""
        material = self.load()
        if kid not in material.keks:
            raise KeyringError(f"no key {kid!r} in the key file; known ids: {sorted(material.keks)}")
        self._write(_replace(material, primary_kek_id=kid))

    def retire(self, kid: str) -> None:
        """Delete a non-primary KEK; run ``reencrypt_all`` first or its ciphertexts become unreadable."""
        material = self.load()
        if kid == material.primary_kek_id:
            raise KeyringError("the primary key cannot be retired; promote another key first")
        if kid not in material.keks:
            raise KeyringError(f"no key {kid!r} in the key file; known ids: {sorted(material.keks)}")
        keks = {other: key for other, key in material.keks.items() if other != kid}
        retired = (*material.retired, {"kid": kid, "retired_at": datetime.now(UTC).isoformat()})
        self._write(_replace(material, keks=keks, retired=retired))

    def _write(self, material: KeyMaterial) -> None:
        # Write a 0600 sibling and rename it over the old file, so a crash never leaves half a key file.
        temporary = self.path.with_name(f".{self.path.name}.{secrets.token_hex(6)}.tmp")
        payload = json.dumps(material.to_document(), indent=2).encode()
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as handle:
                os.fchmod(handle.fileno(), 0o600)
                handle.write(payload)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, self.path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                temporary.unlink()


def _replace(material: KeyMaterial, **changes: Any) -> KeyMaterial:
    return dataclasses.replace(material, **changes)  # re-runs the checks in __post_init__


class Keyring:
    """The keys in use: encrypt under the primary KEK, decrypt under any known one, keyed digests."""

    def __init__(self, material: KeyMaterial) -> None:
        self._keks = dict(material.keks)
        self._digest_key = material.digest_key
        self._cipher = EnvelopeCipher(primary_kek_id=material.primary_kek_id, kek_lookup=self._keks.get)
        self._signing_key = (
            None
            if material.audit_signing_seed is None
            else Ed25519PrivateKey.from_private_bytes(material.audit_signing_seed)
        )

    @classmethod
    def from_provider(cls, provider: KeyProvider) -> Keyring:
        return cls(provider.load())

    @property
    def primary_kek_id(self) -> str:
        return self._cipher.primary_kek_id

    @property
    def kek_ids(self) -> frozenset[str]:
        return frozenset(self._keks)

    @property
    def cipher(self) -> EnvelopeCipher:
        return self._cipher

    def encrypt(self, plaintext: bytes, *, aad: bytes) -> bytes:
        return self._cipher.encrypt(plaintext, aad=aad)

    def decrypt(self, blob: bytes, *, aad: bytes) -> bytes:
        return self._cipher.decrypt(blob, aad=aad)

    def rewrap(self, blob: bytes) -> bytes:
        return self._cipher.rewrap(blob)

    @staticmethod
    def kek_id_of(blob: bytes) -> str:
        return parse_blob(blob).kek_id

    def keyed_digest(self, value: str) -> str:
        """HMAC-SHA256 (hex) of ``value`` under the digest key: searchable without storing the value."""
        return hmac.new(self._digest_key, value.encode(), hashlib.sha256).hexdigest()

    @property
    def audit_signing_key(self) -> Ed25519PrivateKey | None:
        return self._signing_key

    @property
    def audit_verify_key(self) -> Ed25519PublicKey | None:
        return None if self._signing_key is None else self._signing_key.public_key()
