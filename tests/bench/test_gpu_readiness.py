"""bench/gpu_check.sh's CPU side: each family's published config builds (parameter counts on the meta
device), each architecture runs at tiny size, and the GPU suite's worker path (claim → batch → store) runs on
the CPU with a tiny SD 1.5."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from bench.gpu_models import FAMILIES, build_pipeline, parameter_count

# Published parameter counts (millions, one decimal) of each component.
PUBLISHED = {
    "sd15": {"unet": 859.5, "vae": 83.7, "text_encoder": 123.1},
    "sdxl": {"unet": 2567.5, "vae": 83.7, "text_encoder": 123.1, "text_encoder_2": 694.7},
    "sdxl-turbo": {"unet": 2567.5, "vae": 83.7, "text_encoder": 123.1, "text_encoder_2": 694.7},
    "flux-schnell": {"transformer": 11891.2, "vae": 83.8, "text_encoder": 123.1, "text_encoder_2": 4762.3},
}


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_full_size_configs_match_the_published_models(name: str) -> None:
    pipeline = build_pipeline(name, device="meta")
    assert {k: round(v / 1e6, 1) for k, v in parameter_count(pipeline).items()} == PUBLISHED[name]


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_each_architecture_generates_at_tiny_size(name: str) -> None:
    pipeline = build_pipeline(name, tiny=True)
    pipeline.set_progress_bar_config(disable=True)
    extra = {} if name == "flux-schnell" else {"guidance_scale": FAMILIES[name].guidance}
    images = pipeline(
        prompt=["a healthy heart", "lungs"],
        width=64,
        height=64,
        num_inference_steps=1,
        output_type="np",
        **extra,
    ).images
    assert images.shape == (2, 64, 64, 3)


def test_the_worker_path_serves_a_tiny_model(tmp_path: Path) -> None:
    from bench.gpu_serving import serve_family

    result = asyncio.run(
        serve_family("sd15", work=tmp_path, device="cpu", burst_jobs=4, poisson_seconds=0.5, tiny=True)
    )
    assert result.images_per_s > 0
    assert 0 < result.busy <= 1
    assert result.p50_s <= result.p95_s
    assert result.mfu is None  # no peak given on the CPU


def test_peak_lookup() -> None:
    from bench.bench_gpu import peak_tflops_of

    assert peak_tflops_of("NVIDIA H200") == 989.0
    assert peak_tflops_of("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops_of("Some GPU") is None
