"""/readyz tells the truth: not ready while the data dir cannot be written or the database cannot commit."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
import subprocess
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import event, text

from service.app import create_app
from service.audit.signing_key import generate_signing_key
from service.crypto.keyring import Keyring, LocalKeyFileProvider
from service.db.engine import make_engine, make_sessionmaker, migrate
from service.readiness import ReadinessProbe, write_probe_file
from service.settings import Settings

POSTGRES = "postgresql+psycopg://postgres@127.0.0.1:{port}/test?options=-csearch_path%3D{schema}"


@contextlib.asynccontextmanager
async def app_client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1:8000") as client,
    ):
        yield client


async def readyz_until(client: httpx.AsyncClient, status: int, *, within: float = 15) -> dict[str, Any]:
    """Poll /readyz (its answer is cached briefly) until it answers `status`; returns that body."""
    deadline = asyncio.get_running_loop().time() + within
    while True:
        answer = await client.get("/readyz")
        if answer.status_code == status:
            return answer.json()  # type: ignore[no-any-return]
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"/readyz stayed {answer.status_code}: {answer.text}")
        await asyncio.sleep(0.1)


# ---- a data dir on a real, small tmpfs that fills up ----------------------------------------------------


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    mount_point = tmp_path / "data"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount_point)],
        capture_output=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.decode().strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def fill(directory: Path) -> Path:
    """Write until the filesystem refuses (ENOSPC); returns the filler file."""
    filler = directory / "filler"
    with filler.open("wb") as out, contextlib.suppress(OSError):
        while True:
            out.write(b"\0" * 65536)
            out.flush()
            os.fsync(out.fileno())
    return filler


async def test_full_data_dir_makes_readyz_503_with_the_reason_and_recovery_makes_it_ready(
    small_tmpfs: Path,
) -> None:
    """Issue 11: with the data dir full, /readyz stayed 200 "ready" while every write failed."""
    # An embedded install: the keys and the SQLite database live in the data dir too.
    settings = Settings(data_dir=small_tmpfs, embedded_worker=False, readiness_cache_seconds=0.2)
    async with app_client(settings) as client:
        assert (await client.get("/readyz")).json() == {"status": "ready"}
        filler = fill(small_tmpfs)
        with pytest.raises(OSError, match="No space left"):
            write_probe_file(small_tmpfs)  # the disk is really full
        body = await readyz_until(client, 503)
        assert body["status"] == "not ready"
        assert "data_dir" in body["reason"]
        assert body["checks"]["data_dir"] == "cannot write (ENOSPC: No space left on device)"
        assert str(small_tmpfs) not in str(body)  # no paths in a public answer
        metrics = (await client.get("/metrics")).text
        assert "carecanvas_ready 0.0" in metrics
        filler.unlink()  # space comes back
        assert await readyz_until(client, 200) == {"status": "ready"}
    assert leftovers(small_tmpfs) == []


def leftovers(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.iterdir() if path.name.startswith(".readyz"))


async def test_a_data_dir_that_is_gone_is_not_ready(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    settings = Settings(data_dir=data_dir, embedded_worker=False, readiness_cache_seconds=0)
    async with app_client(settings) as client:
        assert (await client.get("/readyz")).status_code == 200
        moved = tmp_path / "moved"
        data_dir.rename(moved)
        data_dir.write_text("not a directory")  # a file where the directory was
        try:
            body = (await client.get("/readyz")).json()
            assert body["checks"]["data_dir"].startswith("cannot write (ENOTDIR")
        finally:
            data_dir.unlink()
            moved.rename(data_dir)
        assert (await client.get("/readyz")).status_code == 200


# ---- a real PostgreSQL that refuses or cannot commit ----------------------------------------------------


class TcpProxy:
    """A loopback TCP forwarder to PostgreSQL that can be cut (connections dropped, new ones refused)."""

    def __init__(self, upstream_port: int = 5432) -> None:
        self.upstream_port = upstream_port
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = int(probe.getsockname()[1])
        self._sockets: list[socket.socket] = []
        self._listener: socket.socket | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen()
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        with self._lock:
            if self._listener is not None:
                # shutdown first: a close alone does not wake the thread blocked in accept(), which would
                # keep accepting.
                with contextlib.suppress(OSError):
                    self._listener.shutdown(socket.SHUT_RDWR)
                self._listener.close()
                self._listener = None
            for sock in self._sockets:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
            self._sockets.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            with self._lock:
                self._sockets += [client, upstream]
            for source, target in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, target), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, target: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while chunk := source.recv(65536):
                target.sendall(chunk)
        with contextlib.suppress(OSError):
            target.shutdown(socket.SHUT_WR)


@pytest.fixture
async def pg_schema() -> AsyncIterator[str]:
    schema = f"cc_ready_{secrets.token_hex(5)}"
    admin = make_engine(POSTGRES.format(port=5432, schema="public"))
    async with admin.begin() as connection:
        await connection.execute(text(f'CREATE SCHEMA "{schema}"'))
    try:
        yield schema
    finally:
        async with admin.begin() as connection:
            await connection.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        await admin.dispose()


@pytest.mark.postgres
async def test_postgres_that_refuses_connections_or_cannot_commit_is_not_ready(
    pg_schema: str, tmp_path: Path
) -> None:
    # Not an embedded install (a database URL is set): its keys come from `keys generate` and `audit keygen`.
    Keyring.from_provider(LocalKeyFileProvider.generate(tmp_path / "keys.json"))
    generate_signing_key(tmp_path / "audit-signing-key.pem")
    proxy = TcpProxy()
    proxy.start()
    settings = Settings(
        data_dir=tmp_path,
        database_url=POSTGRES.format(port=proxy.port, schema=pg_schema),
        migrate_on_start=True,
        embedded_worker=False,
        readiness_cache_seconds=0,
        readiness_timeout_seconds=1,
    )
    try:
        async with app_client(settings) as client:
            assert (await client.get("/readyz")).status_code == 200
            proxy.cut()  # the server goes away: open connections drop, new ones are refused
            body = await readyz_until(client, 503)
            assert body["reason"] == "database"
            assert body["checks"]["database"].startswith("cannot commit (")
            proxy.start()
            await readyz_until(client, 200)
            # Reads still work but a write cannot commit (the probe's table is locked): not ready either,
            # where the old SELECT 1 said "ready".
            blocker = make_engine(POSTGRES.format(port=5432, schema=pg_schema))
            try:
                async with blocker.connect() as connection:
                    await connection.execute(text("BEGIN"))
                    await connection.execute(text("LOCK TABLE readiness_probes IN EXCLUSIVE MODE"))
                    body = await readyz_until(client, 503)
                    assert body["checks"] == {"database": "did not commit within 1 s"}
                    await connection.execute(text("ROLLBACK"))
            finally:
                await blocker.dispose()
            await readyz_until(client, 200)
    finally:
        proxy.cut()


async def test_one_probe_at_a_time_and_answers_are_cached(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'carecanvas.db'}"
    await migrate(url)
    engine = make_engine(url)
    statements: list[str] = []
    event.listen(engine.sync_engine, "before_cursor_execute", lambda *args: statements.append(args[2]))
    now = [0.0]
    probe = ReadinessProbe(
        sessionmaker=make_sessionmaker(engine), data_dir=tmp_path, cache_seconds=2, clock=lambda: now[0]
    )
    try:
        answers = await asyncio.gather(*(probe.check() for _ in range(20)))
        assert all(answer.ready for answer in answers)
        writes = [s for s in statements if "readiness_probes" in s]
        assert len(writes) == 1
        now[0] = 1.9
        await probe.check()
        assert len([s for s in statements if "readiness_probes" in s]) == 1
        now[0] = 2.0
        await probe.check()
        assert len([s for s in statements if "readiness_probes" in s]) == 2
    finally:
        await engine.dispose()
