"""End to end serving: a burst of generation requests over real HTTP, CareCanvas vs two reference servers.

Run from the repo root: ``python -m bench.bench_serving [--rounds 5] [--jobs 64] [--quick]
[--postgres postgresql+psycopg://postgres@127.0.0.1:5432/test] [--no-postgres] [--variants a,b]``.

Every server is its own process on 127.0.0.1, all on the same tiny model (64², 2 steps, guidance 7.5):

- ``naive``: one pipeline call per request in a thread executor (diffusers' example server),
  bench.naive_server
- ``batcher``: a minimal in-process dynamic batcher (max 8, 5 ms window), bench.batcher_server
- ``cc-sqlite`` / ``cc-pg``: CareCanvas (``carecanvas serve``) with its embedded worker, SQLite or PostgreSQL
- ``cc-sqlite-worker`` / ``cc-pg-worker``: the same with ``embedded_worker`` off and a ``carecanvas worker``
  process beside it

CareCanvas runs as deployed: real SMART launches against the sandbox EHR, the JSON API's queuing endpoint
(``POST /api/v1/illustrations``, cookie session + CSRF header), storage, encryption and audit on; each request
is followed over Server-Sent Events (``/api/v1/jobs/{id}/events``, as its page follows a job) until final.
A request's latency is request sent → image ready (the reference servers answer the PNG itself).

Rounds are interleaved (the variant order rotates each round); every server is warmed first. Reported per
variant: img/s, p50/p95 latency, server CPU per image (utime+stime of the server processes over the burst),
the pipeline's busy fraction over the burst (each ``__call__`` of the diffusers pipeline logged by
bench.busy_hook inside the server processes), and the queuing POST's p50; then the ratios, paired per round.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.busy_hook import ENV as BUSY_ENV
from bench.busy_hook import busy_fraction

ROOT = Path(__file__).resolve().parent.parent
POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
API = "/api/v1"
FINAL = frozenset({"succeeded", "failed", "quarantined", "cancelled"})
PROMPTS = ("a healthy heart", "lungs with asthma", "a knee joint", "the kidneys and bladder")
# Sessions per CareCanvas variant: clinicians and patients of the sandbox, so per-session and per-user caps on
# queued jobs see an ordinary clinic's spread, not one user with 64 jobs.
LAUNCHES = (
    ("pat-1", "prac-1"),
    ("pat-2", "prac-2"),
    ("pat-4", "prac-3"),
    ("pat-6", "prac-1"),
    ("pat-1", "prac-2"),
    ("pat-2", "prac-3"),
    ("pat-4", "prac-1"),
    ("pat-6", "prac-2"),
)
ALL_VARIANTS = ("naive", "batcher", "cc-sqlite", "cc-sqlite-worker", "cc-pg", "cc-pg-worker")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Sample:
    sent: float
    done: float
    posted: float | None = None  # CareCanvas: when the queuing POST answered

    @property
    def latency(self) -> float:
        return self.done - self.sent


@dataclass
class Burst:
    """One variant's burst in one round."""

    samples: list[Sample]
    cpu_s: float
    busy: float

    @property
    def wall(self) -> float:
        return max(s.done for s in self.samples) - min(s.sent for s in self.samples)

    @property
    def images_per_s(self) -> float:
        return len(self.samples) / self.wall

    def percentile(self, q: float) -> float:
        values = sorted(s.latency for s in self.samples)
        return values[min(len(values) - 1, round(q * (len(values) - 1)))]

    @property
    def post_p50(self) -> float | None:
        posts = [s.posted - s.sent for s in self.samples if s.posted is not None]
        return statistics.median(posts) if posts else None


@dataclass
class ApiSession:
    client: httpx.AsyncClient
    csrf: str
    conditions: list[str]


@dataclass
class Server:
    """One variant: its processes (the first answers HTTP), busy-time files, launched sessions."""

    name: str
    url: str
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    busy_files: list[Path] = field(default_factory=list)
    sessions: list[ApiSession] = field(default_factory=list)
    logs: list[Path] = field(default_factory=list)

    @property
    def carecanvas(self) -> bool:
        return self.name.startswith("cc-")

    def cpu(self) -> float:
        return sum(cpu_seconds(process.pid) for process in self.processes)

    def busy(self, start: float, end: float) -> float:
        # One pipeline per process; with two processes only one of them generates (the worker).
        return max((busy_fraction(path, start, end)[0] for path in self.busy_files), default=0.0)

    def check_alive(self) -> None:
        for process, log in zip(self.processes, self.logs, strict=True):
            if process.poll() is not None:
                tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
                raise RuntimeError(f"{self.name}: a server process exited ({process.returncode}):\n{tail}")


class Fleet:
    """Starts and stops every server of the run (and the sandbox EHR for CareCanvas)."""

    def __init__(self, work: Path, variants: list[str], postgres_url: str) -> None:
        self.work = work
        self.variants = variants
        self.postgres_url = postgres_url
        self.ports = {name: free_port() for name in variants}
        self.servers: dict[str, Server] = {}
        self.schemas: list[str] = []
        self.model_dir = work / "tiny-model"
        self.sandbox: Any = None
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> Fleet:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    def start(self) -> None:
        from service.generation.tiny import build_tiny_pipeline

        build_tiny_pipeline(self.model_dir)
        if any(name.startswith("cc-") for name in self.variants):
            from sandbox.run import SandboxEHR

            urls = [f"http://127.0.0.1:{port}" for name, port in self.ports.items() if name.startswith("cc-")]
            self.sandbox = self._stack.enter_context(
                SandboxEHR(app_launch_url=f"{urls[0]}/launch", redirect_uris=[f"{u}/callback" for u in urls])
            )
        for name in self.variants:
            self.servers[name] = self._start(name)
        for server in self.servers.values():
            self._wait_ready(server)

    def _spawn(
        self, server: Server, label: str, argv: list[str], env: dict[str, str], *, pipeline: bool = True
    ) -> None:
        busy = self.work / f"{server.name}-{label}.busy"
        log = self.work / f"{server.name}-{label}.log"
        full_env = {**os.environ, **env, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        if pipeline:  # the hook imports diffusers: only where a pipeline runs (never a worker-less API)
            full_env[BUSY_ENV] = str(busy)
        with log.open("wb") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "bench.serving_proc", *argv],
                cwd=ROOT,
                env=full_env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        server.processes.append(process)
        server.busy_files.append(busy)
        server.logs.append(log)

    def _start(self, name: str) -> Server:
        port = self.ports[name]
        server = Server(name=name, url=f"http://127.0.0.1:{port}")
        if not name.startswith("cc-"):
            self._spawn(server, "server", [name, str(self.model_dir), str(port)], {})
            return server
        env = self._carecanvas_env(name, port)
        self._spawn(server, "serve", ["serve", str(port)], env, pipeline=not name.endswith("-worker"))
        if name.endswith("-worker"):
            self._wait_http(server)  # the API migrates and makes keys first; the worker then opens them
            self._spawn(
                server, "worker", ["worker"], {**env, "CARECANVAS_WORKER_METRICS_PORT": str(free_port())}
            )
        return server

    def _carecanvas_env(self, name: str, port: int) -> dict[str, str]:
        from service.cli import demo_settings
        from service.ehrs import origin_of

        data_dir = self.work / name
        data_dir.mkdir()
        settings = demo_settings(
            data_dir=data_dir,
            fhir_base=self.sandbox.fhir_base,
            auth_base=self.sandbox.auth_base,
            ehr_origin=origin_of(self.sandbox.ehr_url),
            port=port,
        )
        model = {
            "name": "carecanvas-tiny-test",
            "version": "tiny-1",
            "path": str(self.model_dir),
            "pipeline_class": "StableDiffusionPipeline",
            "default_width": 64,
            "default_height": 64,
            "default_steps": 2,
            "default_guidance": 7.5,
            "is_test_model": True,
            "licence": "Random weights built offline by CareCanvas; images are noise.",
        }
        env = {
            "CARECANVAS_DATA_DIR": str(data_dir),
            "CARECANVAS_PUBLIC_URL": settings.public_url,
            "CARECANVAS_EHRS": json.dumps([ehr.model_dump(mode="json") for ehr in settings.ehrs]),
            "CARECANVAS_MODELS": json.dumps([model]),
            "CARECANVAS_EMBEDDED_WORKER": "false" if name.endswith("-worker") else "true",
            "CARECANVAS_WORKER_METRICS_PORT": str(free_port()),
            "CARECANVAS_LOG_LEVEL": "WARNING",
            # The bench's 8 clinicians all come from 127.0.0.1: the per-address job-POST limit (240 a
            # minute) would refuse a third 64-burst within a minute that 8 real computers would not hit.
            "CARECANVAS_JOB_POST_RATE_PER_MINUTE": "0",
        }
        env.update(self._extra_env)
        if "-pg" in name:
            env["CARECANVAS_DATABASE_URL"] = self._postgres_schema()
            env["CARECANVAS_MIGRATE_ON_START"] = "true"
            self._make_keys(data_dir)
        return env

    _extra_env: dict[str, str] = {}  # noqa: RUF012 - set once by main (--env)

    @staticmethod
    def _make_keys(data_dir: Path) -> None:
        """An install with an external database never makes its own keys: they are made here."""
        from service.audit.signing_key import generate_signing_key
        from service.crypto import LocalKeyFileProvider

        LocalKeyFileProvider.generate(data_dir / "keys.json")
        generate_signing_key(data_dir / "audit-signing-key.pem")

    def _postgres_schema(self) -> str:
        import psycopg

        schema = f"cc_bench_{secrets.token_hex(6)}"
        with psycopg.connect(self.postgres_url.replace("+psycopg", ""), autocommit=True) as connection:
            connection.execute(f'CREATE SCHEMA "{schema}"')  # type: ignore[arg-type]
        self.schemas.append(schema)
        return f"{self.postgres_url}?options=-csearch_path%3D{schema}"

    def _wait_http(self, server: Server, *, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            server.check_alive()
            try:
                httpx.get(server.url + "/", timeout=2)
                return
            except httpx.TransportError:
                time.sleep(0.2)
        raise RuntimeError(f"{server.name} did not answer within {timeout} s")

    def _wait_ready(self, server: Server) -> None:
        self._wait_http(server)

    def stop(self) -> None:
        for server in self.servers.values():
            for process in server.processes:
                if process.poll() is None:
                    process.terminate()
            for process in server.processes:
                try:
                    process.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        self._stack.close()
        if self.schemas:
            import psycopg

            with psycopg.connect(self.postgres_url.replace("+psycopg", ""), autocommit=True) as connection:
                for schema in self.schemas:
                    connection.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')  # type: ignore[arg-type]


# --- SMART launches (what a clinician's browser does), then the session's CSRF token and conditions ---


async def launch(server: Server, sandbox: Any, patient: str, practitioner: str) -> ApiSession:
    client = httpx.AsyncClient(
        base_url=server.url,
        timeout=httpx.Timeout(120.0),
        limits=httpx.Limits(max_connections=200, max_keepalive_connections=200),
    )
    started = await client.get(
        "/launch",
        params={"iss": sandbox.fhir_base, "launch": sandbox.create_launch(patient, practitioner, None)},
    )
    if started.status_code != 302:
        raise RuntimeError(f"{server.name}: /launch answered {started.status_code}: {started.text[:300]}")
    async with httpx.AsyncClient(timeout=30) as outside:
        authorized = await outside.get(started.headers["location"])
    callback = authorized.headers["location"]
    finished = await client.get(callback.removeprefix(server.url))
    if finished.status_code != 303:
        raise RuntimeError(f"{server.name}: /callback answered {finished.status_code}: {finished.text[:300]}")
    page = (await client.get("/app")).text
    marker = 'name="csrf_token" value="'
    csrf = page.split(marker, 1)[1].split('"', 1)[0]
    conditions = (await client.get(f"{API}/conditions")).json()["conditions"]
    return ApiSession(client=client, csrf=csrf, conditions=[c["id"] for c in conditions])


# --- one request of each kind ---


async def carecanvas_request(session: ApiSession, index: int) -> Sample:
    sent = time.monotonic()
    body = {
        "condition_id": session.conditions[index % len(session.conditions)],
        "style": "flat_vector",
        "language": "en",
    }
    answer = await session.client.post(
        f"{API}/illustrations", json=body, headers={"X-CSRF-Token": session.csrf}
    )
    posted = time.monotonic()
    if answer.status_code != 201:
        raise RuntimeError(f"queuing POST answered {answer.status_code}: {answer.text[:300]}")
    job_id = answer.json()["job_id"]
    status = None
    async with session.client.stream("GET", f"{API}/jobs/{job_id}/events") as stream:
        async for line in stream.aiter_lines():
            if line.startswith("data:"):
                status = json.loads(line[5:])["status"]
                if status in FINAL:
                    break
    if status != "succeeded":
        raise RuntimeError(f"job {job_id} ended {status}")
    return Sample(sent=sent, done=time.monotonic(), posted=posted)


async def reference_request(client: httpx.AsyncClient, index: int) -> Sample:
    sent = time.monotonic()
    answer = await client.post("/generate", json={"prompt": PROMPTS[index % len(PROMPTS)], "seed": index})
    if answer.status_code != 200 or not answer.content.startswith(b"\x89PNG"):
        raise RuntimeError(f"reference server answered {answer.status_code}")
    return Sample(sent=sent, done=time.monotonic())


async def burst(server: Server, jobs: int, reference: httpx.AsyncClient | None) -> Burst:
    server.check_alive()
    cpu_before = server.cpu()
    if server.carecanvas:
        sessions = server.sessions
        tasks = [carecanvas_request(sessions[index % len(sessions)], index) for index in range(jobs)]
    else:
        assert reference is not None
        tasks = [reference_request(reference, index) for index in range(jobs)]
    samples = list(await asyncio.gather(*tasks))
    cpu = server.cpu() - cpu_before
    start, end = min(s.sent for s in samples), max(s.done for s in samples)
    return Burst(samples=samples, cpu_s=cpu, busy=server.busy(start, end))


# --- the run ---


async def run(fleet: Fleet, *, rounds: int, jobs: int, warm_jobs: int) -> dict[str, list[Burst]]:
    references: dict[str, httpx.AsyncClient] = {}
    for name, server in fleet.servers.items():
        if server.carecanvas:
            server.sessions = [
                await launch(server, fleet.sandbox, patient, practitioner)
                for patient, practitioner in LAUNCHES
            ]
        else:
            references[name] = httpx.AsyncClient(
                base_url=server.url,
                timeout=httpx.Timeout(300.0),
                limits=httpx.Limits(max_connections=200, max_keepalive_connections=200),
            )
    try:
        for name, server in fleet.servers.items():
            await burst(server, warm_jobs, references.get(name))  # models loaded, pools and caches warm
        results: dict[str, list[Burst]] = {name: [] for name in fleet.servers}
        names = list(fleet.servers)
        for round_index in range(rounds):
            shift = round_index % len(names)
            for name in names[shift:] + names[:shift]:
                await asyncio.sleep(0.5)  # let the previous burst's stragglers (stores, SSE closes) settle
                result = await burst(fleet.servers[name], jobs, references.get(name))
                results[name].append(result)
                print(
                    f"round {round_index + 1} {name}: {result.images_per_s:.1f} img/s, "
                    f"p50 {result.percentile(0.5):.2f} s, busy {result.busy:.0%}",
                    file=sys.stderr,
                    flush=True,
                )
        return results
    finally:
        for client in references.values():
            await client.aclose()
        for server in fleet.servers.values():
            for session in server.sessions:
                await session.client.aclose()


def table(results: dict[str, list[Burst]], jobs: int) -> str:
    lines = [
        f"| server (burst of {jobs}) | img/s | p50 | p95 | server CPU per image | pipeline busy | "
        "queuing POST p50 |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, bursts in results.items():
        median = statistics.median
        post = [b.post_p50 for b in bursts if b.post_p50 is not None]
        lines.append(
            f"| {name} | {median(b.images_per_s for b in bursts):.1f} | "
            f"{median(b.percentile(0.5) for b in bursts):.2f} s | "
            f"{median(b.percentile(0.95) for b in bursts):.2f} s | "
            f"{median(b.cpu_s / len(b.samples) for b in bursts):.3f} s | "
            f"{median(b.busy for b in bursts):.0%} | "
            + (f"{median(post) * 1000:.0f} ms |" if post else "– |")
        )
    return "\n".join(lines)


def ratios(results: dict[str, list[Burst]]) -> str:
    """img/s of each CareCanvas variant over each reference, paired per round (median of the rounds)."""
    lines = ["| ratio (img/s, paired per round) | median | min | max |", "|---|---:|---:|---:|"]
    for name, bursts in results.items():
        if not name.startswith("cc-"):
            continue
        for reference in ("naive", "batcher"):
            if reference not in results:
                continue
            paired = [
                ours.images_per_s / theirs.images_per_s
                for ours, theirs in zip(bursts, results[reference], strict=True)
            ]
            lines.append(
                f"| {name} / {reference} | {statistics.median(paired):.2f}× | {min(paired):.2f}× | "
                f"{max(paired):.2f}× |"
            )
    return "\n".join(lines)


def postgres_reachable(url: str) -> bool:
    try:
        import psycopg

        with psycopg.connect(url.replace("+psycopg", ""), connect_timeout=3):
            return True
    except Exception:
        return False


@contextlib.contextmanager
def work_dir(keep: bool) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="cc-bench-serving-"))
    try:
        yield path
    finally:
        if keep:
            print(f"work dir kept: {path}", file=sys.stderr)
        else:
            shutil.rmtree(path, ignore_errors=True)


def main(argv: list[str] | None = None) -> dict[str, list[Burst]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--jobs", type=int, default=64)
    parser.add_argument(
        "--quick", action="store_true", help="smoke test: 1 round of 8, naive+batcher+cc-sqlite"
    )
    parser.add_argument("--variants", default=",".join(ALL_VARIANTS))
    parser.add_argument("--postgres", default=POSTGRES_URL)
    parser.add_argument("--no-postgres", action="store_true")
    parser.add_argument("--env", action="append", default=[], help="KEY=VALUE for the CareCanvas processes")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (server logs)")
    arguments = parser.parse_args(argv)
    variants = [v for v in arguments.variants.split(",") if v]
    rounds, jobs, warm = arguments.rounds, arguments.jobs, 8
    if arguments.quick:
        variants, rounds, jobs, warm = ["naive", "batcher", "cc-sqlite"], 1, 8, 2
    if arguments.no_postgres or not postgres_reachable(arguments.postgres):
        variants = [v for v in variants if "-pg" not in v]
    unknown = set(variants) - set(ALL_VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; choose from {ALL_VARIANTS}")
    Fleet._extra_env = dict(item.split("=", 1) for item in arguments.env)
    with work_dir(arguments.keep) as work, Fleet(work, variants, arguments.postgres) as fleet:
        fleet.start()
        results = asyncio.run(run(fleet, rounds=rounds, jobs=jobs, warm_jobs=warm))
    print(table(results, jobs))
    print()
    print(ratios(results))
    return results


if __name__ == "__main__":
    main()
