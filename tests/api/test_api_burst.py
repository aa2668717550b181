"""A burst of queuing POSTs over HTTP shares write transactions (group commit, docs/decisions/0005).

Before, each POST took SQLite's one writer connection for a transaction of its own and held it across
several awaits on a busy event loop: 64 POSTs queued one behind another for the writer (the serving
benchmark's POST p50 of ~0.9 s was spent waiting there)."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from typing import Any

import httpx
from api_client import API, ApiSession
from harness import RunningApp
from sqlalchemy import event

BURST = 12


def job_insert_transactions(carecanvas: RunningApp) -> tuple[list[int], Any]:
    """The ordinal of the write transaction each INSERT INTO jobs ran in, recorded as the app runs."""
    began = [0]
    seen: list[int] = []

    def on_begin(_connection: Any) -> None:
        began[0] += 1

    def on_execute(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if statement.lstrip().upper().startswith("INSERT INTO JOBS"):
            seen.append(began[0])

    engine = carecanvas.services.engine.sync_engine
    event.listen(engine, "begin", on_begin)
    event.listen(engine, "before_cursor_execute", on_execute)

    def remove() -> None:
        event.remove(engine, "begin", on_begin)
        event.remove(engine, "before_cursor_execute", on_execute)

    return seen, remove


async def post_burst(clinician: ApiSession, base_url: str) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=base_url, cookies=clinician.client.cookies, timeout=60) as client:
        body = {"condition_id": "cond-1-diabetes", "style": "flat_vector", "language": "en"}
        headers = {"X-CSRF-Token": clinician.csrf}
        return list(
            await asyncio.gather(
                *(client.post(f"{API}/illustrations", json=body, headers=headers) for _ in range(BURST))
            )
        )


def test_a_burst_of_queuing_posts_shares_write_transactions(
    carecanvas: RunningApp, clinician: ApiSession
) -> None:
    database = carecanvas.services.engine.url.database
    assert database, "the API tests run on a SQLite file"
    seen, remove = job_insert_transactions(carecanvas)
    # Another process holds the writer lock while the burst arrives (as a separate worker storing a batch
    # would): every POST reads its Condition and then waits for the writer.
    holder = sqlite3.connect(database, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    answers: list[httpx.Response] = []
    burst = lambda: answers.extend(asyncio.run(post_burst(clinician, carecanvas.url)))  # noqa: E731
    sender = threading.Thread(target=burst)
    try:
        sender.start()
        time.sleep(3)  # the burst's EHR reads are done; its writes are waiting
        holder.execute("COMMIT")
        sender.join(timeout=60)
    finally:
        holder.close()
        remove()
    assert [answer.status_code for answer in answers] == [201] * BURST, [a.text[:200] for a in answers]
    assert len({answer.json()["job_id"] for answer in answers}) == BURST
    assert len(seen) == BURST
    # The first POST's unit opened a transaction alone; the other 11 queued and share the next one.
    # (One transaction per POST before: 12.)
    assert len(set(seen)) <= 2, seen
