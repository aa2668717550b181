"""The clinician's workspace (GET /app) with 200 active conditions vs 5: p50 of each and the ratio.

Run from the repo root: ``python -m bench.bench_workspace [--rounds 5] [--requests 20]``.

CareCanvas runs as its own process (``carecanvas serve``, embedded defaults, idle worker) against the sandbox
EHR. Before the run two sandbox patients get Conditions created over FHIR (a transaction with a minted
``user/*.cruds`` token) so one has 5 active conditions and the other 200. Each round loads each patient's
workspace ``--requests`` times one after another (interleaved order), through a real launched session; the
page makes its Patient, Encounter, Condition and DocumentReference reads side by side.

In the same rounds, interleaved, the EHR's own share: the Condition search alone, all pages, as the page
makes it (``_count=100``), straight to the sandbox. The page keeps each condition's topic match (the
process's match cache), so the rounds measure pages whose conditions were matched before (``launch`` loads
the page once); what an empty cache costs is timed in-process too: ``condition_topics`` over the seeded
Conditions with a freshly loaded prompt library each time (median of 5).
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


async def search_times(ehr: httpx.AsyncClient, patient: str, requests: int) -> list[float]:
    """The page's Condition search alone, every page, straight to the EHR."""
    times = []
    for _ in range(requests):
        started = time.perf_counter()
        url: str | None = f"Condition?patient={patient}&clinical-status=active&_count=100"
        while url:
            answer = await ehr.get(url)
            answer.raise_for_status()
            url = next(
                (link["url"] for link in answer.json().get("link", []) if link["relation"] == "next"), None
            )
        times.append(time.perf_counter() - started)
    return times


def cold_matching(sandbox: Any, patient: str, repeats: int = 5) -> float:
    """Median seconds of ``condition_topics`` over the patient's active Conditions with an empty cache."""
    from pathlib import Path

    from fhir_adapters import summarize_condition
    from fhir_adapters.conditions import UNSPECIFIED_CONDITION
    from service.generation.prompts import load_prompt_library
    from service.workflows.topics import condition_topics

    headers = {"Authorization": f"Bearer {sandbox.mint_token()}"}
    url: str | None = f"{sandbox.fhir_base}/Condition?patient={patient}&clinical-status=active&_count=100"
    resources = []
    while url:
        bundle = httpx.get(url, headers=headers, timeout=30).json()
        resources += [entry["resource"] for entry in bundle.get("entry", [])]
        url = next((link["url"] for link in bundle.get("link", []) if link["relation"] == "next"), None)
    conditions = [summarize_condition(resource) for resource in resources]
    times = []
    for _ in range(repeats):
        library = load_prompt_library(Path(__file__).resolve().parents[1] / "templates" / "prompts")
        started = time.perf_counter()
        condition_topics(library, conditions, unspecified=UNSPECIFIED_CONDITION)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


async def run(fleet: Fleet, *, rounds: int, requests: int) -> dict[str, dict[int, list[float]]]:
    server = fleet.servers["cc-sqlite"]
    sessions = {
        size: await launch(server, fleet.sandbox, patient, "prac-1") for patient, size in (SMALL, LARGE)
    }
    patients = {size: patient for patient, size in (SMALL, LARGE)}
    ehr = httpx.AsyncClient(
        base_url=f"{fleet.sandbox.fhir_base}/",
        headers={"Authorization": f"Bearer {fleet.sandbox.mint_token()}"},
        timeout=60,
    )
    try:
        for size, session in sessions.items():
            await page_times(session.client, 3)  # warm: pools, capabilities, templates
            await search_times(ehr, patients[size], 1)
        medians: dict[str, dict[int, list[float]]] = {
            "page": {s: [] for s in sessions},
            "ehr": {s: [] for s in sessions},
        }
        order = list(sessions)
        for round_index in range(rounds):
            for size in order if round_index % 2 == 0 else order[::-1]:
                page = await page_times(sessions[size].client, requests)
                medians["page"][size].append(statistics.median(page))
                medians["ehr"][size].append(
                    statistics.median(await search_times(ehr, patients[size], requests))
                )
            print(
                f"round {round_index + 1}: "
                + ", ".join(
                    f"{size}: {medians['page'][size][-1] * 1000:.0f} ms"
                    f" (EHR search {medians['ehr'][size][-1] * 1000:.0f} ms)"
                    for size in order
                ),
                file=sys.stderr,
            )
        return medians
    finally:
        await ehr.aclose()
        for session in sessions.values():
            await session.client.aclose()


def main(argv: list[str] | None = None) -> dict[str, dict[int, list[float]]]:
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
        cold = {size: cold_matching(fleet.sandbox, patient) for patient, size in (SMALL, LARGE)}
    page, ehr = medians["page"], medians["ehr"]
    paired = [big / little for big, little in zip(page[200], page[5], strict=True)]
    print("| GET /app | 5 conditions | 200 conditions | 200 / 5 |")
    print("|---|---:|---:|---:|")
    print(
        f"| page p50 (median of rounds) | {statistics.median(page[5]) * 1000:.0f} ms "
        f"| {statistics.median(page[200]) * 1000:.0f} ms "
        f"| {statistics.median(paired):.2f}× (paired per round, {min(paired):.2f}–{max(paired):.2f}×) |"
    )
    print(
        f"| EHR Condition search alone, all pages, p50 | {statistics.median(ehr[5]) * 1000:.0f} ms "
        f"| {statistics.median(ehr[200]) * 1000:.0f} ms "
        f"| {statistics.median(ehr[200]) / statistics.median(ehr[5]):.2f}× |"
    )
    print(
        f"| topic matching, empty cache (in-process) | {cold[5] * 1000:.1f} ms | {cold[200] * 1000:.1f} ms "
        f"| {cold[200] / cold[5]:.0f}× |"
    )
    return medians


if __name__ == "__main__":
    main()
