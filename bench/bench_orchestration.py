"""Per-job orchestration overhead without the pipeline, SQLite vs PostgreSQL, and encrypted vs plain serving.

Run from the repo root: `python -m bench.bench_orchestration [--rounds 7] [--jobs 32]
[--postgres postgresql+psycopg://postgres@127.0.0.1:5432/test]`. Prints markdown tables.

One job's orchestration, timed end to end with the pipeline call left out (the image is made once beforehand):
prompt building from the templates, enqueue + review draft + audit append in one transaction (what the
illustrate workflow writes), the worker's claim, PNG encoding, the result record (safety flag into the draft),
complete (artifact encryption and storage), and reading the artifact back decrypted (what the review page
serves). Backends run in interleaved rounds (the order alternates) on fresh databases, warmed first.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import secrets
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from service.audit import AuditLog, FileCheckpointSink
from service.crypto import Keyring
from service.crypto.keyring import new_key_material
from service.db.engine import make_engine, make_sessionmaker, migrate
from service.documents import DraftContent, SafetyCheck, create_draft, load_document, save_content
from service.generation.engine import ImageRequest, bucket_key
from service.generation.png import encode_png
from service.generation.prompts import Depiction, load_prompt_library
from service.jobs import JobQueue

ROOT = Path(__file__).resolve().parent.parent
MODEL = "carecanvas-tiny-test"


class Backend:
    def __init__(self, name: str, url: str, checkpoints: Path) -> None:
        self.name, self.url = name, url
        self.keyring = Keyring(new_key_material())
        self.audit = AuditLog(keyring=self.keyring, sink=FileCheckpointSink(checkpoints))
        self.engine: Any = None
        self.sessionmaker: async_sessionmaker[AsyncSession]
        self.queue: JobQueue

    async def open(self) -> None:
        await migrate(self.url)
        self.engine = make_engine(self.url)
        self.sessionmaker = make_sessionmaker(self.engine)
        self.queue = JobQueue(self.sessionmaker, self.keyring)

    async def close(self) -> None:
        await self.engine.dispose()


async def one_job(backend: Backend, library: Any, image: Image.Image, index: int) -> dict[str, float]:
    """One job's orchestration; returns the time of each part in ms."""
    marks = {"start": time.perf_counter()}
    prompt = library_prompt(library, index)
    marks["prompt"] = time.perf_counter()
    request = ImageRequest("x", prompt.positive, prompt.negative, index, 64, 64, 2, 1.0)
    async with backend.sessionmaker() as db:
        job_id = await backend.queue.enqueue(
            db,
            kind="illustration",
            bucket=bucket_key(request, MODEL),
            spec={"model": MODEL, "prompt": prompt.positive, "seed": index, "width": 64, "height": 64},
            session_id_hash="s" * 64,
        )
        await create_draft(
            db,
            keyring=backend.keyring,
            job_id=job_id,
            ehr_name="bench",
            content=DraftContent(title=prompt.title, caption=prompt.caption, patient_id=f"pat-{index % 7}"),
        )
        await backend.audit.append(
            db,
            action="generate",
            outcome="success",
            actor="Practitioner/prac-1",
            patient=f"pat-{index % 7}",
            ehr="bench",
            resource="Condition/cond-1",
            request_id=None,
            detail={"job_id": job_id},
        )
        await db.commit()
    marks["enqueue+draft+audit"] = time.perf_counter()
    [claimed] = await backend.queue.claim_batch(worker_id="bench", max_jobs=1)
    marks["claim"] = time.perf_counter()
    png = encode_png(image)
    marks["png"] = time.perf_counter()
    async with backend.sessionmaker() as db:
        document = await load_document(db, keyring=backend.keyring, job_id=claimed.id)
        assert document is not None
        safety = SafetyCheck(checked=False, flagged=False, reason=None, classifier=None)
        await save_content(
            db,
            keyring=backend.keyring,
            document=document,
            content=document.content.model_copy(update={"safety": safety}),
        )
        await db.commit()
    marks["result record"] = time.perf_counter()
    await backend.queue.complete(claimed.id, "bench", artifacts={"png": png})
    marks["complete (encrypt+store)"] = time.perf_counter()
    served = await backend.queue.read_artifact(claimed.id, "png")
    marks["serve (read+decrypt)"] = time.perf_counter()
    assert served == png
    names = list(marks)
    parts = {name: (marks[name] - marks[previous]) * 1000 for previous, name in itertools.pairwise(names)}
    parts["total"] = (marks[names[-1]] - marks["start"]) * 1000
    return parts


def library_prompt(library: Any, index: int) -> Any:
    from service.generation.prompts import build_education_prompt

    conditions = [("http://snomed.info/sct", "44054006"), ("http://snomed.info/sct", "38341003")]
    return build_education_prompt(
        library=library,
        condition_text="Type 2 diabetes",
        codes=[conditions[index % 2]],
        style="flat_vector",
        language="en" if index % 2 else "es",
        depiction=Depiction(),
        tokenizer=None,
    )


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


async def serving_ratio(backend: Backend, png: bytes, folder: Path, repeats: int) -> tuple[float, float]:
    """Median ms to get an image's bytes: the encrypted artifact from the database vs a plain file."""
    async with backend.sessionmaker() as db:
        job_id = await backend.queue.enqueue(
            db, kind="illustration", bucket="serve", spec={"model": MODEL}, session_id_hash=None
        )
        await db.commit()
    [claimed] = await backend.queue.claim_batch(worker_id="bench", max_jobs=1, bucket="serve")
    await backend.queue.complete(claimed.id, "bench", artifacts={"png": png})
    plain = folder / f"{backend.name}-plain.png"
    plain.write_bytes(png)
    encrypted_ms, plain_ms = [], []
    for repeat in range(repeats):
        for variant in ("encrypted", "plain") if repeat % 2 == 0 else ("plain", "encrypted"):
            started = time.perf_counter()
            if variant == "encrypted":
                data = await backend.queue.read_artifact(job_id, "png")
                encrypted_ms.append((time.perf_counter() - started) * 1000)
            else:
                data = await asyncio.to_thread(plain.read_bytes)
                plain_ms.append((time.perf_counter() - started) * 1000)
            assert data == png
    return statistics.median(encrypted_ms), statistics.median(plain_ms)


async def run(rounds: int, jobs: int, postgres_url: str | None, image_size: int) -> None:
    library = load_prompt_library(ROOT / "templates" / "prompts")
    pixels = np.random.default_rng(0).integers(0, 256, (image_size, image_size, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    folder = Path(tempfile.mkdtemp(prefix="bench-orchestration-"))
    backends = [
        Backend("sqlite", f"sqlite+aiosqlite:///{folder / 'bench.db'}", folder / "sqlite-checkpoints")
    ]
    schema = None
    admin = None
    if postgres_url:
        schema = f"bench_{secrets.token_hex(5)}"
        admin = make_engine(postgres_url)
        async with admin.begin() as connection:
            await connection.execute(text(f'CREATE SCHEMA "{schema}"'))
        backends.append(
            Backend(
                "postgresql", f"{postgres_url}?options=-csearch_path%3D{schema}", folder / "pg-checkpoints"
            )
        )
    try:
        for backend in backends:
            await backend.open()
            for index in range(5):  # warm-up: connections, statement caches, key unwrapping
                await one_job(backend, library, image, index)
        results: dict[str, list[dict[str, float]]] = {backend.name: [] for backend in backends}
        for round_index in range(rounds):
            order = backends if round_index % 2 == 0 else list(reversed(backends))
            for backend in order:
                for index in range(jobs):
                    results[backend.name].append(await one_job(backend, library, image, index))
        print(
            f"\nPer-job orchestration overhead (pipeline excluded), {rounds} rounds × {jobs} jobs, "
            f"{image_size}² PNG, ms\n"
        )
        parts = list(next(iter(results.values()))[0])
        header = " | ".join(f"{backend.name} p50 | {backend.name} p95" for backend in backends)
        print(f"| part | {header} |")
        print("|---|" + "---:|" * (2 * len(backends)))
        for part in parts:
            cells = []
            for backend in backends:
                values = [job[part] for job in results[backend.name]]
                cells += [f"{percentile(values, 0.5):.2f}", f"{percentile(values, 0.95):.2f}"]
            print(f"| {part} | " + " | ".join(cells) + " |")
        print("\nServing one image's bytes: encrypted artifact (database read + AES-GCM) vs plain file\n")
        print("| backend | encrypted median ms | plain file median ms | ratio |")
        print("|---|---:|---:|---:|")
        for backend in backends:
            encrypted, plain = await serving_ratio(backend, encode_png(image), folder, repeats=200)
            print(f"| {backend.name} | {encrypted:.3f} | {plain:.3f} | {encrypted / plain:.1f}× |")
    finally:
        for backend in backends:
            if backend.engine is not None:
                await backend.close()
        if admin is not None:
            async with admin.begin() as connection:
                await connection.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
            await admin.dispose()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--jobs", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=512)
    parser.add_argument("--postgres", default="postgresql+psycopg://postgres@127.0.0.1:5432/test")
    parser.add_argument("--no-postgres", action="store_true")
    args = parser.parse_args(argv)
    asyncio.run(run(args.rounds, args.jobs, None if args.no_postgres else args.postgres, args.image_size))


if __name__ == "__main__":
    main()
