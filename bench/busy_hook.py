"""Records every diffusers pipeline call's start and end (monotonic seconds) to a file, for device-busy time.

Installed only by the benchmark's server processes (``bench.serving_proc``): the serving code runs unchanged,
the wrapper appends one line per call (a batch, not a step), which costs microseconds.
"""

from __future__ import annotations

import functools
import os
import threading
import time
from pathlib import Path
from typing import Any

ENV = "CARECANVAS_BENCH_BUSY_FILE"


def install(path: Path | None = None) -> None:
    """Wrap the pipeline classes' ``__call__`` so each call is logged as `start end batch` to ``path``."""
    target = path or (Path(os.environ[ENV]) if os.environ.get(ENV) else None)
    if target is None:
        return
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    lock = threading.Lock()
    for cls in (StableDiffusionPipeline, StableDiffusionXLPipeline):
        original = cls.__call__
        if getattr(original, "_bench_wrapped", False):
            continue

        @functools.wraps(original)
        def timed(self: Any, *args: Any, _original: Any = original, **kwargs: Any) -> Any:
            started = time.monotonic()
            try:
                return _original(self, *args, **kwargs)
            finally:
                prompts = kwargs.get("prompt")
                batch = len(prompts) if isinstance(prompts, list) else 1
                with lock:
                    os.write(fd, f"{started:.6f} {time.monotonic():.6f} {batch}\n".encode())

        timed._bench_wrapped = True  # type: ignore[attr-defined]
        cls.__call__ = timed  # type: ignore[method-assign]


def busy_fraction(path: Path, start: float, end: float) -> tuple[float, int]:
    """The share of [start, end] covered by pipeline calls (overlaps merged), and how many calls it holds."""
    if not path.exists() or end <= start:
        return 0.0, 0
    intervals: list[tuple[float, float]] = []
    for line in path.read_text().splitlines():
        begun, ended, _batch = line.split()
        low, high = max(start, float(begun)), min(end, float(ended))
        if high > low:
            intervals.append((low, high))
    intervals.sort()
    covered, current_low, current_high = 0.0, None, None
    for low, high in intervals:
        if current_high is None or low > current_high:
            if current_high is not None and current_low is not None:
                covered += current_high - current_low
            current_low, current_high = low, high
        else:
            current_high = max(current_high, high)
    if current_high is not None and current_low is not None:
        covered += current_high - current_low
    return covered / (end - start), len(intervals)
