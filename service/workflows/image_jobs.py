"""Enqueue one image job for a model's defaults: the spec the worker reads and the bucket it batches by."""

from __future__ import annotations

import uuid

from sqlalchemy.ext.asyncio import AsyncSession

from service.generation.engine import ImageRequest, bucket_key
from service.generation.models import ModelSpec
from service.jobs import JobQueue


async def enqueue_image_job(
    db: AsyncSession,
    *,
    queue: JobQueue,
    model: ModelSpec,
    kind: str,
    prompt: str,
    negative_prompt: str | None,
    seed: int,
    session_id_hash: str,
) -> ImageRequest:
    """In the caller's transaction, so the draft and the audit record commit with the job or not at all."""
    request = ImageRequest(
        job_id=str(uuid.uuid4()),
        prompt=prompt,
        negative_prompt=negative_prompt,
        seed=seed,
        width=model.default_width,
        height=model.default_height,
        steps=model.default_steps,
        guidance=model.default_guidance,
    )
    await queue.enqueue(
        db,
        kind=kind,
        bucket=bucket_key(request, model.name),
        spec={
            "model": model.name,
            "prompt": request.prompt,
            "negative_prompt": request.negative_prompt,
            "seed": request.seed,
            "width": request.width,
            "height": request.height,
            "steps": request.steps,
            "guidance": request.guidance,
        },
        session_id_hash=session_id_hash,
        job_id=request.job_id,
    )
    return request
