"""GPU sweep: FLOPs per UNet step (meta device), images/s, p95 latency under Poisson arrivals, and MFU.

Run:
  python -m bench.bench_gpu --flops-only                 # anywhere: FLOP counts of SD 1.5 and SDXL UNets
  python -m bench.bench_gpu --model-path DIR --peak-tflops 989 --rate 4 --seconds 60   # on a GPU worker
  python -m bench.bench_gpu --suite sdxl-turbo,sd15,sdxl --compile sdxl-turbo   # see bench/gpu_check.sh

``--suite`` needs no model on disk: each family is built full size with random weights on the GPU from its
published configs (bench.gpu_models), then served through CareCanvas's own worker (bench.gpu_serving).

The FLOP count builds the published UNet configs on the meta device (no memory, no weights) with the classic
attention processor, because torch's FLOP counter has no formula for the fused SDPA kernels. MFU counts only
the UNet (text encoder and VAE are a few percent of the work at these sizes), with classifier-free guidance
doubling the UNet batch when guidance > 1.
"""

from __future__ import annotations

import argparse
import logging
import os
import queue
import random
import statistics
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from torch.utils.flop_counter import FlopCounterMode

from bench.bench_gpu_configs import SD15_UNET_CONFIG, SDXL_UNET_CONFIG


@dataclass(frozen=True)
class UnetCost:
    name: str
    parameters: int
    resolution: int
    flops_per_image_step: float


def count_unet_flops(
    name: str, config: dict[str, Any], *, resolution: int, width: int | None = None, height: int | None = None
) -> UnetCost:
    """FLOPs of one UNet forward for one image (batch 1, no CFG) at `resolution`² (or width×height)."""
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor

    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    unet.set_attn_processor(AttnProcessor())
    with torch.device("meta"):
        sample = torch.randn(1, 4, (height or resolution) // 8, (width or resolution) // 8)
        timestep = torch.tensor([500])
        context = torch.randn(1, 77, config["cross_attention_dim"])
        extra: dict[str, Any] = {}
        if config.get("addition_embed_type") == "text_time":
            extra["added_cond_kwargs"] = {"text_embeds": torch.randn(1, 1280), "time_ids": torch.randn(1, 6)}
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        unet(sample, timestep, encoder_hidden_states=context, **extra)
    return UnetCost(
        name=name,
        parameters=sum(p.numel() for p in unet.parameters()),
        resolution=resolution,
        flops_per_image_step=float(counter.get_total_flops()),
    )


# Dense bf16 tensor-core peaks (no sparsity), TFLOP/s, from the vendors' data sheets.
PEAK_BF16_TFLOPS = {
    "H200": 989.0,
    "H100 SXM": 989.0,
    "H100 PCIe": 756.0,
    "H100": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
}


def peak_tflops_of(device_name: str) -> float | None:
    """The dense bf16 peak of a GPU by its name (None when unknown: pass --peak-tflops)."""
    for key, peak in PEAK_BF16_TFLOPS.items():
        if key.replace(" ", "") in device_name.replace(" ", ""):
            return peak
    return None


def print_flop_table() -> list[UnetCost]:
    costs = [
        count_unet_flops("SD 1.5 UNet", SD15_UNET_CONFIG, resolution=512),
        count_unet_flops("SDXL UNet", SDXL_UNET_CONFIG, resolution=1024),
    ]
    print("| model | parameters | resolution | TFLOP per image per step (no CFG) |")
    print("|---|---:|---:|---:|")
    for cost in costs:
        print(
            f"| {cost.name} | {cost.parameters / 1e6:,.1f} M | {cost.resolution}² | "
            f"{cost.flops_per_image_step / 1e12:.3f} |"
        )
    return costs


def serve_poisson(
    *,
    model_path: Path,
    rate: float,
    seconds: float,
    width: int,
    height: int,
    steps: int,
    guidance: float,
    max_wait_ms: float,
    seed: int,
) -> dict[str, float]:
    """Poisson arrivals into a dynamic batcher (up to the cap, or wait max_wait_ms) in front of the engine."""
    from service.generation.engine import DiffusionEngine, ImageRequest, select_device_and_dtype
    from service.generation.models import ModelSpec

    device, dtype = select_device_and_dtype("auto")
    spec = ModelSpec(name="bench", path=model_path)
    engine = DiffusionEngine(spec, device=device, dtype=dtype)
    engine.load(warm_up_buckets=[(width, height, steps, guidance)])
    cap = spec.batch_cap_for(width, height)
    arrivals: queue.Queue[tuple[float, ImageRequest] | None] = queue.Queue()
    latencies: list[float] = []
    batch_sizes: list[int] = []

    def produce() -> None:
        rng = random.Random(seed)
        deadline = time.perf_counter() + seconds
        index = 0
        while time.perf_counter() < deadline:
            time.sleep(rng.expovariate(rate))
            request = ImageRequest(
                f"p-{index}", "a healthy heart", None, index, width, height, steps, guidance
            )
            arrivals.put((time.perf_counter(), request))
            index += 1
        arrivals.put(None)

    producer = threading.Thread(target=produce)
    started = time.perf_counter()
    producer.start()
    finished = False
    while not finished:
        item = arrivals.get()
        if item is None:
            break
        batch = [item]
        wait_until = time.perf_counter() + max_wait_ms / 1000
        while len(batch) < cap:
            try:
                more = arrivals.get(timeout=max(0.0, wait_until - time.perf_counter()))
            except queue.Empty:
                break
            if more is None:
                finished = True
                break
            batch.append(more)
        engine.generate([request for _, request in batch])
        done = time.perf_counter()
        latencies.extend(done - arrived for arrived, _ in batch)
        batch_sizes.append(len(batch))
    producer.join()
    elapsed = time.perf_counter() - started
    latencies.sort()
    return {
        "images": float(len(latencies)),
        "images_per_s": len(latencies) / elapsed,
        "p50_s": statistics.median(latencies),
        "p95_s": latencies[int(0.95 * (len(latencies) - 1))],
        "mean_batch": statistics.mean(batch_sizes),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flops-only", action="store_true", help="only the FLOP count (runs on any machine)")
    parser.add_argument("--model-path", type=Path)
    parser.add_argument("--family", choices=["sd15", "sdxl"], default="sd15", help="UNet FLOPs used for MFU")
    parser.add_argument("--peak-tflops", type=float, help="the GPU's dense peak for the dtype in use")
    parser.add_argument("--rate", type=float, default=2.0, help="mean arrivals per second")
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--height", type=int, default=512)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--max-wait-ms", type=float, default=20.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--suite", help="comma-separated families: sd15, sdxl, sdxl-turbo, flux-schnell")
    parser.add_argument("--compile", default="", help="families to run again with torch.compile")
    parser.add_argument("--budget-seconds", type=float, default=420.0)
    parser.add_argument("--burst", type=int, default=32, help="burst size (×4 for few-step models)")
    parser.add_argument("--poisson-seconds", type=float, default=20.0)
    arguments = parser.parse_args(argv)
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    if arguments.suite:
        from bench.gpu_serving import run_suite

        if not torch.cuda.is_available():
            parser.error("--suite needs a CUDA GPU (the CPU tests build the same families at tiny size)")
        run_suite(
            [name for name in arguments.suite.split(",") if name],
            compiled=[name for name in arguments.compile.split(",") if name],
            peak_tflops=arguments.peak_tflops or peak_tflops_of(torch.cuda.get_device_name()),
            budget_s=arguments.budget_seconds,
            burst_jobs=arguments.burst,
            poisson_seconds=arguments.poisson_seconds,
        )
        return

    print_flop_table()
    if arguments.flops_only:
        return
    if arguments.model_path is None:
        parser.error("--model-path is required unless --flops-only")
    result = serve_poisson(
        model_path=arguments.model_path,
        rate=arguments.rate,
        seconds=arguments.seconds,
        width=arguments.width,
        height=arguments.height,
        steps=arguments.steps,
        guidance=arguments.guidance,
        max_wait_ms=arguments.max_wait_ms,
        seed=arguments.seed,
    )
    print()
    print("| images | images/s | p50 s | p95 s | mean batch | MFU |")
    print("|---:|---:|---:|---:|---:|---:|")
    mfu = "n/a (give --peak-tflops)"
    if arguments.peak_tflops:
        config = SD15_UNET_CONFIG if arguments.family == "sd15" else SDXL_UNET_CONFIG
        # Counted at the served size: attention grows faster than the pixel count, so no rescaling.
        cost = count_unet_flops(
            arguments.family,
            config,
            resolution=arguments.width,
            width=arguments.width,
            height=arguments.height,
        )
        cfg = 2 if arguments.guidance > 1 else 1
        achieved = result["images_per_s"] * arguments.steps * cfg * cost.flops_per_image_step
        mfu = f"{achieved / (arguments.peak_tflops * 1e12):.1%}"
    print(
        f"| {result['images']:.0f} | {result['images_per_s']:.2f} | {result['p50_s']:.2f} | "
        f"{result['p95_s']:.2f} | {result['mean_batch']:.1f} | {mfu} |"
    )


if __name__ == "__main__":
    main()
