"""A running process's keyring follows its key file: new keys, a new primary, and bad reloads fail safe."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from service.crypto import DecryptionError, Keyring, LocalKeyFileProvider, aad_for
from service.crypto.keyring import new_key_material

AAD = aad_for("jobs", "job-1", "spec")


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _overwrite(path: Path, document: object) -> None:
    """Replace the key file the way the key commands do (a 0600 sibling renamed over it)."""
    temporary = path.with_name("replacement.tmp")
    temporary.write_text(json.dumps(document) if not isinstance(document, str) else document)
    temporary.chmod(0o600)
    os.replace(temporary, path)


def test_a_ciphertext_under_a_key_added_elsewhere_is_decrypted_after_a_reload(tmp_path: Path) -> None:
    provider = LocalKeyFileProvider.generate(tmp_path / "keys.json")
    worker = Keyring.from_provider(provider)  # loaded at start, before the rotation
    new_kid = provider.add_key()
    provider.promote(new_kid)
    api = Keyring.from_provider(provider)
    blob = api.encrypt(b"spec", aad=AAD)
    assert api.kek_id_of(blob) == new_kid
    assert new_kid not in worker.kek_ids
    # The worker has never seen this key id: it rereads the key file instead of failing the job.
    assert worker.decrypt(blob, aad=AAD) == b"spec"
    assert new_kid in worker.kek_ids
    assert worker.primary_kek_id == new_kid


def test_encryption_moves_to_a_new_primary_within_the_refresh_period(tmp_path: Path) -> None:
    provider = LocalKeyFileProvider.generate(tmp_path / "keys.json")
    clock = FakeClock()
    keyring = Keyring(provider.load(), provider=provider, fingerprint=provider.fingerprint(), clock=clock)
    old_kid = keyring.primary_kek_id
    new_kid = provider.add_key()
    provider.promote(new_kid)
    clock.now += 0.5
    assert keyring.kek_id_of(keyring.encrypt(b"x", aad=AAD)) == old_kid  # not checked yet
    clock.now += 2.0
    assert keyring.kek_id_of(keyring.encrypt(b"x", aad=AAD)) == new_kid


def test_a_retired_key_is_dropped_from_memory_on_reload(tmp_path: Path) -> None:
    provider = LocalKeyFileProvider.generate(tmp_path / "keys.json")
    keyring = Keyring.from_provider(provider)
    old_kid = keyring.primary_kek_id
    old_blob = keyring.encrypt(b"x", aad=AAD)
    provider.promote(provider.add_key())
    material = provider.load()
    document = material.to_document()
    del document["keks"][old_kid]
    _overwrite(provider.path, document)
    assert keyring.refresh()
    assert old_kid not in keyring.kek_ids
    with pytest.raises(DecryptionError):
        keyring.decrypt(old_blob, aad=AAD)


@pytest.mark.parametrize("replacement", ["{not json", json.dumps({"format": "other"})])
def test_an_unreadable_replacement_keeps_the_keys_in_memory(tmp_path: Path, replacement: str) -> None:
    provider = LocalKeyFileProvider.generate(tmp_path / "keys.json")
    keyring = Keyring.from_provider(provider)
    blob = keyring.encrypt(b"x", aad=AAD)
    _overwrite(provider.path, replacement)
    assert not keyring.refresh()
    assert keyring.decrypt(blob, aad=AAD) == b"x"
    assert keyring.kek_id_of(keyring.encrypt(b"y", aad=AAD)) == keyring.primary_kek_id
    stranger = Keyring(new_key_material()).encrypt(b"z", aad=AAD)
    with pytest.raises(DecryptionError):  # an unknown key still fails closed
        keyring.decrypt(stranger, aad=AAD)


def test_material_with_another_digest_key_is_refused(tmp_path: Path) -> None:
    provider = LocalKeyFileProvider.generate(tmp_path / "keys.json")
    keyring = Keyring.from_provider(provider)
    digest = keyring.keyed_digest("pat-1")
    _overwrite(provider.path, new_key_material().to_document())  # someone else's keyring
    assert not keyring.refresh()
    assert keyring.keyed_digest("pat-1") == digest
    assert keyring.primary_kek_id != provider.load().primary_kek_id  # still our own keys


def test_a_deleted_key_file_keeps_the_keys_in_memory(tmp_path: Path) -> None:
    provider = LocalKeyFileProvider.generate(tmp_path / "keys.json")
    keyring = Keyring.from_provider(provider)
    blob = keyring.encrypt(b"x", aad=AAD)
    provider.path.unlink()
    assert not keyring.refresh()
    assert keyring.decrypt(blob, aad=AAD) == b"x"


def test_a_keyring_without_a_provider_never_reloads() -> None:
    keyring = Keyring(new_key_material())
    assert keyring.provider is None
    assert not keyring.refresh()
