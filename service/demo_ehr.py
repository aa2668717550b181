"""The demo's sandbox EHR registration, kept in the data dir so other `carecanvas` commands find it.

`carecanvas demo` builds its Settings in its own process (the sandbox's ports change on every start), so
a second terminal's `carecanvas audit push --ehr sandbox` used to see no EHR at all. The demo now also
registers a SMART Backend Services client with the sandbox (an EC P-384 key in the data dir) and writes
its registration to ``<data_dir>/demo-ehrs.json``; the audit commands read that file when nothing else
configures EHRs.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from service.ehrs import load_signing_key
from service.settings import Settings

DEMO_EHR_NAME = "sandbox"
DEMO_EHRS_FILE = "demo-ehrs.json"
DEMO_BACKEND_CLIENT_ID = "carecanvas-demo-backend"
DEMO_BACKEND_KEY_FILE = "demo-backend-key.pem"
DEMO_BACKEND_SCOPES = ("system/AuditEvent.c",)


def demo_backend_key(data_dir: Path) -> Path:
    """The demo's backend-services signing key (made once, owner-readable only)."""
    path = data_dir / DEMO_BACKEND_KEY_FILE
    if path.exists():
        return path
    data_dir.mkdir(parents=True, exist_ok=True)
    pem = ec.generate_private_key(ec.SECP384R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(pem)
    return path


def with_demo_backend(settings: Settings) -> tuple[Settings, dict[str, Any]]:
    """The demo settings with a backend client on the sandbox registration, and that client's public JWKS."""
    key = demo_backend_key(settings.data_dir)
    ehrs = [
        ehr.model_copy(
            update={
                "private_key_files": (key.resolve(),),
                "backend_client_id": DEMO_BACKEND_CLIENT_ID,
                "backend_scopes": DEMO_BACKEND_SCOPES,
            }
        )
        if ehr.name == DEMO_EHR_NAME
        else ehr
        for ehr in settings.ehrs
    ]
    jwks = {"keys": [load_signing_key(key).public_jwk]}
    return settings.model_copy(update={"ehrs": ehrs}), jwks


def write_demo_ehrs(settings: Settings) -> Path:
    """Write the demo's registrations to the data dir, atomically (a reader sees the old file or the new)."""
    path = settings.data_dir / DEMO_EHRS_FILE
    document = [ehr.model_dump(mode="json", exclude_defaults=True) for ehr in settings.ehrs]
    descriptor, temporary = tempfile.mkstemp(dir=settings.data_dir, prefix=f".{DEMO_EHRS_FILE}.")
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            json.dump(document, handle, indent=2)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    return path


def with_demo_ehrs(settings: Settings) -> Settings:
    """Settings that configure no EHR get the registration the demo last wrote in their data dir, if any."""
    path = settings.data_dir / DEMO_EHRS_FILE
    if settings.ehrs or settings.ehrs_file is not None or not path.exists():
        return settings
    return settings.model_copy(update={"ehrs_file": path})
