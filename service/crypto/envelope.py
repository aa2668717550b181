"""AES-256-GCM envelope encryption: a fresh data key per object, wrapped by a key-encryption key (KEK).

Blob format, version ``CC1`` (all lengths in bytes)::

    b"CC1"                      3   magic and format version
    kid_len                     1   length of the KEK id (1..255)
    kid                         n   KEK id, UTF-8
    wrapped_len                 1   length of the wrapped data key (always 60 in CC1)
    wrapped                     m   AES-256-GCM(KEK, nonce_w, data_key, aad=b"CC1|wrap|" + kid):
                                    nonce_w (12) || encrypted key (32) || tag (16)
    nonce                      12   nonce for the payload
    ciphertext                  *   AES-256-GCM(data_key, nonce, plaintext, aad) including the 16-byte tag

``header`` = everything before ``nonce``; ``body`` = ``nonce || ciphertext``. Re-wrapping onto another KEK
(key rotation) changes only the header, so a hash over the body (the audit chain) survives rotation.

The associated data binds a payload to ``(table, record id, column)`` (see ``aad_for``): a ciphertext moved to
another record or column fails to decrypt. Every failure raises the same ``DecryptionError`` with no detail,
so nothing about keys or content leaks through error messages.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

MAGIC = b"CC1"
KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
WRAPPED_KEY_BYTES = NONCE_BYTES + KEY_BYTES + TAG_BYTES
_WRAP_AAD_PREFIX = b"CC1|wrap|"


class DecryptionError(Exception):
    """A ciphertext could not be decrypted (wrong record, wrong or missing key, or tampered bytes)."""

    def __init__(self) -> None:
        super().__init__("ciphertext cannot be decrypted")


def aad_for(table: str, record_id: object, column: str) -> bytes:
    """Associated data binding a ciphertext to one column of one record."""
    parts = [table, str(record_id), column]
    for part in parts:
        if not part or "\x00" in part:
            raise ValueError("aad_for needs non-empty table, record id and column without NUL characters")
    # Length-prefixing makes the encoding injective: ("a|b", "c") can never collide with ("a", "b|c").
    return b"CC-AAD1" + b"".join(len(p.encode()).to_bytes(4, "big") + p.encode() for p in parts)


@dataclass(frozen=True)
class ParsedBlob:
    """The parts of a CC1 blob."""

    kek_id: str
    wrapped_key: bytes
    body: bytes  # nonce || ciphertext-with-tag

    @property
    def header(self) -> bytes:
        return _header(self.kek_id, self.wrapped_key)


def _header(kek_id: str, wrapped_key: bytes) -> bytes:
    kid = kek_id.encode()
    return MAGIC + bytes([len(kid)]) + kid + bytes([len(wrapped_key)]) + wrapped_key


def parse_blob(blob: bytes) -> ParsedBlob:
    """Split a CC1 blob; a malformed blob raises ``DecryptionError``."""
    if not isinstance(blob, bytes | bytearray | memoryview):
        raise DecryptionError
    data = bytes(blob)
    if len(data) < len(MAGIC) + 2 or not data.startswith(MAGIC):
        raise DecryptionError
    position = len(MAGIC)
    kid_len = data[position]
    position += 1
    kid_bytes = data[position : position + kid_len]
    position += kid_len
    if kid_len == 0 or len(kid_bytes) != kid_len or position >= len(data):
        raise DecryptionError
    wrapped_len = data[position]
    position += 1
    wrapped = data[position : position + wrapped_len]
    position += wrapped_len
    body = data[position:]
    if wrapped_len != WRAPPED_KEY_BYTES or len(wrapped) != wrapped_len or len(body) < NONCE_BYTES + TAG_BYTES:
        raise DecryptionError
    try:
        kek_id = kid_bytes.decode()
    except UnicodeDecodeError:
        raise DecryptionError from None
    return ParsedBlob(kek_id=kek_id, wrapped_key=wrapped, body=body)


def header_prefix(kek_id: str) -> bytes:
    """The first bytes of every blob wrapped by ``kek_id`` (the database counts them without decrypting)."""
    kid = kek_id.encode()
    if not 0 < len(kid) < 256:
        raise ValueError("a KEK id must be 1..255 bytes of UTF-8")
    return MAGIC + bytes([len(kid)]) + kid


def blob_body(blob: bytes) -> bytes:
    """The part of a blob that key rotation never changes (nonce and ciphertext)."""
    return parse_blob(blob).body


class EnvelopeCipher:
    """Encrypts under the primary KEK, decrypts under any KEK the lookup knows."""

    def __init__(self, *, primary_kek_id: str, kek_lookup: Callable[[str], bytes | None]) -> None:
        kid = primary_kek_id.encode()
        if not 0 < len(kid) < 256:
            raise ValueError("a KEK id must be 1..255 bytes of UTF-8")
        primary = kek_lookup(primary_kek_id)
        if primary is None or len(primary) != KEY_BYTES:
            raise ValueError("the primary KEK is missing or not 32 bytes")
        self._primary_kek_id = primary_kek_id
        self._kek_lookup = kek_lookup

    @property
    def primary_kek_id(self) -> str:
        return self._primary_kek_id

    def encrypt(self, plaintext: bytes, *, aad: bytes) -> bytes:
        data_key = AESGCM.generate_key(bit_length=256)
        nonce = os.urandom(NONCE_BYTES)
        body = nonce + AESGCM(data_key).encrypt(nonce, bytes(plaintext), aad)
        return _header(self._primary_kek_id, self._wrap(data_key, self._primary_kek_id)) + body

    def decrypt(self, blob: bytes, *, aad: bytes) -> bytes:
        parsed = parse_blob(blob)
        data_key = self._unwrap(parsed)
        nonce, ciphertext = parsed.body[:NONCE_BYTES], parsed.body[NONCE_BYTES:]
        try:
            return AESGCM(data_key).decrypt(nonce, ciphertext, aad)
        except InvalidTag:
            raise DecryptionError from None

    def rewrap(self, blob: bytes) -> bytes:
        """The same payload with its data key wrapped by the primary KEK (unchanged if it already is)."""
        parsed = parse_blob(blob)
        if parsed.kek_id == self._primary_kek_id:
            return bytes(blob)
        data_key = self._unwrap(parsed)
        return _header(self._primary_kek_id, self._wrap(data_key, self._primary_kek_id)) + parsed.body

    def _wrap(self, data_key: bytes, kek_id: str) -> bytes:
        kek = self._kek(kek_id)
        nonce = os.urandom(NONCE_BYTES)
        return nonce + AESGCM(kek).encrypt(nonce, data_key, _WRAP_AAD_PREFIX + kek_id.encode())

    def _unwrap(self, parsed: ParsedBlob) -> bytes:
        kek = self._kek(parsed.kek_id)
        nonce, wrapped = parsed.wrapped_key[:NONCE_BYTES], parsed.wrapped_key[NONCE_BYTES:]
        try:
            data_key = AESGCM(kek).decrypt(nonce, wrapped, _WRAP_AAD_PREFIX + parsed.kek_id.encode())
        except InvalidTag:
            raise DecryptionError from None
        if len(data_key) != KEY_BYTES:
            raise DecryptionError
        return data_key

    def _kek(self, kek_id: str) -> bytes:
        kek = self._kek_lookup(kek_id)
        if kek is None or len(kek) != KEY_BYTES:
            raise DecryptionError  # a missing or retired key fails closed, with no hint which one
        return kek
