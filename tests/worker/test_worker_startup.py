"""`carecanvas worker` as a real process: configuration, model switching, safety flag, shutdown."""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from service.documents import DraftContent, SafetyCheck, create_draft, load_document
from service.generation.engine import DiffusionEngine, ImageRequest, bucket_key
from service.generation.models import ModelSpec
from service.generation.tiny import TINY_MODEL_NAME, build_tiny_pipeline
from service.services import build_services
from service.settings import Settings

SECOND_MODEL = "tiny-seed-1"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def spec_for(model: str, seed: int) -> dict[str, object]:
    return {
        "model": model,
        "prompt": "a calm garden",
        "negative_prompt": None,
        "seed": seed,
        "width": 64,
        "height": 64,
        "steps": 2,
        "guidance": 1.0,
    }


def second_model_entry(path: Path) -> dict[str, object]:
    return {
        "name": SECOND_MODEL,
        "path": str(path),
        "pipeline_class": "StableDiffusionPipeline",
        "default_width": 64,
        "default_height": 64,
        "default_steps": 2,
        "default_guidance": 1.0,
        "is_test_model": True,
    }


@pytest.fixture
def worker_env(tmp_path: Path) -> dict[str, str]:
    second = build_tiny_pipeline(tmp_path / "models" / SECOND_MODEL, seed=1)
    models_file = tmp_path / "models.json"
    models_file.write_text(json.dumps([second_model_entry(second)]), encoding="utf-8")
    env = {key: value for key, value in os.environ.items() if not key.startswith("CARECANVAS_")}
    env.update(
        {
            "HF_HUB_OFFLINE": "1",
            "CARECANVAS_DATA_DIR": str(tmp_path / "data"),
            "CARECANVAS_MODELS_FILE": str(models_file),
            "CARECANVAS_DEFAULT_MODEL": SECOND_MODEL,
            "CARECANVAS_DEVICE": "cpu",
            "CARECANVAS_WORKER_METRICS_PORT": str(free_port()),
            "CARECANVAS_WORKER_POLL_SECONDS": "0.05",
            "CARECANVAS_SAFETY_CLASSIFIER": "blank-image",
            "CARECANVAS_LOG_LEVEL": "INFO",
        }
    )
    return env


def settings_from(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    for key, value in env.items():
        if key.startswith("CARECANVAS_"):
            monkeypatch.setenv(key, value)
    return Settings()


async def enqueue_with_draft(services, model: str, seed: int) -> str:
    spec = spec_for(model, seed)
    request = ImageRequest("b", "p", None, 0, 64, 64, 2, 1.0)
    async with services.sessionmaker() as db, db.begin():
        job_id = await services.queue.enqueue(
            db, kind="illustration", bucket=bucket_key(request, model), spec=spec, session_id_hash=None
        )
        await create_draft(
            db, keyring=services.keyring, job_id=job_id, ehr_name="sandbox", content=DraftContent(model=model)
        )
    return job_id


def direct_image(path: Path, seed: int) -> np.ndarray:
    spec = ModelSpec(name="direct", path=path, is_test_model=True)
    engine = DiffusionEngine(spec, device=torch.device("cpu"), dtype=torch.float32)
    engine.load()
    [image] = engine.generate([ImageRequest("direct", "a calm garden", None, seed, 64, 64, 2, 1.0)])
    return np.asarray(image, dtype=np.int16)


async def wait_finished(services, job_ids: list[str], process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        views = [await services.queue.get(job_id) for job_id in job_ids]
        if all(view.finished for view in views):
            return
        if process.poll() is not None:
            raise AssertionError(f"worker exited early: {process.stderr.read().decode()[-2000:]}")
        await asyncio.sleep(0.2)
    raise AssertionError("worker did not finish the jobs")


async def test_worker_process_uses_configured_models_and_records_safety(
    worker_env: dict[str, str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    settings = settings_from(worker_env, monkeypatch)
    assert settings.default_model == SECOND_MODEL
    services = await build_services(settings)  # migrates the SQLite file and makes the key file
    try:
        switched = await enqueue_with_draft(services, settings.default_model, seed=3)
        builtin = await enqueue_with_draft(services, TINY_MODEL_NAME, seed=3)
        process = await asyncio.to_thread(
            subprocess.Popen,
            [sys.executable, "-m", "service.cli", "worker", "--metrics-host", "127.0.0.1"],
            env=worker_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            await wait_finished(services, [switched, builtin], process)
            port = worker_env["CARECANVAS_WORKER_METRICS_PORT"]
            async with httpx.AsyncClient() as client:
                metrics = await client.get(f"http://127.0.0.1:{port}/metrics")
            assert metrics.status_code == 200
            assert "python_info" in metrics.text
        finally:
            process.send_signal(signal.SIGTERM)
            stdout, stderr = await asyncio.to_thread(process.communicate, timeout=60)
        assert process.returncode == 0, stderr.decode()[-2000:]
        for job_id in (switched, builtin):
            assert (await services.queue.get(job_id)).status == "succeeded"
        # The job naming the configured second model got that model's weights (built with another seed).
        switched_pixels = np.asarray(
            Image.open(io.BytesIO(await services.queue.read_artifact(switched, "png"))), dtype=np.int16
        )
        builtin_pixels = np.asarray(
            Image.open(io.BytesIO(await services.queue.read_artifact(builtin, "png"))), dtype=np.int16
        )
        second_path = Path(worker_env["CARECANVAS_MODELS_FILE"]).parent / "models" / SECOND_MODEL
        assert np.abs(switched_pixels - direct_image(second_path, 3)).max() <= 1
        assert np.abs(builtin_pixels - direct_image(settings.tiny_model_dir, 3)).max() <= 1
        assert np.abs(switched_pixels - builtin_pixels).mean() > 10
        async with services.sessionmaker() as db:
            document = await load_document(db, keyring=services.keyring, job_id=switched)
        assert document.content.safety == SafetyCheck(
            checked=True, flagged=False, reason=None, classifier="blank-image"
        )
        assert document.content.model == SECOND_MODEL
        log_text = stdout.decode() + stderr.decode()
        assert "batch claimed" in log_text
        assert "a calm garden" not in log_text  # prompts never reach the logs
    finally:
        await services.engine.dispose()


def test_worker_refuses_an_unknown_safety_classifier(worker_env: dict[str, str]) -> None:
    worker_env["CARECANVAS_SAFETY_CLASSIFIER"] = "nsfw-9000"
    result = subprocess.run(
        [sys.executable, "-m", "service.cli", "worker", "--metrics-host", "127.0.0.1"],
        env=worker_env,
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert result.returncode != 0
    assert b"unknown safety classifier 'nsfw-9000'" in result.stderr
