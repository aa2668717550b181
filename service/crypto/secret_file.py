"""Key material from a mounted Kubernetes Secret: read-only, reloaded when the kubelet swaps the file.

Set ``CARECANVAS_KEK_SECRET_FILE`` to the file inside the Secret volume (``/etc/carecanvas/secrets/
kek-keyring.json`` in the chart). The file holds the same keyring document as a local key file. Kubernetes
projects a Secret as a symlink into a timestamped directory and replaces that link atomically when the
Secret changes, so ``fingerprint`` follows the resolved path and a running process picks up an updated
Secret (after the kubelet's sync delay) without a restart.

This is the shape a cloud KMS provider follows (see ``service.crypto.keyring.KeyProvider``): it only reads,
it fails closed on anything missing, malformed or readable by other users, and its messages never contain
key material. The key commands that change keys (``add``, ``promote``, ``retire``) refuse it: edit a copy
with ``CARECANVAS_KEK_FILE`` on a trusted machine and update the Secret (docs/deploying.md, "Keys").
"""

from __future__ import annotations

import os
from pathlib import Path

from service.crypto.keyring import KeyMaterial, KeyringError, KeyUsage, file_fingerprint, read_key_document

# A Secret volume's defaultMode 0440 or 0400 (0600/0640 for a file placed by hand): nothing for other users,
# nothing writable by the group.
SECRET_FILE_MODE_BITS = 0o640


class SecretFileKeyProvider:
    """The keyring document in a read-only file, typically a key of a mounted Kubernetes Secret."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    @property
    def description(self) -> str:
        return f"mounted secret {self.path}"

    def load(self) -> KeyMaterial:
        if self.path.is_dir():
            raise KeyringError(
                f"{self.path} is a directory; point CARECANVAS_KEK_SECRET_FILE at the keyring file inside it "
                "(for example kek-keyring.json)"
            )
        return read_key_document(self.path, allowed_mode_bits=SECRET_FILE_MODE_BITS)

    def fingerprint(self) -> str:
        return file_fingerprint(self.path)

    def add_key(self) -> str:
        raise KeyringError(self._read_only())

    def promote(self, kid: str) -> None:
        raise KeyringError(self._read_only())

    def retire(self, kid: str, *, usage: KeyUsage) -> None:
        raise KeyringError(self._read_only())

    def _read_only(self) -> str:
        return (
            f"keys from the {self.description} are read-only here: change a copy with CARECANVAS_KEK_FILE "
            "on a trusted machine and update the Secret (docs/deploying.md, Keys)"
        )
