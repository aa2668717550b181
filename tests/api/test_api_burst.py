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
from sqlalchemy import event, text

BURST = 12


def job_insert_transactions(carecanvas: RunningApp) -> tuple[list[int], Any]:
    """The ordinal of the write transaction each INSERT INTO jobs statement ran in, as the app runs."""
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


async def post_burst(clinician: ApiSession, base_url: str, size: int = BURST) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=base_url, cookies=clinician.client.cookies, timeout=60) as client:
        body = {"condition_id": "cond-1-diabetes", "style": "flat_vector", "language": "en"}
        headers = {"X-CSRF-Token": clinician.csrf}
        return list(
            await asyncio.gather(
                *(client.post(f"{API}/illustrations", json=body, headers=headers) for _ in range(size))
            )
        )


def burst_while_the_writer_is_held(
    carecanvas: RunningApp, clinician: ApiSession, size: int = BURST
) -> list[httpx.Response]:
    """Another process holds SQLite's writer lock while the burst arrives (as a separate worker storing a
    batch would): every POST reads its Condition, then waits for the writer; then the lock is let go."""
    database = carecanvas.services.engine.url.database
    assert database, "the API tests run on a SQLite file"
    holder = sqlite3.connect(database, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    answers: list[httpx.Response] = []
    burst = lambda: answers.extend(asyncio.run(post_burst(clinician, carecanvas.url, size)))  # noqa: E731
    sender = threading.Thread(target=burst)
    try:
        sender.start()
        time.sleep(3)  # the burst's EHR reads are done; its writes are waiting
        holder.execute("COMMIT")
        sender.join(timeout=60)
    finally:
        holder.close()
    return answers


def job_counts(carecanvas: RunningApp) -> tuple[int, int]:
    """All jobs, and the unfinished ones, in the app's database."""

    async def count() -> tuple[int, int]:
        async with carecanvas.services.sessionmaker() as db:
            query = "SELECT count(*), sum(status IN ('queued', 'running')) FROM jobs"
            total, unfinished = (await db.execute(text(query))).one()
            return int(total), int(unfinished or 0)

    return carecanvas.call(count())  # type: ignore[no-any-return]


def wait_until_idle(carecanvas: RunningApp) -> None:
    deadline = time.monotonic() + 60
    while job_counts(carecanvas)[1]:
        assert time.monotonic() < deadline, "the jobs did not finish"
        time.sleep(0.2)


def test_a_burst_of_queuing_posts_shares_write_transactions(
    carecanvas: RunningApp, clinician: ApiSession
) -> None:
    seen, remove = job_insert_transactions(carecanvas)
    try:
        answers = burst_while_the_writer_is_held(carecanvas, clinician)
    finally:
        remove()
    assert [answer.status_code for answer in answers] == [201] * BURST, [a.text[:200] for a in answers]
    assert len({answer.json()["job_id"] for answer in answers}) == BURST
    # The first POST's unit opened a transaction alone; the other 11 queued and share the next one.
    # (One transaction per POST before: 12.)
    assert len(set(seen)) <= 2, seen
    # The audit records written together link onto the chain like any others.
    verdict = carecanvas.call(verify_chain_now(carecanvas))
    assert verdict.ok, verdict.reason


async def verify_chain_now(carecanvas: RunningApp) -> Any:
    services = carecanvas.services
    async with services.sessionmaker() as db:
        return await services.audit.verify(db)


def test_the_job_cap_is_exact_within_a_burst_that_shares_a_transaction(
    carecanvas: RunningApp, clinician: ApiSession
) -> None:
    """Six POSTs of one session at a cap of 3, all in one group: three queued, three refused (429), and
    nothing of a refused one written."""
    wait_until_idle(carecanvas)
    settings = carecanvas.services.settings
    cap, settings.max_queued_jobs_per_session = settings.max_queued_jobs_per_session, 3
    before, _ = job_counts(carecanvas)
    try:
        answers = burst_while_the_writer_is_held(carecanvas, clinician, size=6)
    finally:
        settings.max_queued_jobs_per_session = cap
    statuses = sorted(answer.status_code for answer in answers)
    assert statuses == [201, 201, 201, 429, 429, 429], [a.text[:200] for a in answers]
    refused = [answer.json() for answer in answers if answer.status_code == 429]
    assert all(body["code"] == "too_many_jobs" for body in refused), refused
    assert job_counts(carecanvas)[0] == before + 3
