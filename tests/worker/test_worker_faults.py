"""`carecanvas worker` processes under SIGKILL mid-batch, a poison job among good ones: one result each."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import func, select, update

from service.db.models import Artifact, Job
from service.generation.engine import ImageRequest, bucket_key
from service.generation.tiny import TINY_MODEL_NAME
from service.services import build_services
from service.settings import Settings

STEPS = 8


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def fault_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("CARECANVAS_")}
    env.update(
        {
            "HF_HUB_OFFLINE": "1",
            "CARECANVAS_DATA_DIR": str(tmp_path / "data"),
            "CARECANVAS_DEVICE": "cpu",
            "CARECANVAS_WORKER_METRICS_PORT": str(free_port()),
            "CARECANVAS_WORKER_POLL_SECONDS": "0.05",
            "CARECANVAS_WORKER_BATCH_SIZE": "4",
            "CARECANVAS_WORKER_BATCH_WAIT_MS": "0",
            # Short, so the killed worker's jobs come back quickly (the heartbeat follows the lease).
            "CARECANVAS_JOB_LEASE_SECONDS": "3",
            "CARECANVAS_LOG_LEVEL": "INFO",
        }
    )
    for key, value in env.items():
        if key.startswith("CARECANVAS_"):
            monkeypatch.setenv(key, value)
    return env


def start_worker(env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    # Logs to a file, not a pipe: a full pipe would block the worker mid-batch.
    with log_path.open("wb") as log_file:
        return subprocess.Popen(
            [sys.executable, "-m", "service.cli", "worker", "--metrics-host", "127.0.0.1"],
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )


def read_log(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


async def wait_for(
    predicate, process: subprocess.Popen[bytes], log_path: Path, *, within: float = 240
) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if await predicate():
            return
        if process.poll() is not None:
            raise AssertionError(f"worker exited early: {read_log(log_path)[-3000:]}")
        await asyncio.sleep(0.1)
    raise AssertionError("the worker did not get there in time")


@pytest.mark.slow
async def test_sigkill_mid_batch_leaves_exactly_one_result_per_job_and_the_poison_fails_alone(
    fault_env: dict[str, str], tmp_path: Path
) -> None:
    services = await build_services(Settings())  # migrates the SQLite file and makes the keys
    bucket = bucket_key(ImageRequest("b", "p", None, 0, 64, 64, STEPS, 5.0), TINY_MODEL_NAME)
    spec = {
        "model": TINY_MODEL_NAME,
        "prompt": "a calm garden",
        "negative_prompt": None,
        "width": 64,
        "height": 64,
        "steps": STEPS,
        "guidance": 5.0,
    }
    try:
        ids = []
        for seed in range(6):
            async with services.sessionmaker() as db, db.begin():
                ids.append(
                    await services.queue.enqueue(
                        db,
                        kind="illustration",
                        bucket=bucket,
                        spec={**spec, "seed": seed},
                        session_id_hash=None,
                    )
                )
        poison = ids[1]
        async with services.sessionmaker() as db, db.begin():
            # Another row's ciphertext: the spec cannot be opened for this job, ever.
            stolen = (await db.execute(select(Job.spec).where(Job.id == ids[0]))).scalar_one()
            await db.execute(update(Job).where(Job.id == poison).values(spec=stolen))
        good = [job_id for job_id in ids if job_id != poison]

        async def mid_batch() -> bool:
            async with services.sessionmaker() as db:
                steps = (await db.execute(select(func.max(Job.progress_step)))).scalar_one()
            return bool(steps) and steps < STEPS

        first_log, second_log = tmp_path / "first.log", tmp_path / "second.log"
        first = start_worker(fault_env, first_log)
        try:
            await wait_for(mid_batch, first, first_log)
        finally:
            first.send_signal(signal.SIGKILL)
            first.wait(timeout=30)
        async with services.sessionmaker() as db:
            interrupted = set(
                (await db.execute(select(Job.id).where(Job.status == "running"))).scalars().all()
            )
        assert interrupted, "the kill should land while a batch runs"

        async def all_finished() -> bool:
            views = [await services.queue.get(job_id) for job_id in ids]
            return all(view.finished for view in views)

        second = start_worker(fault_env, second_log)
        try:
            await wait_for(all_finished, second, second_log)
        finally:
            second.send_signal(signal.SIGTERM)
            # SIGTERM drains: the batch on the device finishes, then the process exits.
            await asyncio.to_thread(second.wait, timeout=120)
        output = read_log(first_log) + read_log(second_log)
        assert second.returncode == 0, output[-3000:]

        async with services.sessionmaker() as db:
            counts = dict(
                (
                    await db.execute(
                        select(Artifact.job_id, func.count())
                        .where(Artifact.kind == "png")
                        .group_by(Artifact.job_id)
                    )
                ).all()
            )
        assert counts == dict.fromkeys(good, 1)  # every good job exactly one image, the poison none
        for job_id in good:
            view = await services.queue.get(job_id)
            assert view.status == "succeeded"
            if job_id in interrupted:
                assert (view.crashes, view.attempts) == (1, 2)
        view = await services.queue.get(poison)
        assert (view.status, view.error) == ("quarantined", "spec unreadable: DecryptionError")
        assert "a calm garden" not in output  # prompts never reach the logs
        assert "spec unreadable: DecryptionError" in output  # the operator sees why in the log too
    finally:
        await services.engine.dispose()
