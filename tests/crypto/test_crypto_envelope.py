"""Envelope encryption, keyring providers and key files (pure: no database)."""

from __future__ import annotations

import json
import os
import stat

import pytest

from service.crypto import (
    DecryptionError,
    EnvKeyProvider,
    Keyring,
    KeyringError,
    KeyUsage,
    LocalKeyFileProvider,
    aad_for,
    blob_body,
    parse_blob,
)
from service.crypto.keyring import KeyMaterial, new_key_material


def test_round_trip_and_blob_format():
    keyring = Keyring(new_key_material())
    aad = aad_for("jobs", "job-1", "spec")
    blob = keyring.encrypt(b"secret story", aad=aad)
    assert blob.startswith(b"CC1")
    parsed = parse_blob(blob)
    assert parsed.kek_id == keyring.primary_kek_id
    assert b"secret story" not in blob
    assert keyring.decrypt(blob, aad=aad) == b"secret story"
    # A fresh data key and nonce per object: the same plaintext never gives the same blob.
    assert keyring.encrypt(b"secret story", aad=aad) != blob


@pytest.mark.parametrize(
    ("table", "record", "column"),
    [("jobs", "job-2", "spec"), ("documents", "job-1", "spec"), ("jobs", "job-1", "content")],
)
def test_ciphertext_moved_to_another_record_or_column_fails(table, record, column):
    keyring = Keyring(new_key_material())
    blob = keyring.encrypt(b"x", aad=aad_for("jobs", "job-1", "spec"))
    with pytest.raises(DecryptionError) as error:
        keyring.decrypt(blob, aad=aad_for(table, record, column))
    assert str(error.value) == "ciphertext cannot be decrypted"


def test_aad_encoding_is_injective_and_rejects_empty_parts():
    assert aad_for("a|b", "c", "d") != aad_for("a", "b|c", "d")
    with pytest.raises(ValueError, match="non-empty"):
        aad_for("", "1", "x")


def test_wrong_or_missing_key_fails_closed():
    aad = aad_for("t", 1, "c")
    blob = Keyring(new_key_material()).encrypt(b"x", aad=aad)
    with pytest.raises(DecryptionError):
        Keyring(new_key_material()).decrypt(blob, aad=aad)  # unknown kid
    material = new_key_material()
    keyring = Keyring(material)
    blob = keyring.encrypt(b"x", aad=aad)
    same_id_other_key = KeyMaterial(
        primary_kek_id=material.primary_kek_id,
        keks={material.primary_kek_id: os.urandom(32)},
        digest_key=material.digest_key,
    )
    with pytest.raises(DecryptionError):
        Keyring(same_id_other_key).decrypt(blob, aad=aad)


@pytest.mark.parametrize("mutate", ["body", "wrapped", "truncate", "magic", "empty"])
def test_tampered_blob_fails(mutate):
    keyring = Keyring(new_key_material())
    aad = aad_for("t", 1, "c")
    blob = bytearray(keyring.encrypt(b"payload", aad=aad))
    header_len = len(blob) - len(blob_body(bytes(blob)))
    if mutate == "body":
        blob[-1] ^= 1
    elif mutate == "wrapped":
        blob[header_len - 5] ^= 1
    elif mutate == "truncate":
        blob = blob[: header_len + 5]
    elif mutate == "magic":
        blob[:3] = b"CC2"
    else:
        blob = bytearray()
    with pytest.raises(DecryptionError):
        keyring.decrypt(bytes(blob), aad=aad)


def test_rewrap_keeps_body_and_moves_to_primary(tmp_path):
    provider = LocalKeyFileProvider.generate(tmp_path / "keys.json")
    old = Keyring.from_provider(provider)
    aad = aad_for("t", 1, "c")
    blob = old.encrypt(b"data", aad=aad)
    new_kid = provider.add_key()
    provider.promote(new_kid)
    new = Keyring.from_provider(provider)
    rewrapped = new.rewrap(blob)
    assert parse_blob(rewrapped).kek_id == new_kid
    assert blob_body(rewrapped) == blob_body(blob)
    assert new.decrypt(rewrapped, aad=aad) == b"data"
    assert new.rewrap(rewrapped) == rewrapped


def test_key_file_is_created_0600_and_refuses_overwrite(tmp_path):
    path = tmp_path / "sub" / "keys.json"
    LocalKeyFileProvider.generate(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with pytest.raises(KeyringError, match="already exists"):
        LocalKeyFileProvider.generate(path)


def test_key_file_readable_by_others_is_refused(tmp_path):
    path = tmp_path / "keys.json"
    provider = LocalKeyFileProvider.generate(path)
    path.chmod(0o644)
    with pytest.raises(KeyringError, match="must be 600"):
        provider.load()


def test_missing_or_malformed_key_file_fails(tmp_path):
    with pytest.raises(KeyringError, match="does not exist"):
        LocalKeyFileProvider(tmp_path / "none.json").load()
    path = tmp_path / "bad.json"
    path.write_text("{not json")
    path.chmod(0o600)
    with pytest.raises(KeyringError, match="not valid JSON"):
        LocalKeyFileProvider(path).load()


def test_promote_retire_rules(tmp_path):
    provider = LocalKeyFileProvider.generate(tmp_path / "keys.json")
    first = provider.load().primary_kek_id
    with pytest.raises(KeyringError, match="primary key cannot be retired"):
        provider.retire(first, usage=KeyUsage(kid=first, counts={}))
    with pytest.raises(KeyringError, match="no key"):
        provider.promote("kek-nope")
    second = provider.add_key()
    assert provider.load().primary_kek_id == first
    assert provider.load().promoted_at is None
    provider.promote(second)
    assert provider.load().seconds_since_promotion() < 60
    # A key that still wraps data, or a count taken for another key, is refused; the file is unchanged.
    with pytest.raises(
        KeyringError, match=r"still wraps 2 job specs, 1 artifacts; run `carecanvas keys reencrypt`"
    ):
        provider.retire(
            first, usage=KeyUsage(kid=first, counts={"job specs": 2, "artifacts": 1, "web sessions": 0})
        )
    with pytest.raises(KeyringError, match="usage count given is for"):
        provider.retire(first, usage=KeyUsage(kid=second, counts={}))
    assert set(provider.load().keks) == {first, second}
    provider.retire(first, usage=KeyUsage(kid=first, counts={"job specs": 0}))
    material = provider.load()
    assert set(material.keks) == {second}
    assert material.retired[0]["kid"] == first
    assert stat.S_IMODE((tmp_path / "keys.json").stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["keys.json"]  # no temp files left behind


def test_env_provider(tmp_path):
    document = new_key_material().to_document()
    keyring = Keyring.from_provider(EnvKeyProvider(json.dumps(document)))
    assert keyring.primary_kek_id == document["primary"]
    with pytest.raises(KeyringError, match="not set"):
        EnvKeyProvider.from_environ({})
    assert EnvKeyProvider.from_environ({"CARECANVAS_KEKS": json.dumps(document)}).load().digest_key
    with pytest.raises(KeyringError, match="not valid JSON"):
        EnvKeyProvider("nope").load()
    broken = dict(document, primary="kek-missing")
    with pytest.raises(KeyringError, match="primary key id has no key"):
        EnvKeyProvider(json.dumps(broken)).load()
    short = dict(document, digest_key="AAAA")
    with pytest.raises(KeyringError, match="digest key must be 32 bytes"):
        EnvKeyProvider(json.dumps(short)).load()
    with pytest.raises(KeyringError, match="format"):
        EnvKeyProvider(json.dumps({"primary": "x"})).load()


def test_keyed_digest_is_keyed_and_stable():
    material = new_key_material()
    first = Keyring(material).keyed_digest("pat-1")
    assert first == Keyring(material).keyed_digest("pat-1")
    assert len(first) == 64
    assert first != Keyring(material).keyed_digest("pat-2")
    assert first != Keyring(new_key_material()).keyed_digest("pat-1")
