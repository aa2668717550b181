"""What the two reference servers share: the tiny pipeline, the burst's fixed request shape, PNG answers."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

WIDTH = HEIGHT = 64
STEPS = 2
GUIDANCE = 7.5


def load_pipeline(model_path: Path) -> Any:
    """The tiny Stable Diffusion pipeline on the CPU, float32, no progress bars (as CareCanvas loads it)."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()
    pipeline = StableDiffusionPipeline.from_pretrained(model_path, local_files_only=True)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def generate(pipeline: Any, prompts: list[str], seeds: list[int]) -> list[Any]:
    """One pipeline call for the whole list (one image per prompt), seeded per image."""
    import torch

    generators = [torch.Generator(device="cpu").manual_seed(seed) for seed in seeds]
    output = pipeline(
        prompt=prompts,
        width=WIDTH,
        height=HEIGHT,
        num_inference_steps=STEPS,
        guidance_scale=GUIDANCE,
        generator=generators,
    )
    return list(output.images)


def png_bytes(image: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


async def parsed(request: Any) -> tuple[str, int]:
    body = await request.json()
    return str(body["prompt"]), int(body.get("seed", 0))
