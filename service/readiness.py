"""Readiness: can this process commit to its database and write its data directory? Probed by writing, cached.

A SELECT answers while the disk is full, so the probe writes: it rewrites one row of `readiness_probes`
(committed) and writes, syncs and removes a small file in the data directory. At most one probe runs at a
time and its answer is reused for `cache_seconds`, so a flood of /readyz costs at most one write each time.
"""

from __future__ import annotations

import asyncio
import errno
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path

from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from service.db.models import ReadinessProbe as ProbeRow

PROBE_FILE_BYTES = 4096


class Check(StrEnum):
    """What readiness depends on."""

    DATABASE = "database"
    DATA_DIR = "data_dir"


@dataclass(frozen=True)
class Readiness:
    """The failed checks with a short reason each (no paths, URLs or server messages); empty when ready."""

    failures: dict[Check, str] = field(default_factory=dict)

    @property
    def ready(self) -> bool:
        return not self.failures

    def body(self) -> dict[str, object]:
        if self.ready:
            return {"status": "ready"}
        return {
            "status": "not ready",
            "reason": ", ".join(check.value for check in self.failures),
            "checks": {check.value: reason for check, reason in self.failures.items()},
        }


class ReadinessProbe:
    """One per process; `check()` answers from the cache or runs the probe (once, however many ask)."""

    def __init__(
        self,
        *,
        sessionmaker: async_sessionmaker[AsyncSession],
        data_dir: Path | None,
        probe_name: str = "api",
        cache_seconds: float = 2.0,
        timeout_seconds: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._sessionmaker = sessionmaker
        self._data_dir = data_dir
        self._name = probe_name
        self._cache_seconds = cache_seconds
        self._timeout = timeout_seconds
        self._clock = clock
        self._lock = asyncio.Lock()
        self._last: tuple[float, Readiness] | None = None

    async def check(self) -> Readiness:
        cached = self._fresh()
        if cached is not None:
            return cached
        async with self._lock:
            cached = self._fresh()  # another request probed while this one waited
            if cached is not None:
                return cached
            database, data_dir = await asyncio.gather(self._database(), self._directory())
            answers = {Check.DATABASE: database, Check.DATA_DIR: data_dir}
            readiness = Readiness({check: reason for check, reason in answers.items() if reason is not None})
            self._last = (self._clock(), readiness)
            return readiness

    def _fresh(self) -> Readiness | None:
        if self._last is None or self._clock() - self._last[0] >= self._cache_seconds:
            return None
        return self._last[1]

    async def _database(self) -> str | None:
        try:
            await asyncio.wait_for(self._commit(), timeout=self._timeout)
        except TimeoutError:
            return f"did not commit within {self._timeout:g} s"
        except (SQLAlchemyError, OSError) as error:
            return f"cannot commit ({type(error).__name__})"
        return None

    async def _commit(self) -> None:
        async with self._sessionmaker() as db:
            dialect = db.get_bind().dialect.name
            insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
            now = datetime.now(UTC)
            statement = insert(ProbeRow).values(name=self._name, checked_at=now)
            await db.execute(
                statement.on_conflict_do_update(index_elements=["name"], set_={"checked_at": now})
            )
            await db.commit()

    async def _directory(self) -> str | None:
        if self._data_dir is None:
            return None
        try:
            await asyncio.wait_for(asyncio.to_thread(write_probe_file, self._data_dir), timeout=self._timeout)
        except TimeoutError:
            return f"could not write within {self._timeout:g} s"
        except OSError as error:
            name = errno.errorcode.get(error.errno or 0, "error")
            return f"cannot write ({name}: {os.strerror(error.errno) if error.errno else 'unknown'})"
        return None


def write_probe_file(directory: Path) -> None:
    """Create, fill, fsync and remove a small file: fails on a full, read-only or missing directory."""
    path = directory / f".readyz-{secrets.token_hex(4)}"
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        if os.write(descriptor, b"\0" * PROBE_FILE_BYTES) != PROBE_FILE_BYTES:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # a short write: the disk is all but full
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
        path.unlink(missing_ok=True)
