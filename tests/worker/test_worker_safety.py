"""The optional safety classifier: configured by name, flagged images stored but marked for the reviewer."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import select

from service.db.models import Job
from service.generation.engine import ImageRequest, bucket_key
from service.generation.safety import (
    BlankImageClassifier,
    SafetyVerdict,
    load_safety_classifier,
    safety_result,
)
from service.generation.tiny import TINY_MODEL_NAME
from service.worker import Worker

SPEC = {
    "model": TINY_MODEL_NAME,
    "prompt": "a knee joint",
    "negative_prompt": None,
    "seed": 5,
    "width": 64,
    "height": 64,
    "steps": 2,
    "guidance": 5.0,
}
BUCKET = bucket_key(ImageRequest("b", "p", None, 0, 64, 64, 2, 5.0), TINY_MODEL_NAME)


class FlagEverything:
    name = "flag-everything"

    def __init__(self) -> None:
        self.prompts: list[str] = []

    def check(self, image: Image.Image, *, prompt: str) -> SafetyVerdict:
        self.prompts.append(prompt)
        return SafetyVerdict(flagged=True, reason="test classifier flags every image")


class Crashes:
    name = "crashes"

    def check(self, image: Image.Image, *, prompt: str) -> SafetyVerdict:
        raise MemoryError("classifier ran out of memory")


def make_factory() -> FlagEverything:
    return FlagEverything()


def not_a_classifier() -> object:
    return object()


def test_no_classifier_by_default() -> None:
    assert load_safety_classifier(None) is None
    assert load_safety_classifier("none") is None
    assert safety_result(None, Image.new("RGB", (8, 8)), prompt="p") == {
        "checked": False,
        "flagged": False,
        "reason": None,
        "classifier": None,
    }


def test_builtin_and_python_classifiers_load_by_name() -> None:
    assert isinstance(load_safety_classifier("blank-image"), BlankImageClassifier)
    loaded = load_safety_classifier(f"python:{__name__}:make_factory")
    assert isinstance(loaded, FlagEverything)


@pytest.mark.parametrize(
    ("choice", "message"),
    [
        ("nsfw-9000", "unknown safety classifier 'nsfw-9000'"),
        ("python:onlymodule", "must look like python:package.module:factory"),
        (f"python:{__name__}:missing_factory", "factory 'missing_factory' not found"),
        (f"python:{__name__}:not_a_classifier", "has no `name` and `check"),
    ],
)
def test_bad_classifier_names_are_refused_clearly(choice: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_safety_classifier(choice)


def test_blank_image_classifier_flags_uniform_images_only() -> None:
    classifier = BlankImageClassifier()
    assert classifier.check(Image.new("RGB", (64, 64)), prompt="p") == SafetyVerdict(
        flagged=True, reason="image is nearly blank (possible filtered output)"
    )
    noise = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    assert not classifier.check(Image.fromarray(noise), prompt="p").flagged
    with pytest.raises(ValueError, match="min_std"):
        BlankImageClassifier(min_std=-1)


def test_a_flag_needs_a_reason() -> None:
    with pytest.raises(ValueError, match="needs a short reason"):
        SafetyVerdict(flagged=True, reason=" ")


def test_a_crashing_classifier_flags_the_image_instead_of_hiding_it() -> None:
    result = safety_result(Crashes(), Image.new("RGB", (8, 8)), prompt="p")
    assert result == {
        "checked": True,
        "flagged": True,
        "reason": "safety check failed (MemoryError)",
        "classifier": "crashes",
    }


async def enqueue_one(queue, sessionmaker) -> str:
    async with sessionmaker() as session, session.begin():
        return await queue.enqueue(
            session, kind="illustration", bucket=BUCKET, spec=SPEC, session_id_hash=None
        )


def worker_with(queue, engine, **options: Any) -> Worker:
    return Worker(
        queue=queue,
        engines={TINY_MODEL_NAME: engine},
        batch_size=8,
        batch_wait_ms=0,
        poll_seconds=0.05,
        **options,
    )


async def test_flagged_image_is_stored_and_its_flag_recorded_before_success(
    queue, sessionmaker, worker_engine
) -> None:
    job_id = await enqueue_one(queue, sessionmaker)
    classifier = FlagEverything()
    recorded: list[tuple[str, str, dict[str, Any]]] = []

    async def record(session, recorded_job: str, result: dict[str, Any]) -> None:
        # In the completion's own transaction: the job is not succeeded yet when the flag is recorded.
        status = (await session.execute(select(Job.status).where(Job.id == recorded_job))).scalar_one()
        recorded.append((recorded_job, status, dict(result)))

    await worker_with(queue, worker_engine, safety=classifier, record_result=record).run_once()
    assert recorded == [
        (
            job_id,
            "running",  # recorded before the job turns succeeded, so nobody sees the image without its flag
            {
                "safety": {
                    "checked": True,
                    "flagged": True,
                    "reason": "test classifier flags every image",
                    "classifier": "flag-everything",
                }
            },
        )
    ]
    assert classifier.prompts == ["a knee joint"]
    assert (await queue.get(job_id)).status == "succeeded"
    assert (await queue.read_artifact(job_id, "png")).startswith(b"\x89PNG")


async def test_a_result_that_cannot_be_recorded_fails_the_job(queue, sessionmaker, worker_engine) -> None:
    job_id = await enqueue_one(queue, sessionmaker)

    async def broken(session, recorded_job: str, result: dict[str, Any]) -> None:
        await asyncio.sleep(0)
        raise ConnectionError("database went away")

    await worker_with(queue, worker_engine, safety=FlagEverything(), record_result=broken).run_once()
    view = await queue.get(job_id)
    assert (view.status, view.error) == ("queued", "recording the result failed: ConnectionError")
    with pytest.raises(LookupError):
        await queue.read_artifact(job_id, "png")
