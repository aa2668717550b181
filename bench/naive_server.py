"""The naive serving pattern (diffusers' example server): one pipeline call per request in a thread executor.

Run: ``python -m bench.naive_server MODEL_DIR PORT``. POST /generate {"prompt", "seed"} answers the PNG.
"""

from __future__ import annotations

import asyncio
import copy
import sys
import threading
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from bench.tiny_serving import generate, load_pipeline, parsed, png_bytes

_per_thread = threading.local()


def generate_alone(pipeline: Any, prompt: str, seed: int) -> list[Any]:
    """One pipeline call on the default pool, as diffusers' example server makes it: the shared components
    with a scheduler of the request's own (a shared scheduler's step state is not safe across threads). And a
    tokenizer per pool thread: a shared one is not thread-safe either (a call now and then built embeddings of
    the wrong length and the request failed with a 500), and a copy per request would cost the pattern more
    than it does as written."""
    tokenizer = getattr(_per_thread, "tokenizer", None)
    if tokenizer is None:
        tokenizer = _per_thread.tokenizer = copy.deepcopy(pipeline.tokenizer)
    scheduler = pipeline.scheduler.from_config(pipeline.scheduler.config)
    mine = type(pipeline).from_pipe(pipeline, scheduler=scheduler, tokenizer=tokenizer)
    mine.set_progress_bar_config(disable=True)
    return generate(mine, [prompt], [seed])


def make_app(pipeline: Any) -> Starlette:
    async def generate_one(request: Request) -> Response:
        prompt, seed = await parsed(request)
        loop = asyncio.get_running_loop()
        images = await loop.run_in_executor(None, generate_alone, pipeline, prompt, seed)
        return Response(png_bytes(images[0]), media_type="image/png")

    return Starlette(routes=[Route("/generate", generate_one, methods=["POST"])])


def main() -> None:
    import uvicorn

    model_path, port = Path(sys.argv[1]), int(sys.argv[2])
    app = make_app(load_pipeline(model_path))
    uvicorn.run(app, host="127.0.0.1", port=port, access_log=False, log_level="warning")


if __name__ == "__main__":
    main()
