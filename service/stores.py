"""Opening the stores a process needs: the database (migrated), the keyring, the audit log."""

from __future__ import annotations

import structlog
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from service.audit import AuditLog, FileCheckpointSink
from service.crypto import Keyring, LocalKeyFileProvider
from service.db.engine import make_engine, make_sessionmaker, migrate
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


def open_keyring(settings: Settings, *, create_if_missing: bool | None = None) -> Keyring:
    """Embedded mode makes its own key file on first start; anywhere else a missing key fails closed."""
    path = settings.resolved_kek_file
    if create_if_missing is None:
        create_if_missing = settings.kek_file is None
    if not path.exists():
        if not create_if_missing:
            raise FileNotFoundError(f"key file {path} is missing; refusing to start without keys")
        path.parent.mkdir(parents=True, exist_ok=True)
        LocalKeyFileProvider.generate(path)
        log.warning("generated a new local key file (embedded mode)", url_path=str(path))
    return Keyring.from_provider(LocalKeyFileProvider(path))


def open_audit_log(settings: Settings, *, keyring: Keyring) -> AuditLog:
    settings.resolved_checkpoint_path.parent.mkdir(parents=True, exist_ok=True)
    return AuditLog(keyring=keyring, sink=FileCheckpointSink(settings.resolved_checkpoint_path))
