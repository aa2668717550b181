"""Session hygiene: no row before the SMART callback succeeds, single-use launch state, expired rows swept."""

from __future__ import annotations

import asyncio
import threading
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from harness import CONDITION, RunningApp, csrf_from, launch_session
from sqlalchemy import delete, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession
from test_launch_security import authorize, outbound_requests, start, token_requests

from sandbox.run import SandboxEHR
from service.app import create_app
from service.cli import main
from service.crypto.keyring import Keyring, new_key_material
from service.db.engine import make_engine, make_sessionmaker, migrate
from service.db.models import Job, SpentLaunchState, WebSession
from service.generation.models import ModelRegistry
from service.generation.readability import caption_grade
from service.jobs import JobKind, JobQueue
from service.sessions import PendingLaunchSeal, hash_session_id, sweep_expired
from service.settings import Settings
from service.workflows import job_caps
from service.workflows.image_jobs import enqueue_image_job
from service.workflows.job_caps import TooManyJobsError

COOKIE = "carecanvas_session"


def count_rows(app: RunningApp, model: type[WebSession] | type[SpentLaunchState]) -> int:
    async def count() -> int:
        async with app.services.sessionmaker() as db:
            return int((await db.execute(select(func.count()).select_from(model))).scalar_one())

    return app.call(count())  # type: ignore[no-any-return]


def target(url: httpx.URL) -> str:
    return url.path + "?" + url.query.decode()


# ---- no row for a launch in flight -------------------------------------------------------------------------


def test_unauthenticated_launches_store_no_session_row(sandbox: SandboxEHR, carecanvas: RunningApp) -> None:
    """Issue 11: 200 unauthenticated /launch requests stored 200 session rows; now they store none."""
    before = count_rows(carecanvas, WebSession)
    answers = []
    with httpx.Client(base_url=carecanvas.url, timeout=30) as client:
        for index in range(200):
            # Four clients (uvicorn trusts X-Forwarded-For from loopback), each inside the launch rate limit.
            client.cookies.clear()
            headers = {"X-Forwarded-For": f"198.51.100.{index % 4 + 1}"}
            answers.append(
                client.get("/launch", params={"iss": sandbox.fhir_base, "launch": "x"}, headers=headers)
            )
    assert [answer.status_code for answer in answers] == [302] * 200
    assert all(answer.cookies[COOKIE].startswith("p1.") for answer in answers)
    # Short-lived: the launch must finish within the pending window (10 minutes), not the session's hour.
    assert "Max-Age=600" in answers[0].headers["set-cookie"]
    assert len(answers[0].headers["set-cookie"]) < 4000
    assert count_rows(carecanvas, WebSession) == before


def test_failed_callbacks_leave_no_row_and_a_good_one_creates_exactly_one(
    sandbox: SandboxEHR, carecanvas: RunningApp
) -> None:
    before = count_rows(carecanvas, WebSession)
    with httpx.Client(base_url=carecanvas.url, timeout=30) as client:
        callback = authorize(start(client, sandbox))
        forged = client.get("/callback", params={"code": callback.params["code"], "state": "forged"})
        assert forged.status_code == 400
        assert count_rows(carecanvas, WebSession) == before
    with httpx.Client(base_url=carecanvas.url, timeout=30) as client:
        finished = client.get(target(authorize(start(client, sandbox))))
        assert finished.status_code == 303
        # A fresh session id, not the pending cookie: a planted pending cookie cannot fix the session.
        assert not client.cookies[COOKIE].startswith("p1.")
        assert "Max-Age=3600" in finished.headers["set-cookie"]
        assert client.get("/app").status_code == 200
    assert count_rows(carecanvas, WebSession) == before + 1


def test_tampered_or_foreign_pending_cookies_are_refused_without_a_token_request(
    sandbox: SandboxEHR, carecanvas: RunningApp
) -> None:
    with httpx.Client(base_url=carecanvas.url, timeout=30) as client:
        callback = authorize(start(client, sandbox))
        sealed = client.cookies[COOKIE]
        launch = carecanvas.services.sessions.open_pending(sealed)
        assert launch is not None
        flipped = sealed[:-5] + ("A" if sealed[-5] != "A" else "B") + sealed[-4:]
        foreign = PendingLaunchSeal(Keyring(new_key_material())).seal(
            launch
        )  # same content, another install's key
        for value in (flipped, foreign, "p1.not-base64!", "p1."):
            client.cookies.set(COOKIE, value)
            with outbound_requests(carecanvas) as sent:
                refused = client.get(target(callback))
            assert refused.status_code == 400, value
            assert "launch CareCanvas again" in refused.text
            assert token_requests(sent) == []
        client.cookies.set(COOKIE, sealed)  # none of the refusals spent the real one
        assert client.get(target(callback)).status_code == 303


def test_a_copied_pending_cookie_finishes_the_launch_only_once(
    sandbox: SandboxEHR, carecanvas: RunningApp
) -> None:
    """The state is single use across browsers: racing or replaying a copied cookie gets one session."""
    with httpx.Client(base_url=carecanvas.url, timeout=30) as victim:
        callback = authorize(start(victim, sandbox))
        sealed = victim.cookies[COOKIE]
        results: list[int] = []

        def finish() -> None:
            with httpx.Client(base_url=carecanvas.url, timeout=30, cookies={COOKIE: sealed}) as copy:
                results.append(copy.get(target(callback)).status_code)

        with outbound_requests(carecanvas) as sent:
            racers = [threading.Thread(target=finish) for _ in range(3)]
            for racer in racers:
                racer.start()
            for racer in racers:
                racer.join()
            finish()  # and once more, after the race
        assert sorted(results) == [303, 400, 400, 400]
        assert len(token_requests(sent)) == 1


# ---- sweeping ---------------------------------------------------------------------------------------------


def test_expired_sessions_and_spent_states_are_swept_at_the_next_sign_in(
    sandbox: SandboxEHR, carecanvas: RunningApp, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 11: nothing deleted expired sessions. Now a sign-in sweeps them (at most every 5 minutes)."""
    with launch_session(carecanvas.url, sandbox) as client:
        id_hash = hash_session_id(client.cookies[COOKIE])
    long_ago = datetime.now(UTC) - timedelta(days=1)

    async def expire() -> None:
        async with carecanvas.services.sessionmaker() as db:
            await db.execute(
                update(WebSession).where(WebSession.id_hash == id_hash).values(expires_at=long_ago)
            )
            db.add(SpentLaunchState(state_hash="0" * 64, expires_at=long_ago))
            await db.commit()

    async def present() -> tuple[bool, bool]:
        async with carecanvas.services.sessionmaker() as db:
            session = await db.get(WebSession, id_hash)
            state = await db.get(SpentLaunchState, "0" * 64)
            return session is not None, state is not None

    carecanvas.call(expire())
    assert carecanvas.call(present()) == (True, True)
    monkeypatch.setattr(carecanvas.services.settings, "session_sweep_seconds", 0.001)
    with launch_session(carecanvas.url, sandbox) as client:
        assert client.get("/app").status_code == 200  # the new session is not swept
    assert carecanvas.call(present()) == (False, False)


def test_sweep_keeps_live_rows_and_the_cli_sweeps_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'carecanvas.db'}"
    now = datetime.now(UTC)

    def row(name: str, expires_at: datetime) -> WebSession:
        return WebSession(id_hash=name, expires_at=expires_at, csrf_token="c", data=b"x", created_at=now)

    async def prepare() -> tuple[int, int]:
        await migrate(url)
        engine = make_engine(url)
        try:
            sessionmaker = make_sessionmaker(engine)
            async with sessionmaker() as db:
                db.add_all([row("old", now - timedelta(seconds=1)), row("live", now + timedelta(hours=1))])
                db.add(SpentLaunchState(state_hash="a" * 64, expires_at=now - timedelta(seconds=1)))
                db.add(SpentLaunchState(state_hash="b" * 64, expires_at=now + timedelta(minutes=10)))
                await db.commit()
            async with sessionmaker() as db:
                swept = await sweep_expired(db)
            async with sessionmaker() as db:
                db.add(row("old-2", now - timedelta(seconds=1)))
                await db.commit()
        finally:
            await engine.dispose()
        return swept.sessions, swept.launch_states

    async def left() -> list[str]:
        engine = make_engine(url)
        try:
            async with make_sessionmaker(engine)() as db:
                return list((await db.execute(select(WebSession.id_hash))).scalars().all())
        finally:
            await engine.dispose()

    assert asyncio.run(prepare()) == (1, 1)
    monkeypatch.setenv("CARECANVAS_DATA_DIR", str(tmp_path))
    assert Settings().resolved_database_url == url
    assert main(["sessions", "sweep"]) == 0
    assert "deleted 1 expired sessions and 0 spent launch states" in capsys.readouterr().out
    assert asyncio.run(left()) == ["live"]


# ---- caps on unfinished jobs ------------------------------------------------------------------------------


def place_running_jobs(
    app: RunningApp, count: int, *, session_id_hash: str, owner_key: str | None
) -> list[str]:
    """Jobs another worker holds (running, long lease): they count as unfinished and no worker takes them."""
    ids = [str(uuid.uuid4()) for _ in range(count)]
    now = datetime.now(UTC)

    async def place() -> None:
        async with app.services.sessionmaker() as db:
            for job_id in ids:
                db.add(
                    Job(
                        id=job_id,
                        kind="illustration",
                        bucket="held-by-test",
                        status="running",
                        lease_owner="test-worker",
                        lease_expires_at=now + timedelta(hours=1),
                        spec=b"-",
                        session_id_hash=session_id_hash,
                        owner_key=owner_key,
                        created_at=now,
                        updated_at=now,
                    )
                )
            await db.commit()

    app.call(place())
    return ids


def remove_jobs(app: RunningApp, ids: list[str]) -> None:
    async def remove() -> None:
        async with app.services.sessionmaker() as db:
            await db.execute(delete(Job).where(Job.id.in_(ids)))
            await db.commit()

    app.call(remove())


def jobs_of(app: RunningApp, session_id_hash: str) -> int:
    async def count() -> int:
        async with app.services.sessionmaker() as db:
            query = select(func.count()).select_from(Job).where(Job.session_id_hash == session_id_hash)
            return int((await db.execute(query)).scalar_one())

    return app.call(count())  # type: ignore[no-any-return]


def user_key(app: RunningApp, user: str = "Practitioner/prac-1") -> str:
    return app.services.keyring.keyed_digest(f"job-owner\x00sandbox\x00{user}")


def test_a_session_at_its_cap_gets_a_clear_page_and_json_and_nothing_is_queued(
    sandbox: SandboxEHR, carecanvas: RunningApp, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 11: one session could queue 200 jobs. Now unfinished jobs per session are capped."""
    monkeypatch.setattr(carecanvas.services.settings, "max_queued_jobs_per_session", 3)
    with launch_session(carecanvas.url, sandbox) as client:
        id_hash = hash_session_id(client.cookies[COOKIE])
        held = place_running_jobs(carecanvas, 3, session_id_hash=id_hash, owner_key=None)
        try:
            workspace = client.get("/app")
            csrf = csrf_from(workspace.text)
            form = {
                "condition_id": CONDITION.findall(workspace.text)[0],
                "style": "flat_vector",
                "language": "en",
            }
            refused = client.post("/illustrations", data={**form, "csrf_token": csrf})
            assert refused.status_code == 429
            assert "You already have 3 pictures waiting to be made." in refused.text
            assert "<h1" in refused.text
            assert "Traceback" not in refused.text
            api = client.post("/api/v1/illustrations", json=form, headers={"X-CSRF-Token": csrf})
            assert api.status_code == 429
            assert api.json()["code"] == "too_many_jobs"
            assert jobs_of(carecanvas, id_hash) == 3  # nothing half-queued: no job, no draft
            remove_jobs(carecanvas, held[:1])  # one finishes: room for one more
            created = client.post("/illustrations", data={**form, "csrf_token": csrf})
            assert created.status_code == 303, created.text
            assert jobs_of(carecanvas, id_hash) == 3
        finally:
            remove_jobs(carecanvas, held)


def test_a_user_at_the_cap_over_all_sessions_is_refused_in_a_new_session(
    sandbox: SandboxEHR, carecanvas: RunningApp, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(carecanvas.services.settings, "max_queued_jobs_per_user", 2)
    held = place_running_jobs(
        carecanvas, 2, session_id_hash="another-session", owner_key=user_key(carecanvas)
    )
    try:
        with launch_session(carecanvas.url, sandbox) as client:
            workspace = client.get("/app")
            form = {
                "condition_id": CONDITION.findall(workspace.text)[0],
                "style": "flat_vector",
                "language": "en",
                "csrf_token": csrf_from(workspace.text),
            }
            refused = client.post("/illustrations", data=form)
            assert refused.status_code == 429
            assert "2 pictures waiting to be made in all your open CareCanvas windows" in refused.text
        with launch_session(carecanvas.url, sandbox, practitioner="prac-2") as other:
            workspace = other.get("/app")
            form["csrf_token"] = csrf_from(workspace.text)
            assert other.post("/illustrations", data=form).status_code == 303  # another user is not capped
    finally:
        remove_jobs(carecanvas, held)


def test_cap_refusals_are_plain_language() -> None:
    for everywhere in (False, True):
        message = TooManyJobsError(job_caps._message(24, everywhere=everywhere)).message
        assert caption_grade(message, "en") <= 6, message


async def test_variants_over_the_cap_queue_none_of_them(tmp_path: Path) -> None:
    """A request for several jobs (a portrait's variants) that would pass the cap queues none."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'carecanvas.db'}"
    await migrate(url)
    engine = make_engine(url)
    keyring = Keyring(new_key_material())
    sessionmaker = make_sessionmaker(engine)
    queue = JobQueue(sessionmaker, keyring)
    model = ModelRegistry.from_dicts(Settings(data_dir=tmp_path).model_entries()).get("carecanvas-tiny-test")
    owner = job_caps.JobOwner(session_id_hash="s", owner_key="u", per_session=3, per_user=10)

    async def enqueue(db: AsyncSession) -> str:
        return await enqueue_image_job(
            db,
            queue=queue,
            model=model,
            kind=JobKind.PORTRAIT,
            prompt="p",
            negative_prompt=None,
            seed=1,
            owner=owner,
        )

    try:
        async with sessionmaker() as db:
            await enqueue(db)
            await db.commit()
        async with sessionmaker() as db:
            await enqueue(db)
            await enqueue(db)  # two of four variants flushed, then the third is one too many
            with pytest.raises(TooManyJobsError):
                await enqueue(db)
            await db.rollback()  # as the faces do on any refusal
        async with sessionmaker() as db:
            assert await job_caps.unfinished_jobs(db, session_id_hash="s") == 1
            assert await job_caps.unfinished_jobs(db, owner_key="u") == 1
    finally:
        await engine.dispose()


async def test_the_app_sweeps_on_a_timer_without_any_sign_in(tmp_path: Path) -> None:
    app = create_app(Settings(data_dir=tmp_path, embedded_worker=False, session_sweep_seconds=0.2))
    async with app.router.lifespan_context(app):
        services = app.state.services
        long_ago = datetime.now(UTC) - timedelta(hours=2)
        async with services.sessionmaker() as db:
            db.add(
                WebSession(
                    id_hash="stale", expires_at=long_ago, csrf_token="c", data=b"x", created_at=long_ago
                )
            )
            await db.commit()
        for _ in range(50):
            await asyncio.sleep(0.1)
            async with services.sessionmaker() as db:
                if await db.get(WebSession, "stale") is None:
                    break
        else:
            raise AssertionError("the expired session was not swept")
