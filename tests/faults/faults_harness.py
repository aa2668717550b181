"""Real processes for fault tests: a private PostgreSQL cluster, `carecanvas worker` processes, job checks."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from service.db.models import Artifact, Job
from service.jobs import ImageJobSpec, JobQueue
from service.services import Services

PG_VERSION = "15"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class PrivatePostgres:
    """A PostgreSQL cluster of this test's own (pg_createcluster), on its own port; removed afterwards."""

    name: str
    port: int

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/carecanvas"

    def ctl(self, action: str) -> None:
        subprocess.run(
            ["pg_ctlcluster", "--skip-systemctl-redirect", PG_VERSION, self.name, action],
            check=True,
            capture_output=True,
            timeout=60,
        )

    def psql(self, sql: str, *, database: str = "carecanvas") -> str:
        result = subprocess.run(
            ["psql", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-d", database, "-Atc", sql],
            check=True,
            capture_output=True,
            text=True,
            timeout=60,
        )
        return result.stdout


@contextlib.contextmanager
def private_postgres() -> Iterator[PrivatePostgres]:
    cluster = PrivatePostgres(name=f"ccfault{secrets.token_hex(4)}", port=free_port())
    subprocess.run(
        ["pg_createcluster", PG_VERSION, cluster.name, "--port", str(cluster.port), "--", "--auth=trust"],
        check=True,
        capture_output=True,
        timeout=120,
    )
    try:
        cluster.ctl("start")
        cluster.psql("CREATE DATABASE carecanvas", database="postgres")
        yield cluster
    finally:
        subprocess.run(
            ["pg_dropcluster", "--stop", PG_VERSION, cluster.name],
            check=False,
            capture_output=True,
            timeout=120,
        )


@dataclass
class FaultBed:
    """The shared bed: the private cluster, a data dir with keys and the tiny model, services on it."""

    postgres: PrivatePostgres
    data_dir: Path
    services: Services
    logs: Path

    def env(self, **extra: str) -> dict[str, str]:
        return worker_env(self.data_dir, self.postgres.url, **extra)


def worker_env(data_dir: Path, database_url: str, **extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("CARECANVAS_")}
    env.update(
        {
            "HF_HUB_OFFLINE": "1",
            "CARECANVAS_DATA_DIR": str(data_dir),
            "CARECANVAS_DATABASE_URL": database_url,
            "CARECANVAS_DEVICE": "cpu",
            "CARECANVAS_WORKER_POLL_SECONDS": "0.05",
            # Short leases, so a killed worker's jobs come back within seconds.
            "CARECANVAS_JOB_LEASE_SECONDS": "3",
            "CARECANVAS_JOB_MAX_ATTEMPTS": "5",
            "CARECANVAS_WORKER_BATCH_SIZE": "4",
            # One torch thread: several processes share two cores here; more threads only fight.
            "OMP_NUM_THREADS": "1",
            "CARECANVAS_WORKER_PREVIEWS": "false",
            "CARECANVAS_LOG_LEVEL": "INFO",
        }
    )
    env.update(extra)
    return env


class WorkerProcess:
    """`python -m service.cli worker` with its output in a file (a pipe could fill and stall it)."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.metrics_port = free_port()
        env = {**env, "CARECANVAS_WORKER_METRICS_PORT": str(self.metrics_port)}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "worker", "--metrics-host", "127.0.0.1"],
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def output(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)

    def terminate(self, *, timeout: float = 60) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout)

    def close(self) -> None:
        if self.process.poll() is None:
            self.kill()
        self._log.close()


def image_spec(seed: int, *, steps: int = 4) -> ImageJobSpec:
    return ImageJobSpec(
        model="carecanvas-tiny-test",
        prompt="a calm garden",
        negative_prompt=None,
        seed=seed,
        width=64,
        height=64,
        steps=steps,
        guidance=1.0,
    )


async def enqueue(
    queue: JobQueue, sessionmaker: async_sessionmaker[AsyncSession], count: int, *, steps: int = 4
) -> list[str]:
    ids = []
    async with sessionmaker() as session, session.begin():
        for seed in range(count):
            spec = image_spec(seed, steps=steps)
            ids.append(
                await queue.enqueue(
                    session,
                    kind="illustration",
                    bucket=spec.bucket,
                    spec=spec.to_dict(),
                    session_id_hash=None,
                )
            )
    return ids


@dataclass(frozen=True)
class JobsState:
    statuses: dict[str, str]
    attempts: dict[str, int]
    pngs: dict[str, int]

    def count(self, status: str) -> int:
        return sum(1 for value in self.statuses.values() if value == status)


async def jobs_state(sessionmaker: async_sessionmaker[AsyncSession], job_ids: list[str]) -> JobsState:
    async with sessionmaker() as session:
        rows = (
            await session.execute(select(Job.id, Job.status, Job.attempts).where(Job.id.in_(job_ids)))
        ).all()
        pngs = (
            await session.execute(
                select(Artifact.job_id, func.count())
                .where(Artifact.job_id.in_(job_ids), Artifact.kind == "png")
                .group_by(Artifact.job_id)
            )
        ).all()
    return JobsState(
        statuses={row.id: row.status for row in rows},
        attempts={row.id: row.attempts for row in rows},
        pngs={row[0]: int(row[1]) for row in pngs},
    )


async def wait_until(
    sessionmaker: async_sessionmaker[AsyncSession],
    job_ids: list[str],
    done: object,
    *,
    timeout: float,  # noqa: ASYNC109 - a polling helper with its own deadline
    workers: list[WorkerProcess] | None = None,
) -> JobsState:
    """Poll the jobs until ``done(state)`` is true; fail early when a worker died unexpectedly."""
    deadline = time.monotonic() + timeout
    state = await jobs_state(sessionmaker, job_ids)
    while not done(state):  # type: ignore[operator]
        for worker in workers or []:
            if worker.process.poll() is not None:
                raise AssertionError(
                    f"worker exited ({worker.process.returncode}):\n{worker.output()[-3000:]}"
                )
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out; statuses {sorted(state.statuses.values())}")
        await asyncio.sleep(0.1)
        try:
            state = await jobs_state(sessionmaker, job_ids)
        except Exception:  # the database is being restarted under us: look again
            await asyncio.sleep(0.2)
    return state


def all_finished(state: JobsState) -> bool:
    return all(status not in ("queued", "running") for status in state.statuses.values())


async def terminate_backends(sessionmaker: async_sessionmaker[AsyncSession]) -> int:
    async with sessionmaker() as session:
        result = await session.execute(
            text(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        )
        return int(result.scalar_one())
