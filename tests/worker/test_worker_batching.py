"""The worker on a real JobQueue (SQLite, PostgreSQL) and the real tiny engine: batching, seeds, failures."""

from __future__ import annotations

import asyncio
import contextlib
import io
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from sqlalchemy import func, select

from service.db.models import Artifact
from service.generation.engine import DiffusionEngine, ImageRequest, bucket_key
from service.generation.png import encode_png
from service.generation.tiny import TINY_MODEL_NAME
from service.jobs import JobQueue
from service.worker import Worker

PROMPTS = ("a healthy heart", "lungs with asthma", "a knee joint", "the kidneys", "a calm garden")


def job_spec(
    seed: int, *, width: int = 64, height: int = 64, steps: int = 2, guidance: float = 5.0, **extra: Any
):
    spec: dict[str, Any] = {
        "model": TINY_MODEL_NAME,
        "prompt": PROMPTS[seed % len(PROMPTS)],
        "negative_prompt": "text, watermark",
        "seed": seed,
        "width": width,
        "height": height,
        "steps": steps,
        "guidance": guidance,
    }
    spec.update(extra)
    return spec


def bucket_of(spec: dict[str, Any]) -> str:
    request = ImageRequest(
        "b",
        "p",
        None,
        0,
        int(spec["width"]),
        int(spec["height"]),
        int(spec["steps"]),
        float(spec["guidance"]),
    )
    return bucket_key(request, TINY_MODEL_NAME)


async def enqueue(
    queue: JobQueue, sessionmaker, specs: Sequence[dict[str, Any]], *, bucket: str | None = None
):
    ids = []
    for spec in specs:
        async with sessionmaker() as session, session.begin():
            ids.append(
                await queue.enqueue(
                    session,
                    kind="illustration",
                    bucket=bucket or bucket_of(spec),
                    spec=spec,
                    session_id_hash=None,
                )
            )
    return ids


@contextlib.contextmanager
def pipeline_calls(engine: DiffusionEngine) -> Iterator[list[int]]:
    """Batch sizes of the real pipeline calls, read from the UNet's input (CFG doubles it at guidance > 1)."""
    unet_batches: list[int] = []
    calls: list[int] = []
    steps = {"per_call": 0}

    def on_unet(module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        unet_batches.append(int(args[0].shape[0]))

    handle = engine.pipeline.unet.register_forward_pre_hook(on_unet)
    original = engine.generate

    def generate(requests, **kwargs):
        before = len(unet_batches)
        images = original(requests, **kwargs)
        # One pipeline call runs the UNet once per step, always on the same batch.
        sizes = set(unet_batches[before:])
        assert len(sizes) == 1, sizes
        steps["per_call"] = len(unet_batches) - before
        calls.append(len(requests))
        return images

    engine.generate = generate  # type: ignore[method-assign]
    try:
        yield calls
    finally:
        handle.remove()
        del engine.generate


def loaded(engine_class: type[DiffusionEngine], spec) -> DiffusionEngine:
    engine = engine_class(spec, device=torch.device("cpu"), dtype=torch.float32)
    engine.load()
    return engine


def make_worker(queue: JobQueue, engine: DiffusionEngine, **overrides: Any) -> Worker:
    options: dict[str, Any] = {
        "queue": queue,
        "engines": {TINY_MODEL_NAME: engine},
        "batch_size": 8,
        "batch_wait_ms": 0,
        "poll_seconds": 0.05,
        "worker_id": "worker-under-test",
    }
    options.update(overrides)
    return Worker(**options)


async def drain(worker: Worker, *, limit: int = 50) -> int:
    handled = 0
    for _ in range(limit):
        count = await worker.run_once()
        if count == 0:
            return handled
        handled += count
    raise AssertionError("the worker never ran out of work")


async def png_of(queue: JobQueue, job_id: str) -> bytes:
    return await queue.read_artifact(job_id, "png")


async def test_eight_jobs_of_one_bucket_are_one_pipeline_call(queue, sessionmaker, worker_engine) -> None:
    ids = await enqueue(queue, sessionmaker, [job_spec(seed) for seed in range(8)])
    worker = make_worker(queue, worker_engine)
    with pipeline_calls(worker_engine) as calls:
        assert await drain(worker) == 8
    assert calls == [8]
    for job_id in ids:
        view = await queue.get(job_id)
        assert (view.status, view.attempts, view.progress_step, view.progress_total) == ("succeeded", 1, 2, 2)
        image = Image.open(io.BytesIO(await png_of(queue, job_id)))
        assert image.size == (64, 64)


async def test_mixed_buckets_run_as_separate_batches(queue, sessionmaker, worker_engine) -> None:
    specs = [
        job_spec(0),
        job_spec(1, height=128),
        job_spec(2),
        job_spec(3, steps=3),
        job_spec(4, height=128),
        job_spec(5),
    ]
    ids = await enqueue(queue, sessionmaker, specs)
    worker = make_worker(queue, worker_engine)
    with pipeline_calls(worker_engine) as calls:
        await drain(worker)
    # Oldest job's bucket first; each call holds only its own bucket.
    assert calls == [3, 2, 1]
    sizes = {job_id: Image.open(io.BytesIO(await png_of(queue, job_id))).size for job_id in ids}
    assert [sizes[job_id] for job_id in ids] == [(64, 64), (64, 128), (64, 64), (64, 64), (64, 128), (64, 64)]


async def test_batch_wait_lets_stragglers_join_the_same_call(queue, sessionmaker, worker_engine) -> None:
    await enqueue(queue, sessionmaker, [job_spec(0)])
    worker = make_worker(queue, worker_engine, batch_wait_ms=1500)
    with pipeline_calls(worker_engine) as calls:
        running = asyncio.create_task(worker.run_once())
        await asyncio.sleep(0.3)  # the first job is claimed; the worker is waiting for company
        await enqueue(queue, sessionmaker, [job_spec(seed) for seed in range(1, 8)])
        assert await running == 8
    assert calls == [8]


async def test_without_a_wait_a_lone_job_goes_alone(queue, sessionmaker, worker_engine) -> None:
    await enqueue(queue, sessionmaker, [job_spec(0)])
    worker = make_worker(queue, worker_engine, batch_wait_ms=0)
    with pipeline_calls(worker_engine) as calls:
        first = await worker.run_once()
        await enqueue(queue, sessionmaker, [job_spec(seed) for seed in range(1, 4)])
        await drain(worker)
    assert (first, calls) == (1, [1, 3])


async def test_the_models_batch_cap_splits_a_claimed_batch(
    queue, sessionmaker, worker_model_path, make_worker_spec
) -> None:
    engine = loaded(DiffusionEngine, make_worker_spec(worker_model_path, batch_caps={64: 3}))
    await enqueue(queue, sessionmaker, [job_spec(seed) for seed in range(8)])
    with pipeline_calls(engine) as calls:
        await drain(make_worker(queue, engine))
    assert calls == [3, 3, 2]


async def test_a_seed_gives_the_same_image_alone_and_inside_a_batch(
    queue, sessionmaker, worker_engine
) -> None:
    [alone] = await enqueue(queue, sessionmaker, [job_spec(42)])
    worker = make_worker(queue, worker_engine)
    await drain(worker)
    batch = await enqueue(queue, sessionmaker, [job_spec(seed) for seed in (7, 8, 42, 9, 10, 11, 12, 13)])
    with pipeline_calls(worker_engine) as calls:
        await drain(worker)
    assert calls == [8]

    async def pixels(job_id: str) -> np.ndarray:
        return np.asarray(Image.open(io.BytesIO(await png_of(queue, job_id))), dtype=np.int16)

    alone_pixels, in_batch, neighbour = await pixels(alone), await pixels(batch[2]), await pixels(batch[0])
    # Same starting noise from the per-image generator; CPU float32 kernels block a batch of 8 differently
    # from a batch of 1 (differences of a few 1e-6), which can flip the 8-bit rounding of a rare value.
    difference = np.abs(alone_pixels - in_batch)
    assert difference.max() <= 1
    assert (difference > 0).mean() <= 0.001
    assert np.abs(alone_pixels - neighbour).mean() > 10


async def test_a_repeated_seed_gives_identical_png_bytes(queue, sessionmaker, worker_engine) -> None:
    first, second = await enqueue(queue, sessionmaker, [job_spec(42), job_spec(42)])
    worker = make_worker(queue, worker_engine)
    with pipeline_calls(worker_engine) as calls:
        await drain(worker)
    assert calls == [2]
    assert await png_of(queue, first) == await png_of(queue, second)


async def test_a_rejected_job_fails_alone_and_its_batch_mates_succeed(
    queue, sessionmaker, worker_engine
) -> None:
    good = await enqueue(queue, sessionmaker, [job_spec(seed) for seed in range(5)])
    bad_seed, no_prompt, wrong_bucket = await enqueue(
        queue,
        sessionmaker,
        [job_spec(-1), {k: v for k, v in job_spec(6).items() if k != "prompt"}, job_spec(7, width=72)],
        bucket=bucket_of(job_spec(0)),
    )
    worker = make_worker(queue, worker_engine)
    with pipeline_calls(worker_engine) as calls:
        await drain(worker)
    assert calls == [5]  # the rejected ones never entered the pipeline call
    for job_id in good:
        assert (await queue.get(job_id)).status == "succeeded"
    # Quarantined at once with the reason (a spec that cannot become an image never will): no retry.
    expectations = {
        bad_seed: "rejected: seed must be between 0 and 2**64-1",
        no_prompt: "rejected: job spec lacks 'prompt'",
        wrong_bucket: "rejected: job spec does not match its bucket",
    }
    for job_id, reason in expectations.items():
        view = await queue.get(job_id)
        assert (view.status, view.attempts) == ("quarantined", 1)
        assert view.error.startswith(reason), view.error
    async with sessionmaker() as session:
        images = select(func.count()).select_from(Artifact).where(Artifact.kind == "png")
        artifacts = (await session.execute(images)).scalar_one()
    assert artifacts == 5  # one picture per good job (previews are separate artifacts)


class DeviceErrorEngine(DiffusionEngine):
    """The real engine with the failures a GPU produces and a CPU cannot: a batch runs out of memory, and
    one item hits a device error on its own. Everything else is the real pipeline."""

    bad_seed = 13

    def generate(self, requests, **kwargs):
        if len(requests) > 1:
            raise RuntimeError("CUDA out of memory (simulated)")
        if requests[0].seed == self.bad_seed:
            raise RuntimeError("device-side assert (simulated)")
        return super().generate(requests, **kwargs)


async def test_a_failed_batch_is_retried_item_by_item(
    queue, sessionmaker, worker_model_path, make_worker_spec
) -> None:
    engine = loaded(DeviceErrorEngine, make_worker_spec(worker_model_path))
    ids = await enqueue(queue, sessionmaker, [job_spec(seed) for seed in (10, 11, 13, 12)])
    await drain(make_worker(queue, engine, batch_size=4))
    statuses = [(await queue.get(job_id)).status for job_id in ids]
    assert statuses == ["succeeded", "succeeded", "quarantined", "succeeded"]
    bad = await queue.get(ids[2])
    assert bad.error == "generation failed: RuntimeError"
    assert bad.attempts == 2


async def test_an_unknown_model_fails_its_jobs_with_a_reason(queue, sessionmaker, worker_engine) -> None:
    spec = job_spec(1, model="no-such-model")
    request = ImageRequest("b", "p", None, 0, 64, 64, 2, 5.0)
    [job_id] = await enqueue(queue, sessionmaker, [spec], bucket=bucket_key(request, "no-such-model"))
    await drain(make_worker(queue, worker_engine))
    view = await queue.get(job_id)
    assert (view.status, view.error) == ("quarantined", "model unavailable: KeyError")


async def wait_until(predicate, *, within: float = 30.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not await predicate():
        if loop.time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


async def test_cancellation_stops_a_running_job_between_steps(queue, sessionmaker, worker_engine) -> None:
    [job_id] = await enqueue(queue, sessionmaker, [job_spec(3, steps=400)])
    worker = make_worker(queue, worker_engine)
    running = asyncio.create_task(worker.run_once())

    async def started() -> bool:
        return (await queue.get(job_id)).progress_step >= 1

    await wait_until(started)
    assert await queue.request_cancel(job_id) == "running"
    await running
    view = await queue.get(job_id)
    assert view.status == "cancelled"
    assert 1 <= view.progress_step < 400
    with pytest.raises(LookupError):
        await png_of(queue, job_id)


async def test_cancelling_one_job_of_a_batch_keeps_the_others(queue, sessionmaker, worker_engine) -> None:
    keep, cancel = await enqueue(queue, sessionmaker, [job_spec(1, steps=150), job_spec(2, steps=150)])
    worker = make_worker(queue, worker_engine)
    running = asyncio.create_task(worker.run_once())

    async def started() -> bool:
        return (await queue.get(cancel)).progress_step >= 1

    await wait_until(started)
    await queue.request_cancel(cancel)
    assert await running == 2
    assert (await queue.get(keep)).status == "succeeded"
    assert (await queue.get(cancel)).status == "cancelled"
    with pytest.raises(LookupError):
        await png_of(queue, cancel)


async def test_heartbeats_keep_the_lease_of_a_long_job(sessionmaker, keyring, worker_engine) -> None:
    # A 2 s lease renewed every 0.2 s: ten renewals of slack, so a loaded 2-core machine (torch's threads
    # beside PostgreSQL) delaying one heartbeat does not lose the lease; the job runs well past one lease.
    queue = JobQueue(sessionmaker, keyring, lease_seconds=2, max_attempts=3)
    # A control run without heartbeats shows the sweeper would take the job away.
    for heartbeat_seconds, expect_swept in ((0.2, False), (60.0, True)):
        [job_id] = await enqueue(queue, sessionmaker, [job_spec(5, steps=500)])
        worker = make_worker(queue, worker_engine, heartbeat_seconds=heartbeat_seconds)
        running = asyncio.create_task(worker.run_once())
        swept = 0
        while not running.done():
            swept += await queue.sweep_expired()  # another worker's sweeper
            await asyncio.sleep(0.1)
        await running
        assert (swept > 0) is expect_swept, (heartbeat_seconds, swept)
        if not expect_swept:
            view = await queue.get(job_id)
            assert (view.status, view.attempts) == ("succeeded", 1)
        else:
            await drain(worker)  # let the re-queued copy finish so the next round starts clean


async def test_run_loop_handles_work_then_stops_when_asked(queue, sessionmaker, worker_engine) -> None:
    worker = make_worker(queue, worker_engine)
    stop = asyncio.Event()
    loop_task = asyncio.create_task(worker.run(stop))
    [job_id] = await enqueue(queue, sessionmaker, [job_spec(1)])

    async def finished() -> bool:
        return (await queue.get(job_id)).status == "succeeded"

    await wait_until(finished)
    stop.set()
    await asyncio.wait_for(loop_task, timeout=5)


def test_worker_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="batch_size ≥ 1"):
        Worker(queue=None, engines={}, batch_size=0, batch_wait_ms=0, poll_seconds=1)  # type: ignore[arg-type]


async def test_stored_png_is_the_engine_image_without_metadata(queue, sessionmaker, worker_engine) -> None:
    spec = job_spec(21)
    [job_id] = await enqueue(queue, sessionmaker, [spec])
    await drain(make_worker(queue, worker_engine))
    request = ImageRequest("direct", spec["prompt"], spec["negative_prompt"], 21, 64, 64, 2, 5.0)
    [direct] = worker_engine.generate([request])
    assert await png_of(queue, job_id) == encode_png(direct)
