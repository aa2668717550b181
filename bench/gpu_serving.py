"""The real worker path on a GPU: full-size random-weight models, claim → batch → store, burst and Poisson.

For each family (bench.gpu_models): build on the device in bf16, save to a local folder, load it back the way
a worker does (``DiffusionEngine`` from the folder: SDPA attention, optional ``torch.compile``, warm-up at the
bucket's cap), then run CareCanvas's ``Worker`` against a SQLite queue (encryption and storage on):

- burst: ``jobs`` queued at once: images/s, the pipeline's busy fraction (bench.busy_hook), MFU of the
  denoiser on that (dominant, only) bucket;
- Poisson arrivals at ``rate_fraction`` of the burst rate for ``seconds``: p50/p95 of queued → stored.

Latency comes from the jobs table itself (``created_at`` → ``finished_at``, both the queue's clock).
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import random
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import busy_hook
from bench.gpu_models import FAMILIES, Family, build_pipeline


@dataclass
class FamilyResult:
    family: str
    compiled: bool
    burst_images: int
    images_per_s: float
    busy: float
    mfu: float | None
    poisson_rate: float
    p50_s: float
    p95_s: float
    mean_batch: float
    setup_s: float

    bucket: str = ""

    def row(self) -> str:
        mfu = "–" if self.mfu is None else f"{self.mfu:.1%}"
        return (
            f"| {self.family}{' (compiled)' if self.compiled else ''} | {self.bucket} "
            f"| {self.images_per_s:.2f} "
            f"| {self.busy:.0%} | {mfu} | "
            f"{self.poisson_rate:.2f}/s | {self.p50_s:.2f} s | {self.p95_s:.2f} s | {self.mean_batch:.1f} | "
            f"{self.setup_s:.0f} s |"
        )


HEADER = (
    "| model | bucket | burst img/s | pipeline busy | MFU (denoiser) | Poisson rate | p50 | p95 | mean batch "
    "| setup |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"
)


def denoiser_flops_per_image_step(family: Family) -> float:
    """FLOPs of one denoiser forward for one image at the family's size (no CFG)."""
    from bench.bench_gpu import count_unet_flops
    from bench.bench_gpu_configs import FLUX_TRANSFORMER_CONFIG, SD15_UNET_CONFIG, SDXL_UNET_CONFIG

    if family.name == "flux-schnell":
        # Analytic (torch's FLOP counter has no formula for the fused attention FLUX always uses):
        # 2 FLOPs per parameter per token, plus QKᵀ and AV over image + text tokens in all 57 blocks.
        cfg = FLUX_TRANSFORMER_CONFIG
        params = 11.9e9
        tokens = (family.width // 16) * (family.height // 16) + 256
        hidden = cfg["num_attention_heads"] * cfg["attention_head_dim"]
        blocks = cfg["num_layers"] + cfg["num_single_layers"]
        return 2 * params * tokens + 4 * blocks * tokens * tokens * hidden
    config = SD15_UNET_CONFIG if family.name == "sd15" else SDXL_UNET_CONFIG
    return count_unet_flops(family.name, config, resolution=family.width).flops_per_image_step


async def _enqueue(services: Any, spec: Any, seed: int) -> str:
    from service.jobs import ImageJobSpec, JobKind

    job = ImageJobSpec(
        model=spec.name,
        prompt="an illustration of a healthy heart",
        negative_prompt=None,
        seed=seed,
        width=spec.default_width,
        height=spec.default_height,
        steps=spec.default_steps,
        guidance=spec.default_guidance,
    )
    async with services.sessionmaker() as db:
        job_id: str = await services.queue.enqueue(
            db, kind=JobKind.ILLUSTRATION, bucket=job.bucket, spec=job.to_dict(), session_id_hash="b" * 64
        )
        await db.commit()
    return job_id


async def _wait_done(services: Any, ids: list[str], *, limit_s: float) -> list[tuple[float, float]]:
    """(queued, finished) epoch seconds of each job once all succeeded."""
    from sqlalchemy import select

    from service.db.models import Job

    deadline = time.monotonic() + limit_s
    while True:
        async with services.read_sessions()() as db:
            rows = (
                await db.execute(select(Job.status, Job.created_at, Job.finished_at).where(Job.id.in_(ids)))
            ).all()
        if all(row.status == "succeeded" for row in rows) and len(rows) == len(ids):
            return [(row.created_at.timestamp(), row.finished_at.timestamp()) for row in rows]
        bad = [row.status for row in rows if row.status in ("failed", "quarantined", "cancelled")]
        if bad:
            raise RuntimeError(f"jobs ended {bad[:3]}")
        if time.monotonic() > deadline:
            raise TimeoutError("the worker did not finish the jobs in time")
        await asyncio.sleep(0.05)


async def serve_family(
    name: str,
    *,
    work: Path,
    device: str = "cuda",
    compile_denoiser: bool = False,
    burst_jobs: int = 64,
    poisson_seconds: float = 30.0,
    rate_fraction: float = 0.7,
    peak_tflops: float | None = None,
    seed: int = 0,
    tiny: bool = False,
) -> FamilyResult:
    import torch

    from service.generation.engine import DiffusionEngine
    from service.generation.models import ModelSpec
    from service.services import build_services
    from service.settings import Settings
    from service.worker import Worker

    family = FAMILIES[name]
    if tiny:  # the CPU test: the same path at a few channels, 64², 2 steps
        family = dataclasses.replace(family, width=64, height=64, steps=2, batch_cap=4)
    started = time.perf_counter()
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    folder = work / f"model-{name}"
    if not (folder / "model_index.json").exists():
        pipeline = build_pipeline(name, device=device, dtype=dtype, tiny=tiny)
        pipeline.save_pretrained(folder, safe_serialization=True)
        del pipeline
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    spec = ModelSpec(
        name=f"bench-{name}",
        path=folder,
        pipeline_class=family.pipeline_class,
        default_width=family.width,
        default_height=family.height,
        default_steps=family.steps,
        default_guidance=family.guidance,
        supports_negative_prompt=family.name != "flux-schnell",
        batch_caps={max(family.width, family.height): family.batch_cap},
    )
    engine = DiffusionEngine(spec, device=torch.device(device), dtype=dtype, compile=compile_denoiser)
    engine.load(warm_up_buckets=[(family.width, family.height, family.steps, family.guidance)])
    data = work / f"data-{name}-{int(compile_denoiser)}"
    settings = Settings(data_dir=data, embedded_worker=False, default_model=spec.name)
    services = await build_services(settings)
    busy_file = work / f"busy-{name}-{int(compile_denoiser)}.log"
    busy_file.unlink(missing_ok=True)
    busy_hook.install(busy_file)
    worker = Worker(
        queue=services.queue,
        engines={spec.name: engine},
        batch_size=family.batch_cap,
        batch_wait_ms=5,
        poll_seconds=0.01,
        previews=True,
    )
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    setup = time.perf_counter() - started
    try:
        ids = [await _enqueue(services, spec, seed + index) for index in range(burst_jobs)]
        times = await _wait_done(services, ids, limit_s=600)
        first, last = min(q for q, _ in times), max(f for _, f in times)
        rate = len(times) / (last - first)
        offset = time.monotonic() - time.time()  # epoch → monotonic, for the hook's timestamps
        busy, calls = busy_hook.busy_fraction(busy_file, first + offset, last + offset)
        mfu = None
        if peak_tflops:
            cfg = 2 if family.guidance > 1 else 1
            achieved = rate * family.steps * cfg * denoiser_flops_per_image_step(family)
            mfu = achieved / (peak_tflops * 1e12)
        poisson_rate = max(0.1, rate * rate_fraction)
        arrivals = random.Random(seed)
        poisson_ids: list[str] = []
        deadline = time.monotonic() + poisson_seconds
        while time.monotonic() < deadline:
            await asyncio.sleep(arrivals.expovariate(poisson_rate))
            poisson_ids.append(await _enqueue(services, spec, seed + burst_jobs + len(poisson_ids)))
        latencies = sorted(f - q for q, f in await _wait_done(services, poisson_ids, limit_s=600))
    finally:
        stop.set()
        await task
        await services.aclose()
    return FamilyResult(
        family=name,
        compiled=compile_denoiser,
        burst_images=burst_jobs,
        images_per_s=rate,
        busy=busy,
        mfu=mfu,
        poisson_rate=poisson_rate,
        p50_s=statistics.median(latencies),
        p95_s=latencies[int(0.95 * (len(latencies) - 1))],
        mean_batch=burst_jobs / max(1, calls),
        setup_s=setup,
        bucket=f"{family.width}² · {family.steps} steps · cfg {family.guidance:g}",
    )


def run_suite(
    families: list[str],
    *,
    compiled: list[str],
    peak_tflops: float | None,
    budget_s: float,
    burst_jobs: int,
    poisson_seconds: float,
    device: str = "cuda",
) -> list[FamilyResult]:
    """Each family in turn (the compiled variants after their eager run) while the time budget lasts."""
    import torch

    results: list[FamilyResult] = []
    deadline = time.monotonic() + budget_s
    plan = [(name, False) for name in families] + [(name, True) for name in compiled]
    with tempfile.TemporaryDirectory(prefix="cc-bench-gpu-") as folder:
        for name, compile_denoiser in plan:
            if time.monotonic() > deadline:
                print(f"skipped {name}{' compiled' if compile_denoiser else ''}: out of time", flush=True)
                continue
            try:
                result = asyncio.run(
                    serve_family(
                        name,
                        work=Path(folder),
                        device=device,
                        compile_denoiser=compile_denoiser,
                        burst_jobs=burst_jobs * (4 if FAMILIES[name].steps <= 4 else 1),
                        poisson_seconds=poisson_seconds,
                        peak_tflops=peak_tflops,
                    )
                )
            except torch.OutOfMemoryError:
                print(f"skipped {name}: does not fit in this GPU's memory", flush=True)
                continue
            finally:
                gc.collect()
                if device == "cuda":
                    torch.cuda.empty_cache()
            results.append(result)
            print(
                HEADER if len(results) == 1 else "",
                result.row(),
                sep="\n" if len(results) == 1 else "",
                flush=True,
            )
    return results
