"""The read-only mounted-Secret key provider: loads, follows a Secret update, fails closed on bad input."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import pytest

from service.crypto import Keyring, KeyringError, KeyUsage, SecretFileKeyProvider, aad_for
from service.crypto.keyring import KeyMaterial, new_key_material
from service.settings import Settings
from service.stores import key_provider, open_keyring

AAD = aad_for("documents", "d1", "content")


def mount_secret(root: Path, version: str, document: object, *, mode: int = 0o440) -> Path:
    """Lay files out as the kubelet does: ..<version>/file, ..data -> ..<version>, file -> ..data/file."""
    root.mkdir(exist_ok=True)
    versioned = root / f"..{version}"
    versioned.mkdir()
    target = versioned / "kek-keyring.json"
    if isinstance(document, bytes):
        target.write_bytes(document)
    else:
        target.write_text(document if isinstance(document, str) else json.dumps(document))
    target.chmod(mode)
    link = root / "..data_tmp"
    link.symlink_to(versioned.name)
    os.replace(link, root / "..data")  # the kubelet's atomic swap
    entry = root / "kek-keyring.json"
    if not entry.is_symlink():
        entry.symlink_to("..data/kek-keyring.json")
    return entry


def test_loads_a_mounted_secret_and_follows_its_update(tmp_path: Path) -> None:
    material = new_key_material()
    path = mount_secret(tmp_path / "secrets", "2026_12_01_a", material.to_document())
    provider = SecretFileKeyProvider(path)
    keyring = Keyring.from_provider(provider)
    assert keyring.primary_kek_id == material.primary_kek_id
    old_blob = keyring.encrypt(b"caption", aad=AAD)
    # The operator adds and promotes a key in the Secret; the kubelet swaps the mounted files.
    new_kid = "kek-20261201-newkey00"
    updated = KeyMaterial(
        primary_kek_id=new_kid,
        keks={**material.keks, new_kid: os.urandom(32)},
        digest_key=material.digest_key,
        audit_signing_seed=material.audit_signing_seed,
    )
    mount_secret(tmp_path / "secrets", "2026_12_01_b", updated.to_document())
    writer = Keyring.from_provider(SecretFileKeyProvider(path))
    new_blob = writer.encrypt(b"caption 2", aad=AAD)
    assert keyring.decrypt(new_blob, aad=AAD) == b"caption 2"  # reloaded on the unknown key id
    assert keyring.primary_kek_id == new_kid
    assert keyring.decrypt(old_blob, aad=AAD) == b"caption"


def test_key_changes_are_refused_as_read_only(tmp_path: Path) -> None:
    path = mount_secret(tmp_path / "secrets", "v1", new_key_material().to_document())
    provider = SecretFileKeyProvider(path)
    kid = provider.load().primary_kek_id
    for attempt in (
        provider.add_key,
        lambda: provider.promote(kid),
        lambda: provider.retire(kid, usage=KeyUsage(kid, {})),
    ):
        with pytest.raises(KeyringError, match="read-only"):
            attempt()


def _bad_inputs(tmp_path: Path) -> list[tuple[Path, str]]:
    good = new_key_material().to_document()
    cases: list[tuple[Path, str]] = [(tmp_path / "absent.json", "does not exist")]
    cases.append((mount_secret(tmp_path / "world", "v", good, mode=0o444), "mode 444"))
    cases.append((mount_secret(tmp_path / "groupw", "v", good, mode=0o460), "mode 460"))
    cases.append((mount_secret(tmp_path / "empty", "v", ""), "is empty"))
    cases.append((mount_secret(tmp_path / "torn", "v", json.dumps(good)[:40]), "not valid JSON"))
    cases.append((mount_secret(tmp_path / "binary", "v", b"\xff\xfe{"), "not valid JSON"))
    cases.append((mount_secret(tmp_path / "format", "v", {**good, "format": "x"}), "format"))
    cases.append((mount_secret(tmp_path / "primary", "v", {**good, "primary": "kek-gone"}), "primary key id"))
    short = {**good, "keks": {good["primary"]: base64.b64encode(b"short").decode()}}
    cases.append((mount_secret(tmp_path / "short", "v", short), "must be 32 bytes"))
    cases.append((mount_secret(tmp_path / "list", "v", [1, 2]), "JSON object"))
    directory = tmp_path / "dir"
    mount_secret(directory, "v", good)
    cases.append((directory, "is a directory"))
    return cases


def test_fails_closed_on_missing_or_malformed_input(tmp_path: Path) -> None:
    for path, message in _bad_inputs(tmp_path):
        with pytest.raises(KeyringError, match=message):
            SecretFileKeyProvider(path).load()


def test_messages_never_contain_key_material(tmp_path: Path) -> None:
    document = new_key_material().to_document()
    document["primary"] = "kek-missing"
    path = mount_secret(tmp_path / "s", "v", document)
    with pytest.raises(KeyringError) as caught:
        SecretFileKeyProvider(path).load()
    for secret in (*document["keks"].values(), document["digest_key"]):
        assert secret not in str(caught.value)


def test_settings_choose_the_secret_provider_and_never_generate_keys(tmp_path: Path) -> None:
    path = mount_secret(tmp_path / "secrets", "v", new_key_material().to_document())
    settings = Settings(data_dir=tmp_path / "data", kek_secret_file=path)
    assert isinstance(key_provider(settings), SecretFileKeyProvider)
    assert open_keyring(settings).primary_kek_id == SecretFileKeyProvider(path).load().primary_kek_id
    with pytest.raises(KeyringError, match="not both"):
        key_provider(Settings(data_dir=tmp_path / "data", kek_secret_file=path, kek_file=tmp_path / "k.json"))
    missing = Settings(data_dir=tmp_path / "empty", kek_secret_file=tmp_path / "nothing" / "kek-keyring.json")
    with pytest.raises(KeyringError, match="does not exist"):
        open_keyring(missing)
    assert not (tmp_path / "nothing").exists()
    assert not (tmp_path / "empty" / "keys.json").exists()
