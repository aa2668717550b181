"""SQLite's read path (docs/decisions/0004): read sessions never take or wait for the writer lock and refuse
writes; in one process writers queue for one connection instead of polling SQLite's busy handler."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from service.db.engine import make_engine, make_read_sessionmaker, make_sessionmaker, migrate, read_engine


@pytest.fixture
async def sqlite_url(tmp_path: Path) -> str:
    url = f"sqlite+aiosqlite:///{tmp_path / 'carecanvas.db'}"
    await migrate(url)
    return url


async def test_a_read_session_reads_the_last_commit_while_a_writer_holds_the_lock(sqlite_url: str) -> None:
    writer_engine = make_engine(sqlite_url)
    other_process = make_engine(sqlite_url)  # a separate worker: its own connection to the same file
    try:
        writes, reads = make_sessionmaker(writer_engine), make_read_sessionmaker(writer_engine)
        async with writes() as db:
            await db.execute(text("CREATE TABLE t (x INTEGER)"))
            await db.execute(text("INSERT INTO t VALUES (1)"))
            await db.commit()
        async with make_sessionmaker(other_process)() as holder:
            await holder.execute(text("INSERT INTO t VALUES (2)"))  # BEGIN IMMEDIATE: the lock is held
            async with reads() as db:
                # Waiting would take the 30 s busy timeout; a reader sees the last commit at once.
                seen = await asyncio.wait_for(db.execute(text("SELECT sum(x) FROM t")), timeout=10)
                assert seen.scalar_one() == 1
            await holder.commit()
        async with reads() as db:
            assert (await db.execute(text("SELECT sum(x) FROM t"))).scalar_one() == 3
    finally:
        await other_process.dispose()
        await writer_engine.dispose()


async def test_a_read_session_refuses_to_write(sqlite_url: str) -> None:
    engine = make_engine(sqlite_url)
    try:
        async with make_read_sessionmaker(engine)() as db:
            with pytest.raises(OperationalError, match="readonly"):
                await db.execute(text("CREATE TABLE sneaky (x INTEGER)"))
        async with make_sessionmaker(engine)() as db:
            tables = await db.execute(text("SELECT count(*) FROM sqlite_master WHERE name = 'sneaky'"))
            assert tables.scalar_one() == 0
    finally:
        await engine.dispose()


async def test_writers_in_one_process_take_turns_on_one_connection(sqlite_url: str) -> None:
    engine = make_engine(sqlite_url)
    try:
        assert engine.sync_engine.pool.size() == 1  # type: ignore[attr-defined]
        writes = make_sessionmaker(engine)
        async with writes() as db:
            await db.execute(text("CREATE TABLE n (x INTEGER)"))
            await db.commit()
        order: list[str] = []

        async def writer(name: str) -> None:
            async with writes() as db:
                value = (await db.execute(text("SELECT count(*) FROM n"))).scalar_one()
                order.append(name)
                await asyncio.sleep(0.01)  # read-then-write while others wait: no lost update
                await db.execute(text("INSERT INTO n VALUES (:v)"), {"v": value})
                await db.commit()

        await asyncio.gather(*(writer(f"w{i}") for i in range(8)))
        async with make_read_sessionmaker(engine)() as db:
            values = (await db.execute(text("SELECT x FROM n ORDER BY x"))).scalars().all()
        assert values == list(range(8))  # each saw every earlier commit: serialised, none failed
        assert len(order) == 8
    finally:
        await engine.dispose()


async def test_the_read_pool_is_disposed_with_the_writer(sqlite_url: str) -> None:
    engine = make_engine(sqlite_url)
    reader = read_engine(engine)
    assert reader is not engine
    assert read_engine(engine) is reader  # one sibling per writer engine
    async with make_read_sessionmaker(engine)() as db:
        await db.execute(text("SELECT 1"))
    assert reader.sync_engine.pool.checkedin() == 1  # type: ignore[attr-defined]
    await engine.dispose()
    assert reader.sync_engine.pool.checkedin() == 0  # type: ignore[attr-defined]
    assert read_engine(engine) is not reader  # a later use builds a fresh sibling


@pytest.mark.postgres
async def test_postgres_reads_use_the_same_engine() -> None:
    engine = make_engine("postgresql+psycopg://postgres@127.0.0.1:5432/test")
    try:
        assert read_engine(engine) is engine
        async with make_read_sessionmaker(engine)() as db:
            assert (await db.execute(text("SELECT 1"))).scalar_one() == 1
    finally:
        await engine.dispose()
