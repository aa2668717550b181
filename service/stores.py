"""Opening the stores a process needs: the database (migrated), the keyring, the audit log."""

from __future__ import annotations

import contextlib
import sqlite3

import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from service.audit import AuditLog, CheckpointSink, FileCheckpointSink
from service.audit.checkpoints import HttpCheckpointSink
from service.audit.signing_key import SigningKeyError, generate_signing_key, load_signing_key
from service.crypto import KeyProvider, Keyring, KeyringError, LocalKeyFileProvider, SecretFileKeyProvider
from service.db.engine import make_engine, make_sessionmaker, migrate
from service.db.models import ENCRYPTED_COLUMNS
from service.settings import Settings

log = structlog.get_logger("carecanvas.stores")


async def open_database(settings: Settings) -> tuple[AsyncEngine, async_sessionmaker[AsyncSession]]:
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    url = settings.resolved_database_url
    if settings.database_url is None or settings.migrate_on_start:
        # Embedded mode migrates its own SQLite file; at scale the Helm hook Job runs `carecanvas migrate`
        # once, so replicas starting together never race on the schema.
        await migrate(url)
    engine = make_engine(url)
    return engine, make_sessionmaker(engine)


def key_provider(settings: Settings) -> KeyProvider:
    """The configured source of keys: a mounted Secret file when set, else the local key file."""
    if settings.kek_secret_file is not None:
        if settings.kek_file is not None:
            raise KeyringError("set CARECANVAS_KEK_FILE or CARECANVAS_KEK_SECRET_FILE, not both")
        return SecretFileKeyProvider(settings.kek_secret_file)
    return LocalKeyFileProvider(settings.resolved_kek_file)


def existing_data(settings: Settings) -> str | None:
    """What in an embedded data dir already holds data that keys were made for (None: nothing yet)."""
    checkpoints = settings.resolved_checkpoint_path
    if checkpoints.exists() and checkpoints.stat().st_size > 0:
        return f"the audit checkpoint file {checkpoints}"
    database = settings.data_dir / "carecanvas.db"
    if not database.exists():
        return None
    # Opened read-only (mode=ro still reads rows that are only in the WAL, which immutable=1 would miss).
    try:
        with contextlib.closing(sqlite3.connect(f"{database.resolve().as_uri()}?mode=ro", uri=True)) as db:
            tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            for table in sorted({model.__tablename__ for model, _key, _column in ENCRYPTED_COLUMNS} & tables):
                if db.execute(f'SELECT 1 FROM "{table}" LIMIT 1').fetchone() is not None:  # noqa: S608
                    return f"the database {database}"
    except sqlite3.Error:
        return f"the database {database} (unreadable)"
    return None


def missing_keys_problem(settings: Settings, *, may_create: bool) -> str | None:
    """Why this process must not run without keys, or None when it may (keys exist or may be made now)."""
    provider = key_provider(settings)
    if not isinstance(provider, LocalKeyFileProvider) or provider.path.exists():
        return None
    if may_create and settings.kek_file is None and settings.database_url is None:
        holder = existing_data(settings)
        if holder is None:
            return None
        return (
            f"key file {provider.path} is missing but {holder} already holds encrypted data; refusing to "
            "start with new keys that could not read it. Restore the key file from your backup "
            "(or point CARECANVAS_KEK_FILE at it)."
        )
    return (
        f"key file {provider.path} is missing; restore it from your backup, or create keys for a new "
        "installation with `carecanvas keys generate` (only the first start of an embedded install on an "
        "empty data directory makes its own keys)"
    )


def open_keyring(settings: Settings, *, create_if_missing: bool = True) -> Keyring:
    """Load the configured keys; only the first start of an embedded install on an empty data dir makes them.

    Anything else without keys fails closed with a ``KeyringError`` that says what to do, in every mode.
    ``create_if_missing=False`` (read-only commands) never creates a file.
    """
    problem = missing_keys_problem(settings, may_create=create_if_missing)
    if problem is not None:
        raise KeyringError(problem)
    provider = key_provider(settings)
    if isinstance(provider, LocalKeyFileProvider) and not provider.path.exists():
        provider.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            LocalKeyFileProvider.generate(provider.path)
            log.warning(
                "generated a new local key file (first start of an embedded install)",
                url_path=str(provider.path),
            )
        except KeyringError:
            if not provider.path.exists():
                raise
            # Another process of the same first start (API and worker together) made it first: use theirs.
    return Keyring.from_provider(provider)


def open_audit_log(settings: Settings, *, keyring: Keyring) -> AuditLog:
    """The audit log; its checkpoints are signed by the key file of their own, never by the keyring."""
    settings.resolved_checkpoint_path.parent.mkdir(parents=True, exist_ok=True)
    return AuditLog(
        keyring=keyring, sink=checkpoint_sink(settings), signing_key=open_audit_signing_key(settings)
    )


def checkpoint_sink(settings: Settings) -> CheckpointSink:
    """The checkpoint file, and with ``CARECANVAS_AUDIT_CHECKPOINT_URL`` a POST of each one to that URL."""
    local = FileCheckpointSink(settings.resolved_checkpoint_path)
    if settings.audit_checkpoint_url is None:
        return local
    return HttpCheckpointSink(settings.audit_checkpoint_url, local=local)  # CheckpointError: a bad URL


def audit_signing_key_problem(settings: Settings, *, may_create: bool = True) -> str | None:
    """Why this process must not start without the audit signing key (None: it exists or may be made now)."""
    path = settings.resolved_audit_signing_key_file
    if path.exists():
        return None
    if may_create and settings.audit_signing_key_file is None and settings.database_url is None:
        holder = existing_data(settings)
        if holder is None:
            return None
        return (
            f"audit signing key file {path} is missing but {holder} already holds data; refusing to start "
            "with a new key that its checkpoints were not signed with. Restore the key file from your backup "
            "(or point CARECANVAS_AUDIT_SIGNING_KEY_FILE at it)."
        )
    return (
        f"audit signing key file {path} is missing; restore it from your backup, or create one for a new "
        "installation with `carecanvas audit keygen` (only the first start of an embedded install on an "
        "empty data directory makes its own)"
    )


def open_audit_signing_key(settings: Settings, *, may_create: bool = True) -> Ed25519PrivateKey:
    """Load ``CARECANVAS_AUDIT_SIGNING_KEY_FILE``; made here only on an embedded install's first start."""
    problem = audit_signing_key_problem(settings, may_create=may_create)
    if problem is not None:
        raise SigningKeyError(problem)
    path = settings.resolved_audit_signing_key_file
    if not path.exists():
        try:
            key = generate_signing_key(path)
        except SigningKeyError:
            if not path.exists():
                raise
            # Another process of the same first start (API and worker together) made it first: use theirs.
        else:
            log.warning("generated a new audit signing key (first start of an embedded install)")
            return key
    return load_signing_key(path)
