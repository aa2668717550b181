"""The worker: a pipeline of claim → device → store, so the device never waits on storage or PNG encoding.

While batch N runs on the device, batch N+1 is claimed and prepared, and batch N-1's images are encoded (a
thread pool sized to the host), checked, encrypted and stored with their jobs' completion in one transaction.
Progress goes to an in-memory board every step and to the database once per batch per reporting interval.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import structlog
from PIL import Image
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession

from service import metrics
from service.generation.engine import DiffusionEngine, GenerationCancelled, ImageRequest, PendingPreview
from service.generation.png import DEFAULT_COMPRESS_LEVEL, PREVIEW_COMPRESS_LEVEL, encode_png
from service.generation.safety import SafetyClassifier, safety_result
from service.generation.text import fit_to_token_budget
from service.jobs import ClaimedJob, ImageJobSpec, JobQueue, JobSpecError
from service.jobs.queue import SealedArtifact

log = structlog.get_logger("carecanvas.worker")

# Called for each job being completed, inside the transaction that marks it succeeded, so what it records (the
# safety flag) commits with the image or not at all.
ResultRecorder = Callable[[AsyncSession, str, Mapping[str, Any]], Awaitable[None]]

_MAX_BACKOFF_SECONDS = 30.0
_SWEEP_EVERY_SECONDS = 1.0


class JobRejectedError(ValueError):
    """A job's spec cannot become an image request (the reason is a short category, never patient data)."""


class _RecordingError(Exception):
    """The result recorder failed (as opposed to the database write around it)."""


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


def default_encode_workers() -> int:
    """PNG encoding releases the GIL for most of zlib's work: a thread per core, less one for the loop."""
    return max(1, min(8, (os.cpu_count() or 2) - 1))


@dataclasses.dataclass
class PreparedBatch:
    """Claimed jobs of one bucket with their engine requests, ready for the device."""

    claimed: int
    engine: DiffusionEngine | None
    jobs: list[ClaimedJob]
    requests: list[ImageRequest]

    @property
    def solo(self) -> bool:
        return any(job.solo for job in self.jobs)

    def chunks(self) -> list[tuple[DiffusionEngine, list[ClaimedJob], list[ImageRequest]]]:
        if self.engine is None or not self.requests:
            return []
        first = self.requests[0]
        # The model's cap for this size can be below the worker's batch size (large images batch poorly).
        size = self.engine.spec.batch_cap_for(first.width, first.height)
        return [
            (self.engine, self.jobs[start : start + size], self.requests[start : start + size])
            for start in range(0, len(self.jobs), size)
        ]


@dataclasses.dataclass
class ChunkOutcome:
    """What the device made of one chunk: an image or an error per job, or everything cancelled."""

    jobs: list[ClaimedJob]
    requests: list[ImageRequest]
    images: dict[str, Image.Image]
    errors: dict[str, Exception]
    cancelled: set[str]
    side_writes: list[concurrent.futures.Future[Any]]


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
        progress_interval_seconds: float = 0.5,
        preview_every: int = 4,
        encode_workers: int | None = None,
        compress_level: int = DEFAULT_COMPRESS_LEVEL,
    ) -> None:
        if batch_size < 1 or batch_wait_ms < 0 or poll_seconds <= 0 or heartbeat_seconds <= 0:
            raise ValueError("batch_size ≥ 1, batch_wait_ms ≥ 0, poll_seconds > 0 and heartbeat_seconds > 0")
        if (
            progress_interval_seconds < 0
            or preview_every < 1
            or (encode_workers is not None and encode_workers < 1)
        ):
            raise ValueError("progress_interval_seconds ≥ 0, preview_every ≥ 1 and encode_workers ≥ 1")
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
        self._progress_interval = progress_interval_seconds
        self._preview_every = preview_every
        self._encode_workers = encode_workers or default_encode_workers()
        self._compress_level = compress_level
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._held: set[str] = set()  # claimed and not yet finished here: their leases are renewed
        self._failures = 0
        self._heartbeat_failing = False
        self._last_sweep = float("-inf")
        self.worker_id = worker_id or f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}"

    # -- the loops ----------------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Until ``stop``: claim N+1 and store N-1 while N runs. Stopping releases the unstarted jobs."""
        log.info("worker started", worker_id=self.worker_id, encode_workers=self._encode_workers)
        heartbeat = asyncio.create_task(self._heartbeat())
        # PostgreSQL: jobs queued by other processes ring this worker's doorbell too (LISTEN/NOTIFY).
        listening = self._queue.listener(stop)
        listener = asyncio.create_task(listening) if listening is not None else None
        prefetch: asyncio.Task[PreparedBatch | None] | None = None
        storing: asyncio.Task[None] | None = None
        try:
            while not stop.is_set():
                try:
                    batch = await prefetch if prefetch is not None else await self._next_batch()
                except Exception as error:  # storage down, or a bug: back off, one line per state change
                    prefetch = None
                    await self._trouble(error, stop)
                    continue
                prefetch = None
                self._recovered()
                if batch is None or not batch.jobs:
                    if batch is None:
                        await self._idle(stop)
                    continue
                with contextlib.suppress(Exception):  # a failed top-up only means a smaller batch
                    await self._top_up(batch)
                prefetch = asyncio.create_task(self._next_batch())  # batch N+1, while N runs
                for engine, jobs, requests in batch.chunks():
                    outcome = await self._generate(engine, jobs, requests)
                    if storing is not None:
                        await storing  # at most one batch being stored behind the device
                    storing = asyncio.create_task(self._store_safely(outcome))
        finally:
            if prefetch is not None:
                await self._give_back(prefetch)
            if storing is not None:
                await storing
            for task in (heartbeat, listener):
                if task is not None:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
            self._shutdown_pool()
            log.info("worker stopped", worker_id=self.worker_id)

    async def _idle(self, stop: asyncio.Event) -> None:
        """Until the next poll, a stop, or this process queueing a job (the queue's doorbell)."""
        waits = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(self._queue.doorbell.wait())]
        try:
            await asyncio.wait(waits, timeout=self._poll, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiting in waits:
                waiting.cancel()

    async def run_once(self) -> int:
        """Claim one batch, run it, store it, one stage after the other. Returns how many jobs it claimed."""
        batch = await self._next_batch()
        if batch is None:
            return 0
        heartbeat = asyncio.create_task(self._heartbeat())
        try:
            for engine, jobs, requests in batch.chunks():
                outcome = await self._generate(engine, jobs, requests)
                await self._store(outcome)
        finally:
            heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await heartbeat
        return batch.claimed

    async def _trouble(self, error: Exception, stop: asyncio.Event) -> None:
        self._failures += 1
        delay = min(_MAX_BACKOFF_SECONDS, self._poll * 2 ** min(self._failures - 1, 16))
        if self._failures == 1:
            if isinstance(error, SQLAlchemyError | OSError):
                log.warning(
                    "worker paused: storage unavailable",
                    worker_id=self.worker_id,
                    error_type=type(error).__name__,
                    retry_in_s=round(delay, 2),
                )
            else:
                log.exception(
                    "worker iteration failed", worker_id=self.worker_id, error_type=type(error).__name__
                )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=delay)

    def _recovered(self) -> None:
        if self._failures:
            log.info("worker resumed", worker_id=self.worker_id, failed_iterations=self._failures)
            self._failures = 0

    async def _give_back(self, prefetch: asyncio.Task[PreparedBatch | None]) -> None:
        try:
            batch = await prefetch
        except Exception as error:
            log.warning("prefetch failed while stopping", error_type=type(error).__name__)
            return
        if batch is not None and batch.jobs:
            ids = [job.id for job in batch.jobs]
            with contextlib.suppress(Exception):  # unreleased, they come back when their lease expires
                await self._queue.release(self.worker_id, ids)
            self._held.difference_update(ids)

    # -- stage 1: claim and prepare -----------------------------------------------------------------------

    async def _next_batch(self) -> PreparedBatch | None:
        now = time.monotonic()
        if now - self._last_sweep >= _SWEEP_EVERY_SECONDS:
            await self._queue.sweep_expired()
            self._last_sweep = now
        # Cleared before the claim: a job committed after this point rings again and ends the idle wait.
        self._queue.doorbell.clear()
        jobs = await self._claim(max_jobs=self._batch_size)
        if not jobs:
            return None
        if len(jobs) < self._batch_size and self._batch_wait > 0 and not jobs[0].solo:
            # Dynamic batching: a short wait lets a burst's stragglers join this pipeline call.
            await asyncio.sleep(self._batch_wait)
            jobs += await self._claim(max_jobs=self._batch_size - len(jobs), bucket=jobs[0].bucket)
        return await self._prepare(jobs)

    async def _claim(self, *, max_jobs: int, bucket: str | None = None) -> list[ClaimedJob]:
        jobs = await self._queue.claim_batch(worker_id=self.worker_id, max_jobs=max_jobs, bucket=bucket)
        self._held.update(job.id for job in jobs)
        return jobs

    async def _top_up(self, batch: PreparedBatch) -> None:
        """Jobs that arrived while this batch waited for the device join it (never a solo job's batch)."""
        room = self._batch_size - len(batch.jobs)
        if room <= 0 or batch.solo or batch.engine is None or self._batch_wait <= 0:
            return
        more = await self._claim(max_jobs=room, bucket=batch.jobs[0].bucket)
        if more:
            extra = await self._prepare(more, engine=batch.engine)
            batch.claimed += extra.claimed
            batch.jobs += extra.jobs
            batch.requests += extra.requests

    async def _prepare(
        self, jobs: list[ClaimedJob], *, engine: DiffusionEngine | None = None
    ) -> PreparedBatch:
        log.info("batch claimed", worker_id=self.worker_id, batch_size=len(jobs), bucket=jobs[0].bucket)
        if engine is None:
            try:
                engine = await asyncio.to_thread(self.engines, str(jobs[0].spec.get("model")))
            except Exception as error:  # unknown or unloadable model: every job of the bucket fails alike
                log.warning("model unavailable", worker_id=self.worker_id, error_type=type(error).__name__)
                for job in jobs:
                    await self._queue.fail(
                        job.id, self.worker_id, f"model unavailable: {type(error).__name__}"
                    )
                self._held.difference_update(job.id for job in jobs)
                return PreparedBatch(claimed=len(jobs), engine=None, jobs=[], requests=[])
        accepted: list[ClaimedJob] = []
        requests: list[ImageRequest] = []
        for job in jobs:
            try:
                requests.append(request_from(job, tokenizer=engine.tokenizer))
                accepted.append(job)
            except JobRejectedError as error:
                # Quarantined alone, before the pipeline call, so it cannot sink its neighbours; a spec that
                # cannot become an image now never will, so there is no retry.
                await self._queue.quarantine(job.id, self.worker_id, f"rejected: {error}")
                self._held.discard(job.id)
        return PreparedBatch(claimed=len(jobs), engine=engine, jobs=accepted, requests=requests)

    # -- stage 2: the device ------------------------------------------------------------------------------

    async def _generate(
        self, engine: DiffusionEngine, jobs: list[ClaimedJob], requests: list[ImageRequest]
    ) -> ChunkOutcome:
        outcome = ChunkOutcome(
            jobs=jobs, requests=requests, images={}, errors={}, cancelled=set(), side_writes=[]
        )
        try:
            images = await self._call_pipeline(engine, jobs, requests, outcome)
        except GenerationCancelled:
            outcome.cancelled.update(job.id for job in jobs)
            return outcome
        except Exception as error:
            if len(requests) == 1:
                outcome.errors[jobs[0].id] = error
                return outcome
            # One bad job must not sink the others: retry item by item, failing only the bad ones.
            log.warning(
                "batch failed, retrying one by one", batch_size=len(requests), error_type=type(error).__name__
            )
            for job, request in zip(jobs, requests, strict=True):
                single = await self._generate(engine, [job], [request])
                outcome.images.update(single.images)
                outcome.errors.update(single.errors)
                outcome.cancelled |= single.cancelled
                outcome.side_writes += single.side_writes
            return outcome
        outcome.images.update({job.id: image for job, image in zip(jobs, images, strict=True)})
        return outcome

    async def _call_pipeline(
        self,
        engine: DiffusionEngine,
        jobs: list[ClaimedJob],
        requests: list[ImageRequest],
        outcome: ChunkOutcome,
    ) -> list[Image.Image]:
        loop = asyncio.get_running_loop()
        board = self._queue.board
        job_ids = [job.id for job in jobs]
        cancelled = outcome.cancelled
        board.publish(job_ids, 0, requests[0].steps)
        last = {"report": float("-inf")}
        reports: list[concurrent.futures.Future[Any]] = []
        previews: list[concurrent.futures.Future[Any]] = []

        def in_flight(writes: list[concurrent.futures.Future[Any]]) -> bool:
            return bool(writes) and not writes[-1].done()

        def on_step(step: int, total: int) -> None:
            board.publish(job_ids, step, total)  # a dict write: readers in this process see every step
            now = time.monotonic()
            # One coalesced row write per batch per interval; never two at once, never waited for here.
            if now - last["report"] >= self._progress_interval and not in_flight(reports):
                last["report"] = now
                reports.append(
                    asyncio.run_coroutine_threadsafe(self._report(job_ids, step, total, cancelled), loop)
                )
                outcome.side_writes.append(reports[-1])

        def should_cancel() -> bool:
            cancelled.update(board.cancel_requested(job_ids))
            # Stop the batch only when every job in it was cancelled; others still want their images.
            return len(cancelled) >= len(job_ids)

        def on_pending_preview(step: int, pending: PendingPreview) -> None:
            if not in_flight(previews):  # skipped while the last one is still being written
                previews.append(
                    asyncio.run_coroutine_threadsafe(self._store_previews(job_ids, pending), loop)
                )
                outcome.side_writes.append(previews[-1])

        metrics.BATCH_SIZE.observe(len(requests))
        with metrics.GENERATION_SECONDS.labels(model=engine.spec.name).time():
            return await asyncio.to_thread(
                engine.generate,
                requests,
                on_step=on_step,
                should_cancel=should_cancel,
                on_pending_preview=on_pending_preview if self._previews else None,
                preview_every=self._preview_every,
            )

    async def _report(self, job_ids: list[str], step: int, total: int, cancelled: set[str]) -> None:
        cancelled.update(await self._queue.report_batch_progress(job_ids, step, total))

    async def _store_previews(self, job_ids: list[str], pending: PendingPreview) -> None:
        def seal() -> list[SealedArtifact]:
            frames = pending.images()  # the device sync and decoding happen here, off the denoising loop
            return [
                self._queue.seal(job_id, "preview", encode_png(frame, compress_level=PREVIEW_COMPRESS_LEVEL))
                for job_id, frame in zip(job_ids, frames, strict=True)
            ]

        await self._queue.store_previews(
            await asyncio.get_running_loop().run_in_executor(self._encoder(), seal)
        )

    # -- stage 3: encode and store ------------------------------------------------------------------------

    async def _store_safely(self, outcome: ChunkOutcome) -> None:
        try:
            await self._store(outcome)
        except Exception as error:  # the jobs stay leased until it expires; another attempt makes them again
            log.warning("storing a batch failed", worker_id=self.worker_id, error_type=type(error).__name__)

    async def _store(self, outcome: ChunkOutcome) -> None:
        job_ids = [job.id for job in outcome.jobs]
        try:
            await self._settle_side_writes(outcome)
            cancelled = outcome.cancelled | await self._queue.cancel_requested(job_ids)
            for job in outcome.jobs:
                if job.id in cancelled:
                    await self._queue.mark_cancelled(job.id, self.worker_id)
                elif job.id in outcome.errors:
                    error = outcome.errors[job.id]
                    await self._queue.fail(
                        job.id, self.worker_id, f"generation failed: {type(error).__name__}"
                    )
            ready = [
                (job, request)
                for job, request in zip(outcome.jobs, outcome.requests, strict=True)
                if job.id in outcome.images and job.id not in cancelled
            ]
            if ready:
                await self._complete(ready, outcome.images)
            if outcome.jobs:
                log.info("batch done", worker_id=self.worker_id, batch_size=len(outcome.jobs))
        finally:
            self._held.difference_update(job_ids)
            self._queue.board.forget(job_ids)

    async def _settle_side_writes(self, outcome: ChunkOutcome) -> None:
        # A preview still being written must land before the job turns succeeded (or be skipped as stale).
        results = await asyncio.gather(
            *(asyncio.wrap_future(f) for f in outcome.side_writes), return_exceptions=True
        )
        failures = [result for result in results if isinstance(result, BaseException)]
        if failures:
            log.warning("progress report failed", error_type=type(failures[0]).__name__, count=len(failures))

    async def _complete(
        self, ready: list[tuple[ClaimedJob, ImageRequest]], images: dict[str, Image.Image]
    ) -> None:
        loop = asyncio.get_running_loop()
        pool = self._encoder()
        encoded = await asyncio.gather(
            *(
                loop.run_in_executor(pool, self._encode, job.id, request, images[job.id])
                for job, request in ready
            )
        )
        sealed = {job_id: [artifact] for job_id, artifact, _safety in encoded}
        safety = {job_id: verdict for job_id, _artifact, verdict in encoded}
        for job_id, verdict in safety.items():
            if verdict["flagged"]:
                log.warning("image flagged for the reviewer", job_id=job_id, classifier=verdict["classifier"])
        try:
            done = await self._queue.complete_many(self.worker_id, sealed, hook=self._hook(safety))
            metrics.IMAGES_STORED.inc(len(done))
            return
        except Exception as error:
            if len(sealed) == 1:
                await self._fail_storing(next(iter(sealed)), error)
                return
            log.warning("storing a batch failed, storing one by one", error_type=type(error).__name__)
        for job_id, artifacts in sealed.items():  # one bad record must not cost its batch-mates their images
            try:
                done = await self._queue.complete_many(
                    self.worker_id, {job_id: artifacts}, hook=self._hook(safety)
                )
                metrics.IMAGES_STORED.inc(len(done))
            except Exception as error:
                await self._fail_storing(job_id, error)

    async def _fail_storing(self, job_id: str, error: Exception) -> None:
        cause = error.__cause__ if isinstance(error, _RecordingError) else error
        what = "recording the result" if isinstance(error, _RecordingError) else "storing the result"
        await self._queue.fail(job_id, self.worker_id, f"{what} failed: {type(cause).__name__}")

    def _hook(
        self, safety: Mapping[str, Mapping[str, Any]]
    ) -> Callable[[AsyncSession, list[str]], Awaitable[None]]:
        async def record(session: AsyncSession, job_ids: list[str]) -> None:
            if self._record_result is None:
                return
            for job_id in job_ids:
                try:
                    await self._record_result(session, job_id, {"safety": dict(safety[job_id])})
                except Exception as error:  # without its flag the image must not be shown: no commit
                    raise _RecordingError(type(error).__name__) from error

        return record

    def _encode(
        self, job_id: str, request: ImageRequest, image: Image.Image
    ) -> tuple[str, SealedArtifact, dict[str, Any]]:
        """In the encoding pool: PNG, the safety check and the encryption of one image."""
        png = encode_png(image, compress_level=self._compress_level)
        verdict = safety_result(self._safety, image, prompt=request.prompt)
        return job_id, self._queue.seal(job_id, "png", png), verdict

    def _encoder(self) -> concurrent.futures.ThreadPoolExecutor:
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(
                max_workers=self._encode_workers, thread_name_prefix="carecanvas-encode"
            )
        return self._pool

    def _shutdown_pool(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    # -- leases -------------------------------------------------------------------------------------------

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self._heartbeat_seconds)
            if not self._held:
                continue
            try:
                await self._queue.heartbeat(self.worker_id, list(self._held))
            except Exception as error:  # a missed beat is retried; the lease outlasts a few of them
                if not self._heartbeat_failing:
                    log.warning("heartbeat failed", worker_id=self.worker_id, error_type=type(error).__name__)
                self._heartbeat_failing = True
            else:
                if self._heartbeat_failing:
                    log.info("heartbeat recovered", worker_id=self.worker_id)
                self._heartbeat_failing = False

    def close(self) -> None:
        """Stop the encoding threads (``run`` does this itself when it returns)."""
        self._shutdown_pool()
