"""`carecanvas worker` processes under faults, on a private PostgreSQL cluster: kill, restart, drain."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Iterator

import httpx
import pytest
from faults_harness import FaultBed, WorkerProcess, all_finished, enqueue, terminate_backends, wait_until

pytestmark = pytest.mark.slow


class Workers:
    """Worker processes shared along this module (each start costs a torch import and a model load)."""

    def __init__(self, bed: FaultBed) -> None:
        self._bed = bed
        self.started: list[WorkerProcess] = []

    def start(self, name: str) -> WorkerProcess:
        worker = WorkerProcess(self._bed.env(), self._bed.logs / f"{name}.log")
        self.started.append(worker)
        return worker

    def alive(self, name: str) -> WorkerProcess:
        """The last started worker if it still runs, else a new one."""
        if self.started and self.started[-1].process.poll() is None:
            return self.started[-1]
        return self.start(name)


@pytest.fixture(scope="module")
def workers(fault_bed: FaultBed) -> Iterator[Workers]:
    shared = Workers(fault_bed)
    yield shared
    for worker in shared.started:
        worker.close()


def one_result_each(state, job_ids: list[str]) -> None:  # type: ignore[no-untyped-def]
    assert state.count("succeeded") == len(job_ids), sorted(state.statuses.values())
    assert state.pngs == {job_id: 1 for job_id in job_ids}  # one image per job, none lost, none twice


async def test_sigkill_mid_batch_leaves_every_job_one_result(fault_bed: FaultBed, workers: Workers) -> None:
    services = fault_bed.services
    job_ids = await enqueue(services.queue, services.sessionmaker, 12, steps=2)
    first = workers.start("kill-first")
    # Killed while a batch is on the device: some jobs done, others running under its lease.
    state = await wait_until(
        services.sessionmaker,
        job_ids,
        lambda s: s.count("succeeded") >= 1 and s.count("running") >= 1,
        timeout=240,
        workers=[first],
    )
    first.kill()
    interrupted = {job_id for job_id, status in state.statuses.items() if status == "running"}
    second = workers.start("kill-second")  # also serves the next tests
    state = await wait_until(services.sessionmaker, job_ids, all_finished, timeout=240, workers=[second])
    one_result_each(state, job_ids)
    # The jobs the kill interrupted were really re-run (a second attempt), after their lease expired.
    assert interrupted
    assert any(state.attempts[job_id] >= 2 for job_id in interrupted)


async def test_postgres_restart_mid_burst_loses_no_job(fault_bed: FaultBed, workers: Workers) -> None:
    services = fault_bed.services
    worker = workers.alive("restart")
    job_ids = await enqueue(services.queue, services.sessionmaker, 12, steps=2)
    try:
        await wait_until(
            services.sessionmaker, job_ids, lambda s: s.count("succeeded") >= 2, timeout=240, workers=[worker]
        )
        assert await terminate_backends(services.sessionmaker) >= 1  # the worker's connections drop
        fault_bed.postgres.ctl("restart")  # and the server goes away for a moment, mid-burst
        await services.engine.dispose()  # our own pool's connections died too
        state = await wait_until(services.sessionmaker, job_ids, all_finished, timeout=240, workers=[worker])
        assert worker.process.poll() is None  # the worker rode it out instead of exiting
        # Its own metrics port counted the images it stored and the pipeline calls it made.
        async with httpx.AsyncClient(timeout=10) as client:
            exported = (await client.get(f"http://127.0.0.1:{worker.metrics_port}/metrics")).text
        images = re.search(r"^carecanvas_worker_images_total (\S+)$", exported, re.MULTILINE)
        assert images is not None
        assert float(images.group(1)) >= 1
        assert "carecanvas_generation_duration_seconds_count" in exported
    finally:
        output = worker.output()
    one_result_each(state, job_ids)
    assert "Traceback" not in output


async def test_sigterm_drains_the_batch_in_flight(fault_bed: FaultBed, workers: Workers) -> None:
    services = fault_bed.services
    worker = workers.alive("drain")
    job_ids = await enqueue(services.queue, services.sessionmaker, 16, steps=2)
    await wait_until(
        services.sessionmaker, job_ids, lambda s: s.count("running") >= 1, timeout=240, workers=[worker]
    )
    started = time.monotonic()
    returncode = await asyncio.to_thread(worker.terminate, timeout=120)
    drain_seconds = time.monotonic() - started
    assert returncode == 0, worker.output()[-3000:]
    assert drain_seconds < 120  # inside the chart's terminationGracePeriodSeconds
    state = await wait_until(services.sessionmaker, job_ids, lambda s: True, timeout=5)
    # Nothing left under the stopped worker's lease: what it held finished or went back to the queue.
    assert state.count("running") == 0, sorted(state.statuses.values())
    assert state.count("succeeded") >= 1
    assert set(state.statuses.values()) <= {"succeeded", "queued"}
    assert all(
        state.pngs.get(job_id, 0) == (1 if s == "succeeded" else 0) for job_id, s in state.statuses.items()
    )
    assert "worker stopped" in worker.output()
    # The queued rest is still there for the next worker: the drain lost nothing.
    assert state.count("succeeded") + state.count("queued") == len(job_ids)
