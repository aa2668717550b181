"""A minimal in-process dynamic batcher: requests wait up to 5 ms for company, then up to 8 run as one call.

Run: ``python -m bench.batcher_server MODEL_DIR PORT``. POST /generate {"prompt", "seed"} answers the PNG.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from bench.tiny_serving import generate, load_pipeline, parsed, png_bytes

MAX_BATCH = 8
WINDOW_S = 0.005

Pending = tuple[str, int, asyncio.Future[bytes]]


def encode_all(images: list[Any]) -> list[bytes]:
    return [png_bytes(image) for image in images]


async def batch_loop(pipeline: Any, queue: asyncio.Queue[Pending]) -> None:
    loop = asyncio.get_running_loop()
    while True:
        batch = [await queue.get()]
        deadline = loop.time() + WINDOW_S
        while len(batch) < MAX_BATCH:
            remaining = deadline - loop.time()
            if remaining <= 0 and queue.empty():
                break
            try:
                batch.append(await asyncio.wait_for(queue.get(), max(remaining, 0)))
            except TimeoutError:
                break
        prompts, seeds = [p for p, _, _ in batch], [s for _, s, _ in batch]
        try:
            images = await asyncio.to_thread(generate, pipeline, prompts, seeds)
            pngs = await asyncio.to_thread(encode_all, images)
        except Exception as error:
            for _, _, future in batch:
                future.set_exception(error)
            continue
        for (_, _, future), png in zip(batch, pngs, strict=True):
            future.set_result(png)


def make_app(pipeline: Any) -> Starlette:
    queue: asyncio.Queue[Pending] = asyncio.Queue()

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        task = asyncio.create_task(batch_loop(pipeline, queue))
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def generate_one(request: Request) -> Response:
        prompt, seed = await parsed(request)
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        await queue.put((prompt, seed, future))
        return Response(await future, media_type="image/png")

    return Starlette(routes=[Route("/generate", generate_one, methods=["POST"])], lifespan=lifespan)


def main() -> None:
    import uvicorn

    model_path, port = Path(sys.argv[1]), int(sys.argv[2])
    app = make_app(load_pipeline(model_path))
    uvicorn.run(app, host="127.0.0.1", port=port, access_log=False, log_level="warning")


if __name__ == "__main__":
    main()
