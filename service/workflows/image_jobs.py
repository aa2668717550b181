"""Enqueue one image job for a model's defaults: the spec the worker reads and the bucket it batches by."""

from __future__ import annotations

import uuid

from sqlalchemy.ext.asyncio import AsyncSession

from service.generation.models import ModelSpec
from service.jobs import ImageJobSpec, JobKind, JobPriority, JobQueue
from service.workflows.job_caps import JobOwner, check_room


async def enqueue_image_job(
    db: AsyncSession,
    *,
    queue: JobQueue,
    model: ModelSpec,
    kind: JobKind,
    prompt: str,
    negative_prompt: str | None,
    seed: int,
    owner: JobOwner,
    priority: JobPriority = JobPriority.INTERACTIVE,
) -> str:
    """In the caller's transaction, so the draft and the audit record commit with the job or not at all.

    A clinician's page or a single API request is interactive (claimed ahead of bulk work); batch and bulk
    callers pass ``JobPriority.BULK``.

    Refused with TooManyJobsError when the owner's session or user is at its cap of unfinished jobs.
    Returns the new job's id.
    """
    await check_room(db, owner)
    spec = image_job_spec(model, prompt=prompt, negative_prompt=negative_prompt, seed=seed)
    job_id = str(uuid.uuid4())
    await queue.enqueue(
        db,
        kind=kind,
        bucket=spec.bucket,
        spec=spec.to_dict(),
        session_id_hash=owner.session_id_hash,
        job_id=job_id,
        priority=priority,
        owner_key=owner.owner_key,
    )
    return job_id


def image_job_spec(model: ModelSpec, *, prompt: str, negative_prompt: str | None, seed: int) -> ImageJobSpec:
    """The spec of one image at the model's defaults (its bucket is what the worker batches by)."""
    return ImageJobSpec(
        model=model.name,
        prompt=prompt,
        negative_prompt=negative_prompt,
        seed=seed,
        width=model.default_width,
        height=model.default_height,
        steps=model.default_steps,
        guidance=model.default_guidance,
    )
