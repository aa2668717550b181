"""Worker test fixtures: the tiny offline pipeline (built once), a loaded engine, a queue on each database."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Before anything imports huggingface_hub: any accidental hub call must fail fast, never reach the network.
os.environ["HF_HUB_OFFLINE"] = "1"

from service.crypto import Keyring
from service.crypto.keyring import new_key_material
from service.generation.engine import DiffusionEngine
from service.generation.models import ModelSpec
from service.generation.tiny import TINY_MODEL_NAME, build_tiny_pipeline
from service.jobs import JobQueue


def worker_tiny_spec(path: Path, **overrides: object) -> ModelSpec:
    values: dict[str, object] = {
        "name": TINY_MODEL_NAME,
        "path": path,
        "default_width": 64,
        "default_height": 64,
        "default_steps": 2,
        "default_guidance": 5.0,
        "batch_caps": {64: 16, 128: 8, 512: 2},
        "is_test_model": True,
    }
    values.update(overrides)
    return ModelSpec.model_validate(values)


@pytest.fixture(scope="session")
def worker_model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_pipeline(tmp_path_factory.mktemp("worker-models") / TINY_MODEL_NAME, seed=0)


@pytest.fixture(scope="session")
def worker_engine(worker_model_path: Path) -> DiffusionEngine:
    engine = DiffusionEngine(
        worker_tiny_spec(worker_model_path), device=torch.device("cpu"), dtype=torch.float32
    )
    engine.load()
    return engine


@pytest.fixture(scope="session")
def make_worker_spec():
    """worker_tiny_spec(path, **overrides) as a fixture (test folders are not packages: no imports)."""
    return worker_tiny_spec


@pytest.fixture
def keyring() -> Keyring:
    return Keyring(new_key_material())


@pytest.fixture
def queue(sessionmaker, keyring) -> JobQueue:
    return JobQueue(sessionmaker, keyring, lease_seconds=30, max_attempts=2)
