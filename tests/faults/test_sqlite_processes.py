"""The API and two workers as separate processes on one SQLite file, with a third writer queueing jobs."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from faults_harness import WorkerProcess, all_finished, enqueue, free_port, wait_until

from service.generation.tiny import build_tiny_pipeline
from service.services import build_services
from service.settings import Settings

pytestmark = pytest.mark.slow


def sqlite_env(data_dir: Path) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("CARECANVAS_")}
    env.update(
        {
            "HF_HUB_OFFLINE": "1",
            "CARECANVAS_DATA_DIR": str(data_dir),
            "CARECANVAS_EMBEDDED_WORKER": "false",
            "CARECANVAS_DEVICE": "cpu",
            "CARECANVAS_WORKER_POLL_SECONDS": "0.05",
            "CARECANVAS_WORKER_BATCH_SIZE": "4",
            "CARECANVAS_WORKER_PREVIEWS": "false",
            "OMP_NUM_THREADS": "1",
            "CARECANVAS_LOG_LEVEL": "INFO",
        }
    )
    return env


async def test_api_and_two_workers_share_one_sqlite_file(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    settings = Settings(data_dir=data_dir, device="cpu", embedded_worker=False)
    services = await build_services(settings)  # the embedded install's first start: migrates, makes keys
    await asyncio.to_thread(build_tiny_pipeline, settings.tiny_model_dir)
    env = sqlite_env(data_dir)
    port = free_port()
    api_log = (tmp_path / "api.log").open("wb")
    api = subprocess.Popen(  # noqa: ASYNC220 - a start, not a wait: it returns at once
        [sys.executable, "-m", "service.cli", "serve", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=api_log,
        stderr=subprocess.STDOUT,
    )
    workers = [WorkerProcess(env, tmp_path / f"worker-{n}.log") for n in (1, 2)]
    job_ids: list[str] = []
    probes: list[int] = []
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            deadline = time.monotonic() + 240
            while True:
                try:
                    if (await client.get("/healthz")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert api.poll() is None, "the API exited"
                assert time.monotonic() < deadline, "the API did not start"
                await asyncio.sleep(0.2)
            while not all("worker started" in worker.output() for worker in workers):
                assert all(w.process.poll() is None for w in workers)
                assert time.monotonic() < deadline
                await asyncio.sleep(0.2)
            # Waves of jobs written by this process while both workers claim and store, and the API
            # answers readiness and metrics (which read the same file) throughout.
            for _ in range(4):
                job_ids += await enqueue(services.queue, services.sessionmaker, 6, steps=2)
                for _ in range(5):
                    probes.append((await client.get("/readyz")).status_code)
                    probes.append((await client.get("/metrics")).status_code)
                    await asyncio.sleep(0.2)
            state = await wait_until(
                services.sessionmaker, job_ids, all_finished, timeout=240, workers=workers
            )
            metrics_text = (await client.get("/metrics")).text
    finally:
        for worker in workers:
            if worker.process.poll() is None:
                worker.terminate(timeout=120)
            worker.close()
        api.terminate()
        api.wait(timeout=60)
        api_log.close()
        await services.aclose()
    assert state.count("succeeded") == len(job_ids) == 24, sorted(state.statuses.values())
    assert state.pngs == {job_id: 1 for job_id in job_ids}
    assert set(probes) == {200}, probes
    assert "carecanvas_queue_depth_total 0.0" in metrics_text
    # Both workers did work, and nobody ever waited out SQLite's lock.
    outputs = [worker.output() for worker in workers] + [(tmp_path / "api.log").read_text(errors="replace")]
    assert all("batch claimed" in output for output in outputs[:2])
    for output in outputs:
        assert "database is locked" not in output
        assert "Traceback" not in output
