"""Session hygiene: no row before the SMART callback succeeds, single-use launch state, expired rows swept."""

from __future__ import annotations

import asyncio
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from harness import RunningApp, launch_session
from sqlalchemy import func, select, update
from test_launch_security import authorize, outbound_requests, start, token_requests

from sandbox.run import SandboxEHR
from service.cli import main
from service.crypto.keyring import Keyring, new_key_material
from service.db.engine import make_engine, make_sessionmaker, migrate
from service.db.models import SpentLaunchState, WebSession
from service.sessions import PendingLaunchSeal, hash_session_id, sweep_expired
from service.settings import Settings

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
