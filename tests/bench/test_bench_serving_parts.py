"""The serving benchmark's own arithmetic and its reference batcher (the full `--quick` run, real servers:
test_bench_serving_quick.py)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from bench import batcher_server
from bench.bench_serving import Burst, Sample, ratios, table
from bench.busy_hook import busy_fraction


def test_busy_fraction_merges_overlapping_calls_and_clips_to_the_window(tmp_path: Path) -> None:
    log = tmp_path / "busy"
    log.write_text("0.0 2.0 8\n1.0 3.0 8\n5.0 6.0 1\n9.0 12.0 4\n")
    fraction, calls = busy_fraction(log, 1.0, 10.0)
    assert calls == 4
    assert abs(fraction - (2.0 + 1.0 + 1.0) / 9.0) < 1e-9  # [1,3] merged, [5,6], [9,10] clipped
    assert busy_fraction(tmp_path / "missing", 0, 1) == (0.0, 0)


def test_burst_statistics_and_paired_ratios() -> None:
    fast = Burst([Sample(sent=0.0, done=1.0 + i / 10, posted=0.01) for i in range(10)], cpu_s=0.5, busy=0.9)
    slow = Burst([Sample(sent=0.0, done=4.0 + i / 10) for i in range(10)], cpu_s=2.0, busy=0.5)
    assert abs(fast.images_per_s - 10 / 1.9) < 1e-9
    assert fast.percentile(0.5) in (1.4, 1.5)
    assert fast.post_p50 == 0.01
    assert slow.post_p50 is None
    results = {"naive": [slow], "batcher": [slow], "cc-sqlite": [fast]}
    assert "| cc-sqlite / naive | 2.58× |" in ratios(results)
    assert "| cc-sqlite | 5.3 |" in table(results, 10)


class _CountingPipeline:
    """Stands in for the diffusers pipeline: records how many prompts each call got."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def __call__(self, *, prompt: list[str], **_kwargs: Any) -> Any:
        from PIL import Image

        self.calls.append(len(prompt))
        return SimpleNamespace(images=[Image.new("RGB", (8, 8)) for _ in prompt])


def test_the_reference_batcher_groups_concurrent_requests_up_to_eight() -> None:
    pipeline = _CountingPipeline()

    async def run() -> list[bytes]:
        queue: asyncio.Queue[Any] = asyncio.Queue()
        loop_task = asyncio.create_task(batcher_server.batch_loop(pipeline, queue))
        futures = [asyncio.get_running_loop().create_future() for _ in range(20)]
        for index, future in enumerate(futures):
            queue.put_nowait((f"p{index}", index, future))
        try:
            return list(await asyncio.gather(*futures))
        finally:
            loop_task.cancel()

    pngs = asyncio.run(run())
    assert all(png.startswith(b"\x89PNG") for png in pngs)
    assert pipeline.calls == [8, 8, 4]
