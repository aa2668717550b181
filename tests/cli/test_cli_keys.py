"""`carecanvas keys …` against real stores: retire refuses while data is wrapped, every operation is audited,
a missing key file is a hard error, and a rotation while a real worker process runs loses no job."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import structlog
from sqlalchemy import text

from service.audit import AuditLog
from service.cli import main
from service.crypto import Keyring, LocalKeyFileProvider, SecretFileKeyProvider
from service.crypto.keyring import KeyringError
from service.crypto.rotation import key_usage, not_on_primary
from service.db.engine import make_engine, make_sessionmaker, migrate
from service.documents import DraftContent, create_draft
from service.generation.engine import ImageRequest, bucket_key
from service.generation.tiny import TINY_MODEL_NAME
from service.jobs import JobQueue
from service.settings import Settings
from service.stores import open_audit_log, open_database, open_keyring

POSTGRES_SERVER = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
KEY_ACTIONS = ("keys.generate", "keys.add", "keys.promote", "keys.reencrypt", "keys.retire", "keys.rotate")


@pytest.fixture(autouse=True)
def _reset_logging() -> Iterator[None]:
    yield
    structlog.reset_defaults()  # the key commands configure logging for their process


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def spec(seed: int) -> dict[str, object]:
    return {
        "model": TINY_MODEL_NAME,
        "prompt": "a calm garden",
        "negative_prompt": None,
        "seed": seed,
        "width": 64,
        "height": 64,
        "steps": 2,
        "guidance": 1.0,
    }


BUCKET = bucket_key(ImageRequest("b", "p", None, 0, 64, 64, 2, 1.0), TINY_MODEL_NAME)


async def enqueue_jobs(settings: Settings, count: int, *, audit_records: int = 0) -> list[str]:
    """What the API writes: job specs, drafts and audit records, each encrypted."""
    engine, sessionmaker = await open_database(settings)
    keyring = open_keyring(settings)
    queue = JobQueue(sessionmaker, keyring)
    audit = open_audit_log(settings, keyring=keyring)  # a first start makes its signing key too
    try:
        ids = []
        async with sessionmaker() as db, db.begin():
            for n in range(count):
                job_id = await queue.enqueue(
                    db, kind="illustration", bucket=BUCKET, spec=spec(n), session_id_hash=None
                )
                await create_draft(
                    db,
                    keyring=keyring,
                    job_id=job_id,
                    ehr_name="sandbox",
                    content=DraftContent(title=f"draft {n}"),
                )
                ids.append(job_id)
            for n in range(audit_records):
                await audit.append(
                    db,
                    action="fhir.read",
                    outcome="success",
                    actor="Practitioner/prac-1",
                    patient="pat-1",
                    ehr="sandbox",
                    resource="Condition",
                    request_id=f"req-{n}",
                    detail={"n": n},
                )
        return ids
    finally:
        await engine.dispose()


async def key_records(settings: Settings) -> list[tuple[str, str, dict]]:
    """(action, outcome, detail) of the key operations in the audit log, oldest first."""
    engine, sessionmaker = await open_database(settings)
    try:
        audit = AuditLog(open_keyring(settings, create_if_missing=False))
        async with sessionmaker() as db:
            entries = await audit.search(db, limit=1000)
        return [
            (entry.action, entry.outcome, dict(entry.detail))
            for entry in reversed(entries)
            if entry.action in KEY_ACTIONS
        ]
    finally:
        await engine.dispose()


@pytest.fixture
def embedded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """An embedded install after its first start (keys made on the empty data dir) and some use."""
    monkeypatch.setenv("CARECANVAS_DATA_DIR", str(tmp_path / "data"))
    for name in ("CARECANVAS_KEK_FILE", "CARECANVAS_KEK_SECRET_FILE", "CARECANVAS_DATABASE_URL"):
        monkeypatch.delenv(name, raising=False)
    settings = Settings()
    asyncio.run(enqueue_jobs(settings, 2, audit_records=3))
    assert settings.resolved_kek_file.exists()  # the first start on an empty data dir made the keys
    return settings


def primary_of(settings: Settings) -> str:
    return LocalKeyFileProvider(settings.resolved_kek_file).load().primary_kek_id


def test_retire_refuses_while_data_is_still_wrapped_and_every_step_is_audited(
    embedded: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    old = primary_of(embedded)
    assert main(["keys", "add"]) == 0
    new = capsys.readouterr().out.strip()
    assert main(["keys", "promote", new]) == 0
    capsys.readouterr()

    assert main(["keys", "retire", old]) == 1
    err = capsys.readouterr().err
    assert f"key {old} still wraps 2 job specs, 2 document drafts, 4 audit payloads" in err
    # (the fourth audit payload is the record of `keys add`, written before the promotion)
    assert "keys reencrypt" in err
    assert "Traceback" not in err
    assert old in LocalKeyFileProvider(embedded.resolved_kek_file).load().keks  # nothing was retired

    assert main(["keys", "reencrypt", "--batch-size", "2"]) == 0
    out = capsys.readouterr().out
    assert f"onto {new}" in out
    assert "pass 1: job specs: 2/2" in out
    assert main(["keys", "retire", old]) == 0
    assert f"retired {old}" in capsys.readouterr().out
    assert set(LocalKeyFileProvider(embedded.resolved_kek_file).load().keks) == {new}
    assert main(["keys", "retire", new]) == 1  # the primary
    assert "primary key cannot be retired" in capsys.readouterr().err

    records = asyncio.run(key_records(embedded))
    assert [(action, outcome) for action, outcome, _ in records] == [
        ("keys.add", "success"),
        ("keys.promote", "success"),
        ("keys.retire", "denied"),
        ("keys.reencrypt", "success"),
        ("keys.retire", "success"),
        ("keys.retire", "denied"),
    ]
    assert records[0][2] == {"kid": new}
    assert records[1][2] == {"kid": new, "previous_primary": old}
    assert records[2][2]["still_wrapped"] == {
        "web sessions": 0,
        "job specs": 2,
        "artifacts": 0,
        "document drafts": 2,
        "audit payloads": 4,
        "portrait reviews": 0,
        "portrait notes": 0,
    }
    assert records[3][2]["remaining"] == dict.fromkeys(records[3][2]["remaining"], 0)
    # Everything is still readable with the keyring as it is now.
    assert main(["audit", "export"]) == 0
    assert len([line for line in capsys.readouterr().out.splitlines() if line.strip()]) >= 3


def test_keys_list_is_read_only_and_shows_no_key_material(
    embedded: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    before = snapshot(embedded.data_dir)
    assert main(["keys", "list"]) == 0
    listed = json.loads(capsys.readouterr().out)
    material = LocalKeyFileProvider(embedded.resolved_kek_file).load()
    assert listed["primary"] == material.primary_kek_id
    assert listed["keys"] == sorted(material.keks)
    assert all(key.hex() not in json.dumps(listed) for key in material.keks.values())
    assert snapshot(embedded.data_dir) == before


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {
        str(path.relative_to(folder)): (path.stat().st_size, path.stat().st_mtime_ns)
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def cli_process(
    args: list[str], env: dict[str, str], timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "service.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def clean_env(**values: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("CARECANVAS_")}
    env.update({"HF_HUB_OFFLINE": "1", **values})
    return env


def test_a_missing_key_file_beside_existing_data_is_a_hard_error_in_embedded_mode(
    embedded: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    embedded.resolved_kek_file.unlink()  # lost, or a volume mounted without it
    before = snapshot(embedded.data_dir)
    with pytest.raises(KeyringError, match="already holds encrypted data"):
        open_keyring(embedded)
    env = clean_env(
        CARECANVAS_DATA_DIR=str(embedded.data_dir),
        CARECANVAS_WORKER_METRICS_PORT=str(free_port()),
        CARECANVAS_DEVICE="cpu",
    )
    for args, rc, message in (
        (["serve", "--port", str(free_port())], 2, "already holds encrypted data"),
        (["worker", "--metrics-host", "127.0.0.1"], 2, "already holds encrypted data"),
        (["audit", "export"], 2, "is missing; restore it from your backup"),
        (["keys", "list"], 2, "is missing; restore it from your backup"),
        (["keys", "generate"], 1, "already holds encrypted data that new keys could not read"),
    ):
        result = cli_process(args, env)
        assert result.returncode == rc, (args, result.stderr[-2000:])
        assert message in result.stderr, (args, result.stderr[-2000:])
        assert "Traceback" not in result.stderr
    # Read-only verification does not need the data keys and must not make any.
    verify = cli_process(["audit", "verify"], env)
    assert "Traceback" not in verify.stderr
    assert not embedded.resolved_kek_file.exists()
    assert snapshot(embedded.data_dir) == before  # nothing at all was written


def test_read_only_commands_on_an_empty_data_dir_create_nothing(tmp_path: Path) -> None:
    data = tmp_path / "data"
    env = clean_env(CARECANVAS_DATA_DIR=str(data))
    for args in (["keys", "list"], ["audit", "export"]):
        result = cli_process(args, env)
        assert result.returncode == 2
        assert "keys generate" in result.stderr
    assert not data.exists()


def test_keys_generate_makes_keys_once_and_audits_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.setenv("CARECANVAS_DATA_DIR", str(tmp_path / "data"))
    assert main(["keys", "generate"]) == 0
    settings = Settings()
    kid = primary_of(settings)
    assert main(["keys", "generate"]) == 1
    assert "refusing to overwrite keys" in capsys.readouterr().err
    assert asyncio.run(key_records(settings)) == [("keys.generate", "success", {"kid": kid})]


def test_a_mounted_secret_is_used_but_never_changed_by_key_commands(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    secret = tmp_path / "secrets" / "kek-keyring.json"
    LocalKeyFileProvider.generate(secret)
    secret.chmod(0o440)
    monkeypatch.setenv("CARECANVAS_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("CARECANVAS_KEK_SECRET_FILE", str(secret))
    settings = Settings()
    asyncio.run(enqueue_jobs(settings, 1))
    content = secret.read_bytes()
    assert main(["keys", "add"]) == 1
    assert "read-only" in capsys.readouterr().err
    assert main(["keys", "reencrypt"]) == 0  # re-wrapping onto the Secret's primary needs no change to it
    assert secret.read_bytes() == content
    assert not settings.resolved_kek_file.exists()
    records = asyncio.run(key_records(settings))
    assert [(action, outcome) for action, outcome, _ in records] == [
        ("keys.add", "denied"),
        ("keys.reencrypt", "success"),
    ]
    assert "read-only" in records[0][2]["reason"]
    assert isinstance(Keyring.from_provider(SecretFileKeyProvider(secret)).provider, SecretFileKeyProvider)


async def _wait_all_finished(queue: JobQueue, job_ids: list[str], worker: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        views = [await queue.get(job_id) for job_id in job_ids]
        if all(view is not None and view.finished for view in views):
            return
        if worker.poll() is not None:
            raise AssertionError("the worker exited early")
        await asyncio.sleep(0.2)
    raise AssertionError("the worker did not finish the jobs")


async def test_rotate_while_a_worker_process_runs_loses_no_job(db_url: str, tmp_path: Path) -> None:
    await migrate(db_url)
    env = clean_env(
        CARECANVAS_DATA_DIR=str(tmp_path / "data"),
        CARECANVAS_DATABASE_URL=db_url,
        CARECANVAS_KEK_FILE=str(tmp_path / "keys" / "keys.json"),
        CARECANVAS_DEVICE="cpu",
        CARECANVAS_WORKER_METRICS_PORT=str(free_port()),
        CARECANVAS_WORKER_POLL_SECONDS="0.05",
        CARECANVAS_WORKER_BATCH_SIZE="2",
        CARECANVAS_WORKER_PREVIEWS="true",
    )
    # A new installation with its own database: data keys and the audit signing key are made explicitly.
    for command in (["keys", "generate"], ["audit", "keygen"]):
        made = await asyncio.to_thread(cli_process, command, env)
        assert made.returncode == 0, made.stdout + made.stderr
    settings = Settings(
        data_dir=tmp_path / "data", database_url=db_url, kek_file=tmp_path / "keys" / "keys.json"
    )
    old = primary_of(settings)
    job_ids = await enqueue_jobs(settings, 8)
    worker = await asyncio.to_thread(
        subprocess.Popen,
        [sys.executable, "-m", "service.cli", "worker", "--metrics-host", "127.0.0.1"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    # The API side: its keyring is loaded before the rotation, like a running API process.
    engine = make_engine(db_url)
    keyring = open_keyring(settings, create_if_missing=False)
    api_sessions = make_sessionmaker(engine)
    queue = JobQueue(api_sessions, keyring, lease_seconds=30, max_attempts=3)
    stop = asyncio.Event()

    async def keep_queuing() -> None:
        n = 100
        while not stop.is_set():
            async with api_sessions() as db, db.begin():
                job_ids.append(
                    await queue.enqueue(
                        db, kind="illustration", bucket=BUCKET, spec=spec(n), session_id_hash=None
                    )
                )
            n += 1
            await asyncio.sleep(0.25)

    try:
        deadline = time.monotonic() + 180
        while (await queue.get(job_ids[0])).status == "queued":  # the worker has loaded its model
            assert time.monotonic() < deadline, "the worker never claimed a job"
            if worker.poll() is not None:
                raise AssertionError(f"the worker exited early: {worker.stdout.read().decode()[-3000:]}")
            await asyncio.sleep(0.2)
        producer = asyncio.create_task(keep_queuing())
        try:
            rotated = await asyncio.to_thread(cli_process, ["keys", "rotate", "--batch-size", "3"], env, 240)
        finally:
            stop.set()
            await producer
        said = f"rotate said:\n{rotated.stdout}{rotated.stderr}"
        assert rotated.returncode == 0, said
        await _wait_all_finished(queue, job_ids, worker)
        statuses = {job_id: (await queue.get(job_id)).status for job_id in job_ids}
        assert set(statuses.values()) == {"succeeded"}, (statuses, said)
        assert len(job_ids) > 20, said  # jobs were queued and run throughout the rotation
        material = LocalKeyFileProvider(settings.resolved_kek_file).load()
        assert old not in material.keks
        assert len(material.keks) == 1
        fresh = Keyring(material)
        sessionmaker = api_sessions
        assert (await key_usage(sessionmaker, old)).total == 0, said
        # Worker results written after the promotion are on the new key too; all of it reads back.
        left = await not_on_primary(sessionmaker, material.primary_kek_id)
        assert sum(left.values()) == 0, (left, said)
        readback = JobQueue(sessionmaker, fresh)
        for job_id in job_ids[:3] + job_ids[-3:]:
            assert (await readback.read_artifact(job_id, "png")).startswith(b"\x89PNG")
        records = await key_records(settings)
        assert [(action, outcome) for action, outcome, _ in records] == [
            ("keys.generate", "success"),
            ("keys.add", "success"),
            ("keys.promote", "success"),
            ("keys.reencrypt", "success"),
            ("keys.retire", "success"),
            ("keys.rotate", "success"),
        ], (records, said)
    finally:
        worker.send_signal(signal.SIGTERM)
        output, _ = await asyncio.to_thread(worker.communicate, timeout=60)
        await engine.dispose()
    log = output.decode()
    assert "worker iteration failed" not in log, log[-3000:]
    assert worker.returncode == 0, log[-3000:]


def test_an_interrupted_reencrypt_continues_where_it_stopped(
    embedded: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    asyncio.run(enqueue_jobs(embedded, 150))
    assert main(["keys", "add"]) == 0
    new = capsys.readouterr().out.strip()
    assert main(["keys", "promote", new]) == 0
    env = clean_env(CARECANVAS_DATA_DIR=str(embedded.data_dir))
    process = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "keys", "reencrypt", "--batch-size", "1"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    for line in process.stdout:
        if line.startswith("pass 1:"):
            process.send_signal(signal.SIGINT)  # Ctrl-C after the first committed batch
            break
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    assert "interrupted; run it again to continue" in err
    assert "Traceback" not in err

    async def left() -> int:
        engine, sessionmaker = await open_database(embedded)
        try:
            return sum((await not_on_primary(sessionmaker, new)).values())
        finally:
            await engine.dispose()

    remaining = asyncio.run(left())
    # 152 job specs + 152 drafts + 4 audit payloads were on the old key; the committed batches stay done.
    assert 0 < remaining < 308
    capsys.readouterr()
    assert main(["keys", "reencrypt", "--batch-size", "50"]) == 0
    assert capsys.readouterr().out.startswith(f"{remaining} of ")
    assert asyncio.run(left()) == 0


def test_serve_and_worker_refuse_a_missing_or_unsafe_mounted_secret(tmp_path: Path) -> None:
    secret = tmp_path / "secrets" / "kek-keyring.json"
    for problem, prepare in (
        ("does not exist", lambda: None),
        ("mode 644", lambda: (LocalKeyFileProvider.generate(secret), secret.chmod(0o644))),
    ):
        prepare()
        env = clean_env(
            CARECANVAS_DATA_DIR=str(tmp_path / "data"),
            CARECANVAS_KEK_SECRET_FILE=str(secret),
            CARECANVAS_WORKER_METRICS_PORT=str(free_port()),
        )
        for args in (["serve", "--port", str(free_port())], ["worker", "--metrics-host", "127.0.0.1"]):
            result = cli_process(args, env)
            assert result.returncode == 2, result.stderr[-2000:]
            assert problem in result.stderr
            assert "Traceback" not in result.stderr
    assert not (tmp_path / "data" / "keys.json").exists()


@pytest.fixture
async def split_roles() -> AsyncIterator[tuple[str, str]]:
    """An owner role (owns the schema) and an app role, random suffixes, dropped afterwards: (owner URL, app
    URL) after `migrate --app-role`."""
    suffix = secrets.token_hex(5)
    owner, app, schema = f"cc_owner_{suffix}", f"cc_app_{suffix}", f"cc_test_{suffix}"

    async def admin(*statements: str) -> None:
        engine = make_engine(POSTGRES_SERVER)
        try:
            async with engine.begin() as connection:
                for statement in statements:
                    await connection.execute(text(statement))
        finally:
            await engine.dispose()

    def url(role: str) -> str:
        return f"postgresql+psycopg://{role}@127.0.0.1:5432/test?options=-csearch_path%3D{schema}"

    await admin(
        f"CREATE ROLE {owner} LOGIN",
        f"CREATE ROLE {app} LOGIN",
        f"CREATE SCHEMA {schema} AUTHORIZATION {owner}",
    )
    try:
        await migrate(url(owner), app_role=app)
        yield url(owner), url(app)
    finally:
        await admin(
            f"DROP SCHEMA IF EXISTS {schema} CASCADE",
            f"DROP OWNED BY {owner}, {app}",
            f"DROP ROLE {app}",
            f"DROP ROLE {owner}",
        )


@pytest.mark.postgres
async def test_reencrypt_as_the_app_role_stops_with_a_message_and_the_owner_finishes_it(
    split_roles: tuple[str, str], tmp_path: Path
) -> None:
    owner_url, app_url = split_roles
    env = clean_env(
        CARECANVAS_DATA_DIR=str(tmp_path / "data"),
        CARECANVAS_DATABASE_URL=app_url,
        CARECANVAS_KEK_FILE=str(tmp_path / "keys.json"),
    )
    for command in (["keys", "generate"], ["audit", "keygen"]):
        made = await asyncio.to_thread(cli_process, command, env)
        assert made.returncode == 0, made.stdout + made.stderr
    settings = Settings(data_dir=tmp_path / "data", database_url=app_url, kek_file=tmp_path / "keys.json")
    await enqueue_jobs(settings, 3, audit_records=2)
    added = await asyncio.to_thread(cli_process, ["keys", "add"], env)
    new = added.stdout.strip()
    assert (await asyncio.to_thread(cli_process, ["keys", "promote", new], env)).returncode == 0

    as_app = await asyncio.to_thread(cli_process, ["keys", "reencrypt"], env)
    assert as_app.returncode == 2, as_app.stdout + as_app.stderr
    assert "re-wrapping audit records is an UPDATE only the owner role may make" in as_app.stderr
    assert "Traceback" not in as_app.stderr
    owner_settings = Settings(
        data_dir=tmp_path / "data", database_url=owner_url, kek_file=tmp_path / "keys.json"
    )
    engine, sessionmaker = await open_database(owner_settings)
    try:
        left = await not_on_primary(sessionmaker, new)
    finally:
        await engine.dispose()
    assert left["job specs"] == 0  # done before the audit table, and kept
    assert left["audit payloads"] > 0

    as_owner = await asyncio.to_thread(
        cli_process, ["keys", "reencrypt"], {**env, "CARECANVAS_DATABASE_URL": owner_url}
    )
    assert as_owner.returncode == 0, as_owner.stdout + as_owner.stderr
    assert as_owner.stdout.startswith(f"{sum(left.values())} of ")  # it carried on where the app role stopped
    records = await key_records(owner_settings)
    assert [(action, outcome) for action, outcome, _ in records][-2:] == [
        ("keys.reencrypt", "failure"),
        ("keys.reencrypt", "success"),
    ]
    assert "owner role" in records[-2][2]["reason"]
