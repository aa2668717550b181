"""The worker loop: claim a batch of one bucket, run the pipeline once for all of it, store the results."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import structlog

from service.generation.engine import DiffusionEngine, GenerationCancelled, ImageRequest
from service.generation.png import encode_png
from service.generation.text import fit_to_token_budget
from service.jobs import ClaimedJob, JobQueue

log = structlog.get_logger("carecanvas.worker")


def request_from(job: ClaimedJob, *, tokenizer: Any) -> ImageRequest:
    spec = job.spec
    negative = spec.get("negative_prompt")
    return ImageRequest(
        job_id=job.id,
        # Fitted with the pipeline's own tokenizer so diffusers never truncates (and never logs the prompt).
        prompt=fit_to_token_budget(spec["prompt"], tokenizer=tokenizer),
        negative_prompt=fit_to_token_budget(negative, tokenizer=tokenizer) if negative else None,
        seed=int(spec["seed"]),
        width=int(spec["width"]),
        height=int(spec["height"]),
        steps=int(spec["steps"]),
        guidance=float(spec["guidance"]),
    )


class Worker:
    """One per pipeline (one per GPU). The pipeline runs in a thread; the loop stays responsive."""

    def __init__(
        self,
        *,
        queue: JobQueue,
        engines: dict[str, DiffusionEngine] | Callable[[str], DiffusionEngine],
        batch_size: int,
        batch_wait_ms: int,
        poll_seconds: float,
        heartbeat_seconds: float = 10.0,
        worker_id: str | None = None,
    ) -> None:
        self._queue = queue
        self.engines: Callable[[str], DiffusionEngine] = (
            engines.__getitem__ if isinstance(engines, dict) else engines
        )
        self._batch_size = batch_size
        self._batch_wait = batch_wait_ms / 1000
        self._poll = poll_seconds
        self._heartbeat_seconds = heartbeat_seconds
        self.worker_id = worker_id or f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}"

    async def run(self, stop: asyncio.Event) -> None:
        log.info("worker started", worker_id=self.worker_id)
        while not stop.is_set():
            try:
                handled = await self.run_once()
            except Exception as error:  # the loop must survive a bad batch; the jobs carry the reason
                log.exception("worker iteration failed", error_type=type(error).__name__)
                handled = 0
            if handled == 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=self._poll)
        log.info("worker stopped", worker_id=self.worker_id)

    async def run_once(self) -> int:
        """Sweep expired leases, claim one batch, run it. Returns how many jobs were handled."""
        await self._queue.sweep_expired()
        jobs = await self._queue.claim_batch(worker_id=self.worker_id, max_jobs=self._batch_size)
        if not jobs:
            return 0
        if len(jobs) < self._batch_size and self._batch_wait > 0:
            # Dynamic batching: a short wait lets a burst's stragglers join this pipeline call.
            await asyncio.sleep(self._batch_wait)
            jobs += await self._queue.claim_batch(
                worker_id=self.worker_id, max_jobs=self._batch_size - len(jobs), bucket=jobs[0].bucket
            )
        await self._run_batch(jobs)
        return len(jobs)

    async def _run_batch(self, jobs: list[ClaimedJob]) -> None:
        engine = await asyncio.to_thread(self.engines, jobs[0].spec["model"])
        requests = [request_from(job, tokenizer=engine.tokenizer) for job in jobs]
        log.info("batch claimed", worker_id=self.worker_id, batch_size=len(jobs), bucket=jobs[0].bucket)
        heartbeat = asyncio.create_task(self._heartbeat([job.id for job in jobs]))
        try:
            images = await self._generate(engine, jobs, requests)
            if images is None:
                return
            for job, image in zip(jobs, images, strict=True):
                png = await asyncio.to_thread(encode_png, image)
                await self._queue.complete(job.id, self.worker_id, artifacts={"png": png})
            log.info("batch done", worker_id=self.worker_id, batch_size=len(jobs))
        finally:
            heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await heartbeat

    async def _generate(
        self, engine: DiffusionEngine, jobs: Sequence[ClaimedJob], requests: list[ImageRequest]
    ) -> list[Any] | None:
        loop = asyncio.get_running_loop()
        job_ids = [job.id for job in jobs]
        cancelled: set[str] = set()

        def on_step(step: int, total: int) -> None:
            for job_id in job_ids:
                asyncio.run_coroutine_threadsafe(self._queue.report_progress(job_id, step, total), loop)

        def should_cancel() -> bool:
            future = asyncio.run_coroutine_threadsafe(self._queue.cancel_requested(job_ids), loop)
            cancelled.update(future.result(timeout=10))
            # Stop the batch only when every job in it was cancelled; others still want their images.
            return len(cancelled) == len(job_ids)

        try:
            return await asyncio.to_thread(
                engine.generate, requests, on_step=on_step, should_cancel=should_cancel
            )
        except GenerationCancelled:
            for job_id in job_ids:
                await self._queue.mark_cancelled(job_id, self.worker_id)
            return None
        except Exception as error:
            if len(requests) == 1:
                await self._queue.fail(
                    job_ids[0], self.worker_id, f"generation failed: {type(error).__name__}"
                )
                return None
            # One bad job must not sink the others: retry item by item, failing only the bad ones.
            log.warning(
                "batch failed, retrying one by one", batch_size=len(requests), error_type=type(error).__name__
            )
            for job, request in zip(jobs, requests, strict=True):
                try:
                    [image] = await asyncio.to_thread(engine.generate, [request])
                except Exception as single_error:
                    await self._queue.fail(
                        job.id, self.worker_id, f"generation failed: {type(single_error).__name__}"
                    )
                    continue
                png = await asyncio.to_thread(encode_png, image)
                await self._queue.complete(job.id, self.worker_id, artifacts={"png": png})
            return None

    async def _heartbeat(self, job_ids: list[str]) -> None:
        while True:
            await asyncio.sleep(self._heartbeat_seconds)
            await self._queue.heartbeat(self.worker_id, job_ids)
