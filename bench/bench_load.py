"""Load: 50 simultaneous launches, 200 queued generations beside page loads, a slow EHR beside a healthy one.

Run from the repo root: ``python -m bench.bench_load [--launches 50] [--jobs 200] [--pages 40]``.

CareCanvas runs as deployed on one machine (bench.bench_serving's fleet): ``carecanvas serve`` and a
``carecanvas worker`` process on SQLite, real SMART launches against the sandbox EHR, plus a second registered
EHR that answers every request after 5 s. Three phases, each measured side by side with its own baseline in
the same run:

1. **Launches**: ``--launches`` clients do /launch → authorize → /callback at once. Each must end signed in
   (303 to /app) or refused quickly (503/429 within 2 s); a state mismatch (400 on the callback) is a failure.
2. **Queue**: page loads (``GET /app``, the workspace) one after another while idle, then while ``--jobs``
   generations are queued through the JSON API and the worker churns through them. Reported: p50/p95 idle
   and loaded, their ratio (goal ≤ 2), and that every job ended with exactly one image.
3. **Slow EHR**: launches at the healthy EHR while idle, then while six launches wait on the slow EHR;
   /healthz latency meanwhile (the event loop must stay responsive).

The bench raises the per-session/per-user job caps and the job-POST rate limit (it queues 200 jobs from one
client on purpose); everything else is the default configuration.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx

from bench.bench_serving import API, Fleet, launch

SLOW_SECONDS = 5.0
FINAL = {"succeeded", "failed", "cancelled", "quarantined"}


def p(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


class SlowEhr:
    """An EHR that answers every request after SLOW_SECONDS, with nothing a SMART client can use."""

    def __init__(self) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                time.sleep(SLOW_SECONDS)
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, format: str, *args: object) -> None:
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.iss = f"http://127.0.0.1:{self.server.server_address[1]}/fhir"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class LoadFleet(Fleet):
    """bench_serving's fleet with the slow EHR registered beside the sandbox, and the bulk limits raised."""

    slow_iss = ""

    def _carecanvas_env(self, name: str, port: int) -> dict[str, str]:
        env = super()._carecanvas_env(name, port)
        ehrs = json.loads(env["CARECANVAS_EHRS"])
        ehrs.append({"name": "slow", "iss": self.slow_iss, "client_id": "x", "max_connections": 8})
        env["CARECANVAS_EHRS"] = json.dumps(ehrs)
        env.update(
            {
                "CARECANVAS_MAX_QUEUED_JOBS_PER_SESSION": "1000",
                "CARECANVAS_MAX_QUEUED_JOBS_PER_USER": "1000",
                "CARECANVAS_JOB_POST_RATE_PER_MINUTE": "100000",
                "CARECANVAS_JOB_POST_BURST": "100000",
            }
        )
        return env


@dataclass
class LaunchResult:
    outcome: str  # signed-in, refused-fast, refused-slow, state-mismatch, error
    seconds: float


async def one_launch(url: str, sandbox: Any, patient: str) -> LaunchResult:
    started = time.monotonic()
    # A connection per step, as a browser opens one after uvicorn's 5 s keep-alive timeout: a reused idle
    # connection the server is closing would count that race as a failed launch.
    fresh = httpx.Limits(max_keepalive_connections=0)
    async with (
        httpx.AsyncClient(base_url=url, timeout=120, limits=fresh) as client,
        httpx.AsyncClient(timeout=120, limits=fresh) as outside,
    ):
        step = "launch"
        try:
            first = await client.get(
                "/launch",
                params={"iss": sandbox.fhir_base, "launch": sandbox.create_launch(patient, "prac-1", None)},
            )
            if first.status_code in (429, 503):
                seconds = time.monotonic() - started
                return LaunchResult("refused-fast" if seconds < 2 else "refused-slow", seconds)
            step = "authorize"
            authorized = await outside.get(first.headers["location"])
            step = "callback"
            finished = await client.get(authorized.headers["location"].removeprefix(url))
        except (httpx.HTTPError, KeyError) as error:
            return LaunchResult(f"error:{step}:{type(error).__name__}", time.monotonic() - started)
    seconds = time.monotonic() - started
    if finished.status_code == 303 and finished.headers.get("location") == "/app":
        return LaunchResult("signed-in", seconds)
    if finished.status_code == 400 and "state" in finished.text.lower():
        return LaunchResult("state-mismatch", seconds)
    if finished.status_code in (429, 503):
        return LaunchResult("refused-fast" if seconds < 2 else "refused-slow", seconds)
    return LaunchResult(f"status:{finished.status_code}", seconds)


async def page_loads(
    client: httpx.AsyncClient, count: int, *, stop: asyncio.Event | None = None
) -> list[float]:
    seconds: list[float] = []
    while len(seconds) < count and not (stop is not None and stop.is_set() and len(seconds) >= 5):
        started = time.monotonic()
        response = await client.get("/app")
        if response.status_code != 200:
            raise RuntimeError(f"/app answered {response.status_code}")
        seconds.append(time.monotonic() - started)
    return seconds


async def queue_jobs(client: httpx.AsyncClient, csrf: str, conditions: list[str], jobs: int) -> list[str]:
    ids = []
    for index in range(jobs):
        body = {"condition_id": conditions[index % len(conditions)], "style": "flat_vector", "language": "en"}
        answer = await client.post(f"{API}/illustrations", json=body, headers={"X-CSRF-Token": csrf})
        if answer.status_code != 201:
            raise RuntimeError(f"queuing POST answered {answer.status_code}: {answer.text[:200]}")
        ids.append(answer.json()["job_id"])
    return ids


async def wait_jobs(client: httpx.AsyncClient, job_ids: list[str]) -> dict[str, str]:
    deadline = time.monotonic() + 900
    statuses: dict[str, str] = {}
    while time.monotonic() < deadline:
        pending = [job_id for job_id in job_ids if statuses.get(job_id) not in FINAL]
        if not pending:
            return statuses
        for job_id in pending[:50]:
            statuses[job_id] = (await client.get(f"{API}/jobs/{job_id}")).json()["status"]
        await asyncio.sleep(0.5)
    raise RuntimeError("jobs did not finish")


@dataclass
class Report:
    figures: dict[str, Any] = field(default_factory=dict)

    def add(self, key: str, value: Any) -> None:
        self.figures[key] = value
        print(f"{key}: {value}", flush=True)


async def run(fleet: LoadFleet, *, launches: int, jobs: int, pages: int, report: Report) -> None:
    server = fleet.servers["cc-sqlite-worker"]
    sandbox = fleet.sandbox
    # 1. simultaneous launches
    results = await asyncio.gather(*(one_launch(server.url, sandbox, "pat-1") for _ in range(launches)))
    outcomes: dict[str, int] = {}
    for result in results:
        outcomes[result.outcome] = outcomes.get(result.outcome, 0) + 1
    report.add("launches", launches)
    report.add("launch_outcomes", outcomes)
    report.add("launch_p95_s", round(p([r.seconds for r in results], 0.95), 3))

    # 2. page loads idle, then beside the queue
    session = await launch(server, sandbox, "pat-1", "prac-1")
    bulk = await launch(server, sandbox, "pat-2", "prac-2")
    await page_loads(session.client, 5)  # warm
    idle = await page_loads(session.client, pages)
    started = time.monotonic()
    queuing = asyncio.create_task(queue_jobs(bulk.client, bulk.csrf, bulk.conditions, jobs))
    loaded = await page_loads(session.client, pages)
    job_ids = await queuing
    statuses = await wait_jobs(bulk.client, job_ids)
    drained = time.monotonic() - started
    images = 0
    for job_id in job_ids:
        if statuses[job_id] == "succeeded":
            head = await bulk.client.get(f"/artifacts/{job_id}/png")
            images += int(head.status_code == 200 and head.content.startswith(b"\x89PNG"))
    report.add("jobs", jobs)
    report.add("job_statuses", {s: list(statuses.values()).count(s) for s in sorted(set(statuses.values()))})
    report.add("images", images)
    report.add("queue_drained_s", round(drained, 1))
    report.add("page_idle_p50_s", round(statistics.median(idle), 3))
    report.add("page_idle_p95_s", round(p(idle, 0.95), 3))
    report.add("page_loaded_p50_s", round(statistics.median(loaded), 3))
    report.add("page_loaded_p95_s", round(p(loaded, 0.95), 3))
    report.add("page_p95_ratio", round(p(loaded, 0.95) / p(idle, 0.95), 2))

    # 3. a slow EHR beside the healthy one
    async def healthy_launches(count: int) -> list[float]:
        return [
            r.seconds
            for r in await asyncio.gather(*(one_launch(server.url, sandbox, "pat-1") for _ in range(count)))
        ]

    await asyncio.sleep(6)  # the launch rate limit refills after phase 1
    idle_launch = await healthy_launches(6)
    async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
        slow_started = time.monotonic()
        stuck = [
            asyncio.create_task(client.get("/launch", params={"iss": fleet.slow_iss, "launch": "x"}))
            for _ in range(6)
        ]
        await asyncio.sleep(0.5)
        beside_slow = await healthy_launches(6)
        healthz = []
        for _ in range(20):
            before = time.monotonic()
            await client.get("/healthz")
            healthz.append(time.monotonic() - before)
        slow = await asyncio.gather(*stuck)
        slow_seconds = time.monotonic() - slow_started
    report.add("healthy_launch_idle_p50_s", round(statistics.median(idle_launch), 3))
    report.add("healthy_launch_beside_slow_p50_s", round(statistics.median(beside_slow), 3))
    report.add("healthz_beside_slow_max_s", round(max(healthz), 3))
    report.add("slow_ehr_launch_statuses", sorted({r.status_code for r in slow}))
    report.add("slow_ehr_launches_done_s", round(slow_seconds, 1))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--launches", type=int, default=50)
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--pages", type=int, default=40)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    report = Report()
    slow = SlowEhr()
    try:
        with tempfile.TemporaryDirectory(prefix="cc-load-") as work:
            LoadFleet.slow_iss = slow.iss
            fleet = LoadFleet(Path(work), ["cc-sqlite-worker"], postgres_url="")
            with fleet:
                fleet.start()
                asyncio.run(
                    run(fleet, launches=args.launches, jobs=args.jobs, pages=args.pages, report=report)
                )
    finally:
        slow.close()
    if args.json:
        args.json.write_text(json.dumps(report.figures, indent=2), encoding="utf-8")
    return report.figures


if __name__ == "__main__":
    main(sys.argv[1:])
