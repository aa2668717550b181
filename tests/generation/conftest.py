"""Generation test fixtures: the tiny offline pipeline (built once per session) and a loaded engine."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

# Before anything imports huggingface_hub: any accidental hub call must fail fast, never reach the network.
os.environ["HF_HUB_OFFLINE"] = "1"

from service.generation.engine import DiffusionEngine
from service.generation.models import ModelSpec
from service.generation.tiny import TINY_MODEL_NAME, build_tiny_pipeline


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_pipeline(tmp_path_factory.mktemp("models") / TINY_MODEL_NAME, seed=0)


def tiny_spec(path: Path, **overrides: object) -> ModelSpec:
    """The spec the demo configuration uses for the tiny model (64×64, 2 steps), with overrides."""
    values: dict[str, object] = {
        "name": TINY_MODEL_NAME,
        "path": path,
        "default_width": 64,
        "default_height": 64,
        "default_steps": 2,
        "default_guidance": 5.0,
        "batch_caps": {64: 16, 128: 8, 512: 2},
        "licence": "random weights",
        "is_test_model": True,
    }
    values.update(overrides)
    return ModelSpec.model_validate(values)


@pytest.fixture(scope="session")
def make_tiny_spec() -> Callable[..., ModelSpec]:
    """tiny_spec(path, **overrides) as a fixture (test modules here are not a package, so no imports)."""
    return tiny_spec


@pytest.fixture(scope="session")
def tiny_engine(tiny_model_path: Path) -> DiffusionEngine:
    engine = DiffusionEngine(tiny_spec(tiny_model_path), device=torch.device("cpu"), dtype=torch.float32)
    engine.load()
    return engine
