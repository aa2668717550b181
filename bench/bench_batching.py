"""Batching benchmark: engine batch 8 vs batch 1, engine vs raw pipeline, engine vs naive thread-pool serving.

Run: `python -m bench.bench_batching [--rounds 5] [--jobs 64] [--model-path DIR]`. Prints a markdown table.
All variants run in the same process, warmed first, in interleaved rounds (the order rotates each round);
the reported numbers are per-round ratios (paired), so machine noise that hits a round hits every variant.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from service.generation.engine import DiffusionEngine, ImageRequest, select_device_and_dtype
from service.generation.models import ModelSpec
from service.generation.tiny import TINY_MODEL_NAME, build_tiny_pipeline

WIDTH = HEIGHT = 64
STEPS = 2
GUIDANCE = 5.0
BATCH = 8
PROMPTS = ("a healthy heart", "lungs with asthma", "a knee joint", "the kidneys and bladder")


def burst(jobs: int) -> list[ImageRequest]:
    return [
        ImageRequest(
            f"bench-{index}", PROMPTS[index % len(PROMPTS)], None, index, WIDTH, HEIGHT, STEPS, GUIDANCE
        )
        for index in range(jobs)
    ]


def chunks(requests: list[ImageRequest], size: int) -> list[list[ImageRequest]]:
    return [requests[start : start + size] for start in range(0, len(requests), size)]


def engine_batched(engine: DiffusionEngine, requests: list[ImageRequest], batch: int) -> None:
    for chunk in chunks(requests, batch):
        engine.generate(chunk)


def raw_pipeline_batched(engine: DiffusionEngine, requests: list[ImageRequest], batch: int) -> None:
    """The same work as engine_batched, calling the diffusers pipeline directly (no engine code at all)."""
    pipeline = engine.pipeline
    for chunk in chunks(requests, batch):
        pipeline(  # type: ignore[operator]
            prompt=[request.prompt for request in chunk],
            width=WIDTH,
            height=HEIGHT,
            num_inference_steps=STEPS,
            guidance_scale=GUIDANCE,
            generator=[torch.Generator().manual_seed(request.seed) for request in chunk],
            output_type="pil",
        )


def naive_serving(engine: DiffusionEngine, requests: list[ImageRequest]) -> None:
    """diffusers' example server: every request is its own pipeline call in the default thread executor,
    on a per-request pipeline view (`from_pipe`) with a fresh scheduler, all requests in flight at once."""
    shared = engine.pipeline

    def one(request: ImageRequest) -> None:
        scheduler = shared.scheduler.from_config(shared.scheduler.config)  # type: ignore[attr-defined]
        pipeline = type(shared).from_pipe(shared, scheduler=scheduler)
        pipeline.set_progress_bar_config(disable=True)
        pipeline(
            prompt=request.prompt,
            width=WIDTH,
            height=HEIGHT,
            num_inference_steps=STEPS,
            guidance_scale=GUIDANCE,
            generator=torch.Generator().manual_seed(request.seed),
            output_type="pil",
        )

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        await asyncio.gather(*(loop.run_in_executor(None, one, request) for request in requests))

    asyncio.run(serve())


def timed(run: Callable[[], None]) -> float:
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


def quiet_libraries() -> None:
    """Benchmarks print a table; progress bars and per-call library warnings (from_pipe's dtype note) would
    drown it and cost time in the naive variant."""
    import structlog
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--jobs", type=int, default=64)
    parser.add_argument(
        "--model-path", type=Path, default=None, help="default: build the tiny model in a temp dir"
    )
    arguments = parser.parse_args(argv)
    quiet_libraries()
    load_before = os.getloadavg()

    with tempfile.TemporaryDirectory(prefix="carecanvas-bench-") as scratch:
        model_path = arguments.model_path or build_tiny_pipeline(Path(scratch) / TINY_MODEL_NAME)
        device, dtype = select_device_and_dtype("auto")
        spec = ModelSpec(name="bench", path=model_path, batch_caps={WIDTH: BATCH})
        engine = DiffusionEngine(spec, device=device, dtype=dtype)
        engine.load()
        requests = burst(arguments.jobs)
        variants: dict[str, Callable[[], None]] = {
            "engine_b8": lambda: engine_batched(engine, requests, BATCH),
            "engine_b1": lambda: engine_batched(engine, requests, 1),
            "raw_b8": lambda: raw_pipeline_batched(engine, requests, BATCH),
            "naive_threads": lambda: naive_serving(engine, requests),
        }
        # Warm every shape and code path once before measuring.
        for run in variants.values():
            run()
        times: dict[str, list[float]] = {name: [] for name in variants}
        names = list(variants)
        for round_index in range(arguments.rounds):
            rotation = round_index % len(names)
            for name in names[rotation:] + names[:rotation]:
                times[name].append(timed(variants[name]))

    def ratios(slow: str, fast: str) -> list[float]:
        return [slow_time / fast_time for slow_time, fast_time in zip(times[slow], times[fast], strict=True)]

    def best_ratio(slow: str, fast: str) -> float:
        # Ratio of the fastest rounds: the least disturbed by other processes on a shared machine.
        return min(times[slow]) / min(times[fast])

    comparisons = [
        ("engine batch 8 vs batch 1 (throughput ×)", "engine_b1", "engine_b8", 2.0),
        ("engine vs raw pipeline, batch 8 (throughput ×)", "raw_b8", "engine_b8", 0.9),
        ("engine batch 8 vs naive thread-pool serving (throughput ×)", "naive_threads", "engine_b8", 2.0),
    ]
    load_after = os.getloadavg()
    print(
        f"machine: {platform.platform()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{torch.get_num_threads()} intra-op threads, device {device}, {dtype}"
    )
    print(
        f"workload: burst of {arguments.jobs} jobs, {WIDTH}x{HEIGHT}, {STEPS} steps, guidance {GUIDANCE}, "
        f"{arguments.rounds} interleaved rounds after warm-up; "
        f"load average {load_before[0]:.2f} before, {load_after[0]:.2f} after\n"
    )
    print("| variant | median s per burst | best s per burst | images/s (best) |")
    print("|---|---:|---:|---:|")
    for name, samples in times.items():
        print(
            f"| {name} | {statistics.median(samples):.3f} | {min(samples):.3f} | "
            f"{arguments.jobs / min(samples):.1f} |"
        )
    print()
    print(
        "| comparison | paired median | paired min | paired max | best vs best | goal | met (best vs best) |"
    )
    print("|---|---:|---:|---:|---:|---:|---|")
    for label, slow, fast, goal in comparisons:
        values = ratios(slow, fast)
        best = best_ratio(slow, fast)
        met = "yes" if best >= goal else "NO"
        print(
            f"| {label} | {statistics.median(values):.2f} | {min(values):.2f} | {max(values):.2f} | "
            f"{best:.2f} | ≥ {goal} | {met} |"
        )


if __name__ == "__main__":
    main()
