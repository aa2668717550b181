"""The worker loop: claim a batch of one bucket, run the pipeline once for all of it, store the results."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import socket
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import structlog
from PIL import Image

from service.generation.engine import DiffusionEngine, GenerationCancelled, ImageRequest
from service.generation.png import encode_png
from service.generation.safety import SafetyClassifier, safety_result
from service.generation.text import fit_to_token_budget
from service.jobs import ClaimedJob, ImageJobSpec, JobQueue, JobSpecError

log = structlog.get_logger("carecanvas.worker")

# Called with (job id, result) before the job is marked succeeded, so what it records (the safety flag) is in
# place before anyone can see the image.
ResultRecorder = Callable[[str, Mapping[str, Any]], Awaitable[None]]


class JobRejectedError(ValueError):
    """A job's spec cannot become an image request (the reason is a short category, never patient data)."""


def request_from(job: ClaimedJob, *, tokenizer: Any) -> ImageRequest:
    """The engine request for a claimed job; JobRejectedError when the spec is incomplete or inconsistent."""
    try:
        # The same ImageJobSpec the web side wrote: its messages name the field, never the prompt.
        spec = ImageJobSpec.from_mapping(job.spec)
    except JobSpecError as error:
        raise JobRejectedError(str(error)) from None
    if spec.bucket != job.bucket:
        # Batched with jobs it does not match, it would make the whole pipeline call fail.
        raise JobRejectedError("job spec does not match its bucket")
    return ImageRequest(
        job_id=job.id,
        # Fitted with the pipeline's own tokenizer: diffusers never truncates (nor logs the prompt).
        prompt=fit_to_token_budget(spec.prompt, tokenizer=tokenizer),
        negative_prompt=fit_to_token_budget(spec.negative_prompt, tokenizer=tokenizer)
        if spec.negative_prompt
        else None,
        seed=spec.seed,
        width=spec.width,
        height=spec.height,
        steps=spec.steps,
        guidance=spec.guidance,
    )


def _chunks(items: list[Any], size: int) -> list[list[Any]]:
    return [items[start : start + size] for start in range(0, len(items), size)]


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
        safety: SafetyClassifier | None = None,
        record_result: ResultRecorder | None = None,
        previews: bool = True,
    ) -> None:
        if batch_size < 1 or batch_wait_ms < 0 or poll_seconds <= 0 or heartbeat_seconds <= 0:
            raise ValueError("batch_size ≥ 1, batch_wait_ms ≥ 0, poll_seconds > 0 and heartbeat_seconds > 0")
        self._queue = queue
        self._previews = previews
        self.engines: Callable[[str], DiffusionEngine] = (
            engines.__getitem__ if isinstance(engines, dict) else engines
        )
        self._batch_size = batch_size
        self._batch_wait = batch_wait_ms / 1000
        self._poll = poll_seconds
        self._heartbeat_seconds = heartbeat_seconds
        self._safety = safety
        self._record_result = record_result
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
        log.info("batch claimed", worker_id=self.worker_id, batch_size=len(jobs), bucket=jobs[0].bucket)
        heartbeat = asyncio.create_task(self._heartbeat([job.id for job in jobs]))
        try:
            model = jobs[0].spec.get("model")
            try:
                engine = await asyncio.to_thread(self.engines, str(model))
            except Exception as error:  # unknown or unloadable model: every job of the bucket fails alike
                log.warning("model unavailable", worker_id=self.worker_id, error_type=type(error).__name__)
                for job in jobs:
                    await self._queue.fail(
                        job.id, self.worker_id, f"model unavailable: {type(error).__name__}"
                    )
                return
            accepted: list[tuple[ClaimedJob, ImageRequest]] = []
            for job in jobs:
                try:
                    accepted.append((job, request_from(job, tokenizer=engine.tokenizer)))
                except JobRejectedError as error:
                    # Rejected alone, before the pipeline call, so it cannot sink its neighbours.
                    await self._queue.fail(job.id, self.worker_id, f"rejected: {error}")
            if not accepted:
                return
            first = accepted[0][1]
            # The model's cap for this size can be below the worker's batch size (large images batch poorly).
            for chunk in _chunks(accepted, engine.spec.batch_cap_for(first.width, first.height)):
                await self._run_chunk(engine, [job for job, _ in chunk], [request for _, request in chunk])
            log.info("batch done", worker_id=self.worker_id, batch_size=len(jobs))
        finally:
            heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await heartbeat

    async def _run_chunk(
        self, engine: DiffusionEngine, jobs: Sequence[ClaimedJob], requests: list[ImageRequest]
    ) -> None:
        job_ids = [job.id for job in jobs]
        cancelled: set[str] = set()
        try:
            images = await self._generate(engine, job_ids, requests, cancelled)
        except GenerationCancelled:
            for job_id in job_ids:
                await self._queue.mark_cancelled(job_id, self.worker_id)
            return
        except Exception as error:
            if len(requests) == 1:
                await self._queue.fail(
                    job_ids[0], self.worker_id, f"generation failed: {type(error).__name__}"
                )
                return
            # One bad job must not sink the others: retry item by item, failing only the bad ones.
            log.warning(
                "batch failed, retrying one by one", batch_size=len(requests), error_type=type(error).__name__
            )
            for job, request in zip(jobs, requests, strict=True):
                await self._run_chunk(engine, [job], [request])
            return
        # A job cancelled while its batch-mates ran on gets no result, even though its image exists.
        cancelled |= await self._queue.cancel_requested(job_ids)
        for job, request, image in zip(jobs, requests, images, strict=True):
            if job.id in cancelled:
                await self._queue.mark_cancelled(job.id, self.worker_id)
            else:
                await self._store(job, request, image)

    async def _store(self, job: ClaimedJob, request: ImageRequest, image: Image.Image) -> None:
        def encode_and_check() -> tuple[bytes, dict[str, Any]]:
            return encode_png(image), safety_result(self._safety, image, prompt=request.prompt)

        png, safety = await asyncio.to_thread(encode_and_check)
        if safety["flagged"]:
            log.warning("image flagged for the reviewer", job_id=job.id, classifier=safety["classifier"])
        if self._record_result is not None:
            try:
                await self._record_result(job.id, {"safety": safety})
            except Exception as error:  # without its flag the image must not be shown: fail, retry later
                await self._queue.fail(
                    job.id, self.worker_id, f"recording the result failed: {type(error).__name__}"
                )
                return
        await self._queue.complete(job.id, self.worker_id, artifacts={"png": png})

    async def _generate(
        self,
        engine: DiffusionEngine,
        job_ids: list[str],
        requests: list[ImageRequest],
        cancelled: set[str],
    ) -> list[Image.Image]:
        loop = asyncio.get_running_loop()
        reports: list[concurrent.futures.Future[None]] = []

        async def report(step: int, total: int) -> None:
            for job_id in job_ids:
                if await self._queue.report_progress(job_id, step, total):
                    cancelled.add(job_id)

        def on_step(step: int, total: int) -> None:
            # The pipeline never waits for the database: while a report is in flight, later steps skip theirs.
            if reports and not reports[-1].done():
                return
            reports.append(asyncio.run_coroutine_threadsafe(report(step, total), loop))

        def should_cancel() -> bool:
            # Stop the batch only when every job in it was cancelled; others still want their images.
            return len(cancelled) == len(job_ids)

        previews: list[concurrent.futures.Future[None]] = []

        async def store_previews(frames: list[Image.Image]) -> None:
            for job_id, frame in zip(job_ids, frames, strict=True):
                await self._queue.store_preview(job_id, encode_png(frame, compress_level=1))

        def on_preview(step: int, frames: list[Image.Image]) -> None:
            # Latent-resolution frames, no VAE: cheap. Skipped while the previous one is still being stored.
            if previews and not previews[-1].done():
                return
            previews.append(asyncio.run_coroutine_threadsafe(store_previews(frames), loop))

        try:
            return await asyncio.to_thread(
                engine.generate,
                requests,
                on_step=on_step,
                should_cancel=should_cancel,
                on_preview=on_preview if self._previews else None,
            )
        finally:
            outcomes = await asyncio.gather(
                *(asyncio.wrap_future(f) for f in (*reports, *previews)), return_exceptions=True
            )
            failures = [outcome for outcome in outcomes if isinstance(outcome, BaseException)]
            if failures:
                log.warning("progress report failed", error_type=type(failures[0]).__name__)

    async def _heartbeat(self, job_ids: list[str]) -> None:
        while True:
            await asyncio.sleep(self._heartbeat_seconds)
            try:
                await self._queue.heartbeat(self.worker_id, job_ids)
            except Exception as error:  # a missed beat is retried; the lease outlasts a few of them
                log.warning("heartbeat failed", worker_id=self.worker_id, error_type=type(error).__name__)
