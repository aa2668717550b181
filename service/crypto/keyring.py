"""Keyring of key-encryption keys (one primary, older ones for decryption) behind a provider interface.

Key material document (JSON; the same shape in a key file and in the ``CARECANVAS_KEKS`` variable)::

    {
      "format": "carecanvas-keyring/1",
      "primary": "kek-20261121-1a2b3c4d",
      "keks": {"kek-20261121-1a2b3c4d": "<base64 of 32 random bytes>", ...},
      "digest_key": "<base64 of 32 random bytes>",          # HMAC key for searchable digests; never rotated
      "audit_signing_key": "<base64 of a 32-byte Ed25519 seed>",  # legacy: unused (service.audit.signing_key)
      "promoted_at": "2026-11-21T10:00:00+00:00",           # when "primary" became primary (optional)
      "retired": [{"kid": "...", "retired_at": "..."}]      # bookkeeping only, no key material
    }

The digest key is deliberately outside rotation: changing it would make every stored audit digest
unsearchable. Anything missing or malformed raises ``KeyringError`` (fail closed); an unknown or retired KEK
at decryption raises ``DecryptionError``.

Running processes follow key changes without a restart: a ``Keyring`` built ``from_provider`` asks its
provider for a cheap fingerprint when a ciphertext names a KEK it does not hold, and before encrypting at most
every ``refresh_seconds``, and reloads when the fingerprint changed. So after ``keys promote`` every process
encrypts under the new primary within ``refresh_seconds``; ``PROPAGATION_SECONDS`` is the wait the key
commands allow for that before they count what an old key still wraps.

Providers (see ``KeyProvider``): ``LocalKeyFileProvider`` (a 0600 file the key commands edit),
``SecretFileKeyProvider`` in ``service.crypto.secret_file`` (a read-only mounted Kubernetes Secret) and
``EnvKeyProvider``. A cloud KMS provider implements the same two methods, see ``KeyProvider``.
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
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import structlog

from service.crypto.envelope import KEY_BYTES, EnvelopeCipher, parse_blob

KEYRING_FORMAT = "carecanvas-keyring/1"
ENV_VARIABLE = "CARECANVAS_KEKS"
# How often a running process checks its provider for a new primary before encrypting.
DEFAULT_REFRESH_SECONDS = 2.0
# After a promotion, how long until no process still encrypts under the previous primary (two refresh periods
# and a margin for a write already in flight). Key commands wait this long before counting an old key's data.
PROPAGATION_SECONDS = 2 * DEFAULT_REFRESH_SECONDS + 1.0
MAX_KEY_DOCUMENT_BYTES = 1 << 20

log = structlog.get_logger("carecanvas.crypto")


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
    promoted_at: datetime | None = None

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
        if self.promoted_at is not None and self.promoted_at.tzinfo is None:
            raise KeyringError("'promoted_at' must carry a time zone")

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
            promoted_at=_time(document.get("promoted_at")),
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
        if self.promoted_at is not None:
            document["promoted_at"] = self.promoted_at.isoformat()
        return document

    def seconds_since_promotion(self, now: datetime | None = None) -> float | None:
        if self.promoted_at is None:
            return None
        return ((now or datetime.now(UTC)) - self.promoted_at).total_seconds()


def _time(value: Any) -> datetime | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise KeyringError("'promoted_at' must be an ISO 8601 time")
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise KeyringError("'promoted_at' must be an ISO 8601 time") from None
    if parsed.tzinfo is None:
        raise KeyringError("'promoted_at' must carry a time zone")
    return parsed


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


@dataclass(frozen=True)
class KeyUsage:
    """How many stored objects one KEK still wraps, per kind of object (e.g. "job specs": 3)."""

    kid: str
    counts: Mapping[str, int]

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def describe(self) -> str:
        parts = [f"{count} {kind}" for kind, count in self.counts.items() if count]
        return ", ".join(parts) if parts else "nothing"


@runtime_checkable
class KeyProvider(Protocol):
    """Where key material comes from: a local file, a mounted Secret, an environment variable, a cloud KMS.

    ``load`` returns the whole keyring or raises ``KeyringError`` (fail closed: never a partial or default
    keyring). ``fingerprint`` is cheap and changes whenever the material may have changed; running processes
    call it to notice a new key (it may raise ``KeyringError`` too). ``description`` names the source in
    messages and never contains key material.

    A cloud KMS provider (AWS KMS, Google Cloud KMS, Azure Key Vault) keeps this shape: ``load`` reads the
    keyring document stored wrapped (e.g. in a Secret or object storage), unwraps it with the KMS ``Decrypt``
    call under a key the pod's workload identity may use, and parses it with ``KeyMaterial.from_document``;
    ``fingerprint`` returns the stored object's version (ETag, secret version) cached for a few seconds. To
    let the key commands edit it, implement ``ManagedKeyProvider`` as well (wrap with ``Encrypt`` on write).
    """

    @property
    def description(self) -> str: ...

    def load(self) -> KeyMaterial: ...

    def fingerprint(self) -> str: ...


@runtime_checkable
class ManagedKeyProvider(KeyProvider, Protocol):
    """A provider the key commands may change (add, promote, retire); read-only ones raise KeyringError."""

    def add_key(self) -> str: ...

    def promote(self, kid: str) -> None: ...

    def retire(self, kid: str, *, usage: KeyUsage) -> None: ...


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

    @property
    def description(self) -> str:
        return "key material from the environment"

    def load(self) -> KeyMaterial:
        try:
            document = json.loads(self._value)
        except json.JSONDecodeError:
            raise KeyringError("key material is not valid JSON") from None
        return KeyMaterial.from_document(document)

    def fingerprint(self) -> str:
        return hashlib.sha256(self._value.encode()).hexdigest()  # a process's environment never changes


def file_fingerprint(path: Path) -> str:
    """Identity of a file's current content: its resolved path (a Secret volume swaps a symlink), inode, size,
    modification time."""
    try:
        resolved = path.resolve(strict=True)
        info = resolved.stat()
    except OSError:
        raise KeyringError(f"key file {path} cannot be read") from None
    return f"{resolved}:{info.st_ino}:{info.st_size}:{info.st_mtime_ns}"


def read_key_document(path: Path, *, allowed_mode_bits: int) -> KeyMaterial:
    """Parse a key file, refusing anything that is not a small regular file with safe permissions."""
    try:
        info = path.stat()
    except FileNotFoundError:
        raise KeyringError(f"key file {path} does not exist") from None
    except OSError:
        raise KeyringError(f"key file {path} cannot be read") from None
    if not stat.S_ISREG(info.st_mode):
        raise KeyringError(f"key file {path} is not a regular file")
    mode = stat.S_IMODE(info.st_mode)
    if mode & ~allowed_mode_bits & 0o777:
        allowed = "600 (owner only)" if allowed_mode_bits == 0o600 else f"at most {allowed_mode_bits:o}"
        raise KeyringError(f"key file {path} has mode {mode:o}; it must be {allowed}")
    if info.st_size > MAX_KEY_DOCUMENT_BYTES:
        raise KeyringError(f"key file {path} is larger than a keyring can be")
    try:
        raw = path.read_bytes()
    except OSError:
        raise KeyringError(f"key file {path} cannot be read") from None
    if not raw.strip():
        raise KeyringError(f"key file {path} is empty")
    try:
        document = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise KeyringError(f"key file {path} is not valid JSON") from None
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

    @property
    def description(self) -> str:
        return f"key file {self.path}"

    def load(self) -> KeyMaterial:
        return read_key_document(self.path, allowed_mode_bits=0o600)

    def fingerprint(self) -> str:
        return file_fingerprint(self.path)

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
        if kid == material.primary_kek_id:
            return
        self._write(_replace(material, primary_kek_id=kid, promoted_at=datetime.now(UTC)))

    def retire(self, kid: str, *, usage: KeyUsage) -> None:
        """Delete a non-primary KEK that wraps nothing any more (``usage`` is its count from the database)."""
        material = self.load()
        check_retirable(material, kid, usage)
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


def check_retirable(material: KeyMaterial, kid: str, usage: KeyUsage) -> None:
    """Why ``kid`` may not be retired, as a ``KeyringError``: primary, unknown, or still wrapping data."""
    if kid == material.primary_kek_id:
        raise KeyringError("the primary key cannot be retired; promote another key first")
    if kid not in material.keks:
        raise KeyringError(f"no key {kid!r} in the keyring; known ids: {sorted(material.keks)}")
    if usage.kid != kid:
        raise KeyringError(f"the usage count given is for {usage.kid!r}, not {kid!r}")
    if usage.total:
        raise KeyringError(f"key {kid} still wraps {usage.describe()}; run `carecanvas keys reencrypt` first")


def _replace(material: KeyMaterial, **changes: Any) -> KeyMaterial:
    return dataclasses.replace(material, **changes)  # re-runs the checks in __post_init__


@dataclass(frozen=True)
class _KeyState:
    """One consistent view of the keys (swapped whole on reload, so readers never see half of one)."""

    material: KeyMaterial
    cipher: EnvelopeCipher
    fingerprint: str | None


class Keyring:
    """The keys in use: encrypt under the primary KEK, decrypt under any known one, keyed digests.

    With a provider it follows key changes while the process runs (see the module docstring). The digest key
    must never change: material with another digest key is refused and the keys in memory stay in use.
    """

    def __init__(
        self,
        material: KeyMaterial,
        *,
        provider: KeyProvider | None = None,
        fingerprint: str | None = None,
        refresh_seconds: float = DEFAULT_REFRESH_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._provider = provider
        self._refresh_seconds = refresh_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._digest_key = material.digest_key
        self._state = self._make_state(material, fingerprint)
        self._checked_at = clock()
        # No audit signing here: checkpoints are signed by a key file of their own
        # (service.audit.signing_key), so whoever holds the database and this keyring cannot sign one.

    @classmethod
    def from_provider(
        cls, provider: KeyProvider, *, refresh_seconds: float = DEFAULT_REFRESH_SECONDS
    ) -> Keyring:
        try:
            fingerprint = provider.fingerprint()  # taken first: a change while loading is seen later
        except KeyringError:
            provider.load()  # raises the precise reason (missing, mode, not JSON) when there is one
            raise
        return cls(
            provider.load(), provider=provider, fingerprint=fingerprint, refresh_seconds=refresh_seconds
        )

    def _make_state(self, material: KeyMaterial, fingerprint: str | None) -> _KeyState:
        keks = dict(material.keks)

        def lookup(kid: str) -> bytes | None:
            key = keks.get(kid)
            return key if key is not None else self._lookup_after_reload(kid)

        cipher = EnvelopeCipher(primary_kek_id=material.primary_kek_id, kek_lookup=lookup)
        return _KeyState(material=material, cipher=cipher, fingerprint=fingerprint)

    def _lookup_after_reload(self, kid: str) -> bytes | None:
        # A ciphertext names a key this process does not hold: another process may have added it just now.
        self.refresh()
        return self._state.material.keks.get(kid)

    def refresh(self) -> bool:
        """Reload the key material if the provider's fingerprint changed; True when the keys changed."""
        if self._provider is None:
            return False
        with self._lock:
            self._checked_at = self._clock()
            try:
                fingerprint = self._provider.fingerprint()
                if fingerprint == self._state.fingerprint:
                    return False
                material = self._provider.load()
            except KeyringError as error:
                # Keep the keys in memory: data they wrap stays readable; unknown keys still fail closed.
                log.warning(
                    "key material could not be reloaded; keeping the keys in memory", reason=str(error)
                )
                return False
            if not hmac.compare_digest(material.digest_key, self._digest_key):
                log.error(
                    "reloaded key material has another digest key; refusing it",
                    source=self._provider.description,
                )
                return False
            changed = material.keks != self._state.material.keks or (
                material.primary_kek_id != self._state.material.primary_kek_id
            )
            self._state = self._make_state(material, fingerprint)
        if changed:
            log.info("key material reloaded", primary=material.primary_kek_id, keys=len(material.keks))
        return changed

    def _refresh_if_due(self) -> None:
        if self._provider is not None and self._clock() - self._checked_at >= self._refresh_seconds:
            self.refresh()

    @property
    def provider(self) -> KeyProvider | None:
        return self._provider

    @property
    def material(self) -> KeyMaterial:
        return self._state.material

    @property
    def primary_kek_id(self) -> str:
        return self._state.cipher.primary_kek_id

    @property
    def kek_ids(self) -> frozenset[str]:
        return frozenset(self._state.material.keks)

    @property
    def cipher(self) -> EnvelopeCipher:
        return self._state.cipher

    def encrypt(self, plaintext: bytes, *, aad: bytes) -> bytes:
        self._refresh_if_due()
        return self._state.cipher.encrypt(plaintext, aad=aad)

    def decrypt(self, blob: bytes, *, aad: bytes) -> bytes:
        return self._state.cipher.decrypt(blob, aad=aad)

    def rewrap(self, blob: bytes) -> bytes:
        return self._state.cipher.rewrap(blob)

    @staticmethod
    def kek_id_of(blob: bytes) -> str:
        return parse_blob(blob).kek_id

    def keyed_digest(self, value: str) -> str:
        """HMAC-SHA256 (hex) of ``value`` under the digest key: searchable without storing the value."""
        return hmac.new(self._digest_key, value.encode(), hashlib.sha256).hexdigest()
