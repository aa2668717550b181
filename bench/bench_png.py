"""PNG compress level benchmark: encode time and size per zlib level at 512² and 1024², side by side.

Run: `python -m bench.bench_png [--rounds 5] [--sizes 512,1024] [--quick]`. Prints a markdown table.
The images are synthetic stand-ins for what the worker stores: a smooth "painted" picture (low-frequency
colour fields, soft shapes, fine grain like a diffusion model's texture) and a flat illustration (few colours,
hard edges). Levels run interleaved in each round (the order rotates), and each level's time is reported as a
median and as a ratio to level 6 (Pillow's default) measured in the same round, so load on the machine hits
every level alike.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import numpy as np
from PIL import Image

from service.generation.png import encode_png

LEVELS = tuple(range(10))
BASELINE = 6


def painted(size: int, *, seed: int = 0) -> Image.Image:
    """Smooth colour fields with soft blobs and a little grain (diffusion outputs compress like this)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    channels = []
    for channel in range(3):
        field = np.zeros((size, size), dtype=np.float32)
        for _ in range(6):
            fx, fy, phase = rng.uniform(0.5, 4.0), rng.uniform(0.5, 4.0), rng.uniform(0, 2 * np.pi)
            field += np.sin(2 * np.pi * (fx * x + fy * y) + phase + channel)
        for _ in range(5):
            cx, cy, radius = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.05, 0.2)
            field += 2.5 * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * radius**2))
        channels.append(field)
    rgb = np.stack(channels, axis=-1)
    rgb = (rgb - rgb.min()) / (rgb.max() - rgb.min()) * 220 + 18
    rgb += rng.normal(0, 2.5, rgb.shape)  # the fine grain no prompt can remove
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), mode="RGB")


def flat(size: int, *, seed: int = 1) -> Image.Image:
    """A flat-colour illustration: few colours, hard edges."""
    rng = np.random.default_rng(seed)
    palette = rng.integers(0, 256, size=(6, 3), dtype=np.uint8)
    y, x = np.mgrid[0:size, 0:size]
    index = ((x // (size // 8)) + (y // (size // 6)) + ((x - y) // (size // 5))) % len(palette)
    return Image.fromarray(palette[index], mode="RGB")


def measure(image: Image.Image, *, rounds: int) -> dict[int, tuple[float, float, int]]:
    """Per level: median ms, median ratio to the baseline level's time in the same round, bytes."""
    times: dict[int, list[float]] = {level: [] for level in LEVELS}
    sizes: dict[int, int] = {}
    for level in LEVELS:  # warm-up, and the size (deterministic)
        sizes[level] = len(encode_png(image, compress_level=level))
    for round_index in range(rounds):
        order = LEVELS[round_index % len(LEVELS) :] + LEVELS[: round_index % len(LEVELS)]
        for level in order:
            started = time.perf_counter()
            encode_png(image, compress_level=level)
            times[level].append(time.perf_counter() - started)
    ratios = {
        level: statistics.median(t / b for t, b in zip(times[level], times[BASELINE], strict=True))
        for level in LEVELS
    }
    return {level: (statistics.median(times[level]) * 1000, ratios[level], sizes[level]) for level in LEVELS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--sizes", default="512,1024")
    parser.add_argument("--quick", action="store_true", help="one round at 128² (a smoke test)")
    args = parser.parse_args()
    sizes = [128] if args.quick else [int(size) for size in args.sizes.split(",")]
    rounds = 1 if args.quick else args.rounds
    print(f"Python {platform.python_version()}, {platform.machine()}, Pillow {Image.__version__}")
    print()
    print("| image | size | level | ms (median) | time vs level 6 | KiB | size vs level 6 |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, make in (("painted", painted), ("flat", flat)):
        for size in sizes:
            results = measure(make(size), rounds=rounds)
            base_bytes = results[BASELINE][2]
            for level, (ms, ratio, size_bytes) in results.items():
                print(
                    f"| {name} | {size}² | {level} | {ms:.1f} | {ratio:.2f}× | {size_bytes / 1024:.0f} | "
                    f"{size_bytes / base_bytes:.2f}× |"
                )


if __name__ == "__main__":
    main()
