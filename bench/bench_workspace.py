"""The clinician's workspace (GET /app) with 200 active conditions vs 5: p50 of each and the ratio.

Run from the repo root: ``python -m bench.bench_workspace [--rounds 5] [--requests 20]``.

CareCanvas runs as its own process (``carecanvas serve``, embedded defaults, idle worker) against the sandbox
EHR. Before the run two sandbox patients get Conditions created over FHIR (a transaction with a minted
``user/*.cruds`` token) so one has 5 active conditions and the other 200. Each round loads each patient's
workspace ``--requests`` times one after another (interleaved order), through a real launched session; the
page makes its Patient, Encounter, Condition and DocumentReference reads side by side.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from typing import Any

import httpx

from bench.bench_serving import POSTGRES_URL, Fleet, launch, work_dir

SMALL, LARGE = ("pat-5", 5), ("pat-3", 200)


def condition(patient: str, index: int) -> dict[str, Any]:
    return {
        "resourceType": "Condition",
        "subject": {"reference": f"Patient/{patient}"},
        "clinicalStatus": {
            "coding": [
                {"system": "http://terminology.hl7.org/CodeSystem/condition-clinical", "code": "active"}
            ]
        },
        "code": {"text": f"Bench condition {index}"},
    }


def active_count(fhir_base: str, token: str, patient: str) -> int:
    headers = {"Authorization": f"Bearer {token}"}
    url: str | None = f"{fhir_base}/Condition?patient={patient}&clinical-status=active&_count=100"
    total = 0
    while url:
        bundle = httpx.get(url, headers=headers, timeout=30).json()
        total += len(bundle.get("entry", []))
        url = next((link["url"] for link in bundle.get("link", []) if link["relation"] == "next"), None)
    return total


def seed(sandbox: Any, patient: str, wanted: int) -> int:
    """Create Conditions until the patient has ``wanted`` active ones; returns the count found afterwards."""
    token = sandbox.mint_token()
    missing = wanted - active_count(sandbox.fhir_base, token, patient)
    if missing > 0:
        bundle = {
            "resourceType": "Bundle",
            "type": "transaction",
            "entry": [
                {"resource": condition(patient, index), "request": {"method": "POST", "url": "Condition"}}
                for index in range(missing)
            ],
        }
        answer = httpx.post(
            sandbox.fhir_base,
            json=bundle,
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/fhir+json"},
            timeout=60,
        )
        answer.raise_for_status()
    return active_count(sandbox.fhir_base, token, patient)


async def page_times(client: httpx.AsyncClient, requests: int) -> list[float]:
    times = []
    for _ in range(requests):
        started = time.perf_counter()
        answer = await client.get("/app")
        if answer.status_code != 200:
            raise RuntimeError(f"GET /app answered {answer.status_code}")
        times.append(time.perf_counter() - started)
    return times


async def run(fleet: Fleet, *, rounds: int, requests: int) -> dict[int, list[float]]:
    server = fleet.servers["cc-sqlite"]
    sessions = {
        size: await launch(server, fleet.sandbox, patient, "prac-1") for patient, size in (SMALL, LARGE)
    }
    try:
        for session in sessions.values():
            await page_times(session.client, 3)  # warm: pools, capabilities, templates
        medians: dict[int, list[float]] = {size: [] for size in sessions}
        order = list(sessions)
        for round_index in range(rounds):
            for size in order if round_index % 2 == 0 else order[::-1]:
                medians[size].append(statistics.median(await page_times(sessions[size].client, requests)))
            print(
                f"round {round_index + 1}: "
                + ", ".join(f"{size}: {medians[size][-1] * 1000:.0f} ms" for size in order),
                file=sys.stderr,
            )
        return medians
    finally:
        for session in sessions.values():
            await session.client.aclose()


def main(argv: list[str] | None = None) -> dict[int, list[float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--keep", action="store_true")
    arguments = parser.parse_args(argv)
    with work_dir(arguments.keep) as work, Fleet(work, ["cc-sqlite"], POSTGRES_URL) as fleet:
        fleet.start()
        counts = {size: seed(fleet.sandbox, patient, size) for patient, size in (SMALL, LARGE)}
        if counts != {5: 5, 200: 200}:
            raise RuntimeError(f"seeding gave {counts} active conditions")
        medians = asyncio.run(run(fleet, rounds=arguments.rounds, requests=arguments.requests))
    small, large = statistics.median(medians[5]), statistics.median(medians[200])
    paired = [big / little for big, little in zip(medians[200], medians[5], strict=True)]
    print("| GET /app | p50 (median of rounds) |")
    print("|---|---:|")
    print(f"| 5 active conditions | {small * 1000:.0f} ms |")
    print(f"| 200 active conditions | {large * 1000:.0f} ms |")
    print(
        f"| ratio 200 / 5 (paired per round: median, min–max) | {statistics.median(paired):.2f}× "
        f"({min(paired):.2f}–{max(paired):.2f}×) |"
    )
    return medians


if __name__ == "__main__":
    main()
