"""Starting generation inside a process: the tiny offline model on first use, engines, the worker task."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import structlog
from sqlalchemy.ext.asyncio import AsyncSession

from service.documents import SafetyCheck, load_document, save_content
from service.generation.cpu_threads import configure_cpu_inference
from service.generation.engine import DiffusionEngine, select_device_and_dtype
from service.generation.models import ModelSpec
from service.generation.safety import SafetyClassifier, load_safety_classifier
from service.generation.tiny import build_tiny_pipeline
from service.services import Services
from service.worker import ResultRecorder, Worker

log = structlog.get_logger("carecanvas.runtime")


def ensure_model_present(spec: ModelSpec) -> None:
    """The test model is built offline from configs on first start; real models must already be on disk."""
    if (spec.path / "model_index.json").exists():
        return
    if not spec.is_test_model:
        raise FileNotFoundError(f"model {spec.name!r} is not at {spec.path}; copy it there first")
    log.info("building the tiny offline test model", model=spec.name)
    build_tiny_pipeline(spec.path)


class EngineCache:
    """One engine (one pipeline) per model, loaded on first use, in this worker only."""

    def __init__(self, services: Services, *, device_preference: str) -> None:
        self._services = services
        self._device, self._dtype = select_device_and_dtype(device_preference)
        configure_cpu_inference(self._device, services.settings.worker_torch_threads)
        self._engines: dict[str, DiffusionEngine] = {}

    def __call__(self, model_name: str) -> DiffusionEngine:
        engine = self._engines.get(model_name)
        if engine is None:
            spec = self._services.models.get(model_name)
            ensure_model_present(spec)
            engine = DiffusionEngine(spec, device=self._device, dtype=self._dtype)
            engine.load()
            self._engines[model_name] = engine
        return engine


def configured_safety_classifier(services: Services) -> SafetyClassifier | None:
    """A classifier placed in services.extras (tests, embedding code) wins over the environment setting."""
    if "safety_classifier" in services.extras:
        chosen: SafetyClassifier | None = services.extras["safety_classifier"]
        return chosen
    return load_safety_classifier(services.settings.safety_classifier)


def document_result_recorder(services: Services) -> ResultRecorder:
    """Records a job's result (the safety verdict) in its draft document, which the review page reads.

    It runs in the worker's completion transaction: the verdict and the image commit together.
    """

    async def record(db: AsyncSession, job_id: str, result: Mapping[str, Any]) -> None:
        if "safety" not in result:
            return  # the safety verdict is the only result a draft shows
        safety = SafetyCheck.model_validate(result["safety"])
        document = await load_document(db, keyring=services.keyring, job_id=job_id)
        if document is None:
            return  # jobs without a review draft (benchmarks, scripts) have nowhere to show it
        content = document.content.model_copy(update={"safety": safety})
        await save_content(db, keyring=services.keyring, document=document, content=content)

    return record


def make_worker(services: Services) -> Worker:
    settings = services.settings
    safety = configured_safety_classifier(services)
    log.info("safety classifier", classifier=safety.name if safety is not None else "none")
    return Worker(
        queue=services.queue,
        engines=EngineCache(services, device_preference=settings.device),
        batch_size=settings.worker_batch_size,
        batch_wait_ms=settings.worker_batch_wait_ms,
        poll_seconds=settings.worker_poll_seconds,
        # Three beats per lease, so a short configured lease never expires under a live worker.
        heartbeat_seconds=min(10.0, max(0.1, settings.job_lease_seconds / 3)),
        safety=safety,
        record_result=document_result_recorder(services),
        previews=settings.worker_previews,
        progress_interval_seconds=settings.worker_progress_interval_seconds,
        preview_every=settings.worker_preview_every_steps,
        encode_workers=settings.worker_encode_threads or None,
    )


async def start_embedded_worker(services: Services, stop: asyncio.Event) -> asyncio.Task[None]:
    """Embedded mode: the default model is prepared before the app answers, then the worker runs alongside."""
    worker = make_worker(services)
    engines = worker.engines
    await asyncio.to_thread(engines, services.settings.default_model)
    return asyncio.create_task(worker.run(stop), name="carecanvas-embedded-worker")
