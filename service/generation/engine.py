"""Diffusion engine: one local pipeline per worker, batches of one bucket, progress, cancellation, a lock."""

from __future__ import annotations

import copy
import inspect
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import structlog
import torch
from PIL import Image

from service.generation.models import ModelSpec, ensure_hub_offline, resolve_pipeline_class
from service.jobs.types import bucket_of, check_image_fields

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

log = structlog.get_logger(__name__)

StepCallback = Callable[[int, int], None]
CancelCheck = Callable[[], bool]
PreviewCallback = Callable[[int, list[Image.Image]], None]

_DEVICE_PREFERENCES = ("auto", "cpu", "cuda", "mps")
# Linear approximation of the Stable Diffusion 1.x/2.x VAE decoder (4 latent channels -> RGB), good enough for
# a thumbnail while a job runs; it costs a matrix product instead of a VAE decode.
_SD_LATENT_TO_RGB = torch.tensor(
    [
        [0.298, 0.207, 0.208],
        [0.187, 0.286, 0.173],
        [-0.158, 0.189, 0.264],
        [-0.184, -0.271, -0.473],
    ]
)
_logged_device_choices: set[tuple[str, str]] = set()


class GenerationCancelled(Exception):
    """The caller asked to stop; raised between denoising steps."""


class _LegacyInterrupt(Exception):
    """Stops pipelines that only offer the old `callback` hook (PixArt); turned into GenerationCancelled."""


def select_device_and_dtype(preference: str = "auto") -> tuple[torch.device, torch.dtype]:
    """The device and dtype to run on: CUDA bf16 (fp16 without bf16 support), MPS fp16, CPU float32.

    `preference` is "auto" (the best available), "cpu", "cuda", "cuda:N" or "mps"; asking for a device that is
    not available is an error rather than a silent fallback.
    """
    kind = preference.split(":", 1)[0]
    if kind not in _DEVICE_PREFERENCES or (":" in preference and kind != "cuda"):
        raise ValueError(f"device preference {preference!r} is not one of auto, cpu, cuda, cuda:N, mps")
    if kind == "auto":
        if torch.cuda.is_available():
            preference = kind = "cuda"
        elif torch.backends.mps.is_available():
            preference = kind = "mps"
        else:
            preference = kind = "cpu"
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {preference!r} was requested but CUDA is not available")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device 'mps' was requested but MPS is not available")
    device = torch.device(preference)
    if kind == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    elif kind == "mps":
        dtype = torch.float16
    else:
        dtype = torch.float32
    choice = (str(device), str(dtype))
    if choice not in _logged_device_choices:
        _logged_device_choices.add(choice)
        log.info("generation_device_selected", device=str(device), dtype=str(dtype))
    return device, dtype


@dataclass(frozen=True)
class ImageRequest:
    """One image to generate; the prompt never goes into logs or error messages."""

    job_id: str
    prompt: str
    negative_prompt: str | None
    seed: int
    width: int
    height: int
    steps: int
    guidance: float

    def __post_init__(self) -> None:
        if not self.job_id:
            raise ValueError("job_id must not be empty")
        if not isinstance(self.prompt, str) or not (
            self.negative_prompt is None or isinstance(self.negative_prompt, str)
        ):
            raise ValueError("prompt must be a string and negative_prompt a string or None")
        check_image_fields(
            seed=self.seed, width=self.width, height=self.height, steps=self.steps, guidance=self.guidance
        )


_BUCKET_FIELDS = ("width", "height", "steps", "guidance")


def bucket_key(request: ImageRequest, model_name: str) -> str:
    """The batching bucket: requests with the same key can share one pipeline call."""
    return bucket_of(
        model=model_name,
        width=request.width,
        height=request.height,
        steps=request.steps,
        guidance=request.guidance,
    )


def latents_to_preview(latents: torch.Tensor) -> list[Image.Image]:
    """Cheap RGB previews (one per image, at latent resolution) from 4-channel SD-style latents, no VAE."""
    if latents.ndim != 4 or latents.shape[1] != 4:
        raise ValueError(f"previews need latents shaped (batch, 4, h, w), got {tuple(latents.shape)}")
    rgb = torch.einsum("bchw,cr->bhwr", latents.detach().float().cpu(), _SD_LATENT_TO_RGB)
    pixels = ((rgb + 1.0) * 127.5).clamp(0, 255).to(torch.uint8).numpy()
    return [Image.fromarray(frame, mode="RGB") for frame in pixels]


class PendingPreview:
    """Latent previews copied off the device without waiting for it; ``images()`` waits and decodes.

    Made in the step callback: the projection to RGB and the copy are queued on the device, so the denoising
    loop never blocks on a host sync; whoever calls ``images()`` (another thread) pays for the wait.
    """

    def __init__(self, latents: torch.Tensor) -> None:
        if latents.ndim != 4 or latents.shape[1] != 4:
            raise ValueError(f"previews need latents shaped (batch, 4, h, w), got {tuple(latents.shape)}")
        projection = _SD_LATENT_TO_RGB.to(device=latents.device)
        rgb = torch.einsum("bchw,cr->bhwr", latents.detach().float(), projection)
        pixels = ((rgb + 1.0) * 127.5).clamp(0, 255).to(torch.uint8)
        self._event: Any = None
        if pixels.device.type == "cuda":
            self._host = pixels.to("cpu", non_blocking=True)  # into pinned memory, ordered on the stream
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host = pixels.clone()  # the pipeline reuses its latents buffer on the next step

    def images(self) -> list[Image.Image]:
        if self._event is not None:
            self._event.synchronize()
        return [Image.fromarray(frame, mode="RGB") for frame in self._host.numpy()]


PendingPreviewCallback = Callable[[int, PendingPreview], None]


@dataclass(frozen=True)
class ItemOutcome:
    """The result of one request run on its own: an image, or the error that stopped it."""

    request: ImageRequest
    image: Image.Image | None
    error: Exception | None


class DiffusionEngine:
    """Owns one diffusers pipeline; every call into it holds a lock, so two threads never run it together."""

    def __init__(
        self,
        spec: ModelSpec,
        *,
        device: torch.device,
        dtype: torch.dtype,
        compile: bool = False,
        enable_vae_slicing: bool = True,
    ) -> None:
        if compile and device.type != "cuda":
            raise ValueError(
                "compile=True needs a CUDA device; on CPU and MPS the compile time never pays off"
            )
        self.spec = spec
        self.device = device
        self.dtype = dtype
        self.compile = compile
        self.enable_vae_slicing = enable_vae_slicing
        self._pipeline: DiffusionPipeline | None = None
        self._accepts: frozenset[str] = frozenset()
        self._lock = threading.Lock()
        self._fitting_tokenizer: Any = None

    # -- loading -------------------------------------------------------------------------------------------

    @property
    def loaded(self) -> bool:
        return self._pipeline is not None

    def load(self, *, warm_up_buckets: Iterable[tuple[int, int, int, float]] = ()) -> None:
        """Load the pipeline from its local folder onto the device; optionally compile and warm up buckets.

        `warm_up_buckets` are (width, height, steps, guidance) shapes run once at the bucket's batch cap, so
        compilation and allocator growth happen at start-up instead of in the first job.
        """
        ensure_hub_offline()
        with self._lock:
            if self._pipeline is None:
                self._pipeline = self._load_pipeline()
                own = getattr(self._pipeline, "tokenizer", None)
                self._fitting_tokenizer = None if own is None else copy.deepcopy(own)
        for width, height, steps, guidance in warm_up_buckets:
            self.warm_up(width=width, height=height, steps=steps, guidance=guidance)

    def _load_pipeline(self) -> DiffusionPipeline:
        from diffusers.utils import logging as diffusers_logging

        started = time.perf_counter()
        pipeline_class = resolve_pipeline_class(self.spec)
        # Worker logs are JSON lines; tqdm bars from loading and denoising would corrupt them.
        diffusers_logging.disable_progress_bar()
        pipeline = pipeline_class.from_pretrained(self.spec.path, local_files_only=True, dtype=self.dtype)
        pipeline.to(self.device)
        pipeline.set_progress_bar_config(disable=True)
        vae = getattr(pipeline, "vae", None)
        if self.enable_vae_slicing and vae is not None and hasattr(vae, "enable_slicing"):
            # Decodes one image at a time: flat peak memory for big batches, and batch-independent decoding.
            vae.enable_slicing()
        denoiser = getattr(pipeline, "unet", None) or getattr(pipeline, "transformer", None)
        if self.device.type == "cuda":
            self._configure_cuda(pipeline, denoiser)
        self._accepts = frozenset(inspect.signature(pipeline.__call__).parameters)
        log.info(
            "generation_model_loaded",
            model=self.spec.name,
            device=str(self.device),
            dtype=str(self.dtype),
            duration_ms=round((time.perf_counter() - started) * 1000),
        )
        return pipeline

    def _configure_cuda(self, pipeline: DiffusionPipeline, denoiser: Any) -> None:
        """CUDA only (not exercised on the CPU test machines): SDPA attention and regional compilation."""
        from diffusers.models.attention_processor import AttnProcessor2_0

        unet = getattr(pipeline, "unet", None)
        if unet is not None:
            # A UNet may carry a legacy processor from its config; transformer pipelines default to SDPA.
            unet.set_attn_processor(AttnProcessor2_0())
        if self.compile and denoiser is not None:
            if getattr(denoiser, "_repeated_blocks", None):
                # Regional compilation: compile the repeated block once and reuse it (fast cold start).
                denoiser.compile_repeated_blocks(fullgraph=True)
            else:
                denoiser.compile(fullgraph=False)

    def warm_up(self, *, width: int, height: int, steps: int, guidance: float) -> None:
        """Run one batch at the bucket's cap so its shapes are compiled and allocated before real jobs."""
        batch = self.spec.batch_cap_for(width, height)
        requests = [
            ImageRequest(f"warm-up-{index}", "warm-up", None, index, width, height, steps, guidance)
            for index in range(batch)
        ]
        self.generate(requests)

    @property
    def pipeline(self) -> DiffusionPipeline:
        if self._pipeline is None:
            raise RuntimeError("the diffusion engine is not loaded; call load() first")
        return self._pipeline

    @property
    def tokenizer(self) -> Any:
        """A copy of the pipeline's own (first) tokenizer, to cap prompts to the text encoder's budget.

        A copy, not the pipeline's: the worker fits the next batch's prompts while the pipeline tokenizes the
        current batch in its thread, and a tokenizer is not thread-safe (shared, the pipeline's call now and
        then built prompt embeddings of the wrong length: "Sizes of tensors must match", the batch failed).
        """
        if self._fitting_tokenizer is None:
            if not self.loaded:
                raise RuntimeError("the diffusion engine is not loaded; call load() first")
            raise RuntimeError(f"model {self.spec.name!r} has no tokenizer component")
        return self._fitting_tokenizer

    # -- generation ----------------------------------------------------------------------------------------

    def generate(
        self,
        requests: Sequence[ImageRequest],
        *,
        on_step: StepCallback | None = None,
        should_cancel: CancelCheck | None = None,
        on_preview: PreviewCallback | None = None,
        on_pending_preview: PendingPreviewCallback | None = None,
        preview_every: int = 1,
    ) -> list[Image.Image]:
        """Generate one PIL image per request in one pipeline call (all requests must share a bucket).

        `on_step(k, n)` is called after step k of n; `should_cancel()` is checked before the call and after
        every step and stops the run with GenerationCancelled; `on_preview(k, images)` gets latent previews
        (decoded in the callback: a host sync); `on_pending_preview(k, pending)` gets them still on their way
        off the device, to decode elsewhere. Both come after the first step, then every `preview_every`.
        """
        images = self._run(
            requests,
            output_type="pil",
            on_step=on_step,
            should_cancel=should_cancel,
            on_preview=on_preview,
            on_pending_preview=on_pending_preview,
            preview_every=preview_every,
        )
        return list(images)

    def generate_arrays(
        self,
        requests: Sequence[ImageRequest],
        *,
        on_step: StepCallback | None = None,
        should_cancel: CancelCheck | None = None,
    ) -> list[np.ndarray]:
        """Like generate, but returns the decoded float32 arrays (H, W, 3 in [0, 1]) before 8-bit rounding."""
        arrays = self._run(requests, output_type="np", on_step=on_step, should_cancel=should_cancel)
        return [np.asarray(array, dtype=np.float32) for array in arrays]

    def generate_one_by_one(
        self,
        requests: Sequence[ImageRequest],
        *,
        should_cancel: CancelCheck | None = None,
    ) -> list[ItemOutcome]:
        """Run each request alone (after a failed batch), so one bad item does not fail its neighbours.

        Errors are returned per item; cancellation still stops the whole run.
        """
        outcomes: list[ItemOutcome] = []
        for request in requests:
            try:
                image = self.generate([request], should_cancel=should_cancel)[0]
            except GenerationCancelled:
                raise
            except Exception as error:  # the caller decides per item: retry, quarantine or fail
                log.warning("generation_item_failed", job_id=request.job_id, error_type=type(error).__name__)
                outcomes.append(ItemOutcome(request=request, image=None, error=error))
            else:
                outcomes.append(ItemOutcome(request=request, image=image, error=None))
        return outcomes

    def _check_batch(self, requests: Sequence[ImageRequest]) -> None:
        if not requests:
            raise ValueError("generate needs at least one request")
        first = requests[0]
        differing = [
            name for name in _BUCKET_FIELDS if len({getattr(request, name) for request in requests}) > 1
        ]
        if differing:
            details = ", ".join(
                f"{name} ({', '.join(sorted({str(getattr(r, name)) for r in requests}))})"
                for name in differing
            )
            raise ValueError(
                f"requests in one batch must share width, height, steps and guidance; differing: {details}"
            )
        cap = self.spec.batch_cap_for(first.width, first.height)
        if len(requests) > cap:
            raise ValueError(
                f"batch of {len(requests)} exceeds the cap of {cap} for {first.width}x{first.height} "
                f"on model {self.spec.name!r}"
            )

    def _run(
        self,
        requests: Sequence[ImageRequest],
        *,
        output_type: str,
        on_step: StepCallback | None,
        should_cancel: CancelCheck | None,
        on_preview: PreviewCallback | None = None,
        on_pending_preview: PendingPreviewCallback | None = None,
        preview_every: int = 1,
    ) -> Sequence[Any]:
        self._check_batch(requests)
        if preview_every < 1:
            raise ValueError(f"preview_every must be at least 1, got {preview_every}")
        pipeline = self.pipeline
        first = requests[0]
        if should_cancel is not None and should_cancel():
            raise GenerationCancelled("generation cancelled before it started")
        # One CPU generator per image: the same seed gives the same starting noise alone, in any batch and
        # on any device (diffusers draws on the generator's device and moves the tensor).
        generators = [torch.Generator(device="cpu").manual_seed(request.seed) for request in requests]
        arguments: dict[str, Any] = {
            "prompt": [request.prompt for request in requests],
            "width": first.width,
            "height": first.height,
            "num_inference_steps": first.steps,
            "guidance_scale": first.guidance,
            "generator": generators,
            "output_type": output_type,
        }
        if self.spec.supports_negative_prompt and "negative_prompt" in self._accepts:
            if any(request.negative_prompt for request in requests):
                # "" is what the pipelines use for a missing negative prompt, so mixing is batch-invariant.
                arguments["negative_prompt"] = [request.negative_prompt or "" for request in requests]
        elif any(request.negative_prompt for request in requests):
            log.debug("generation_negative_prompt_dropped", model=self.spec.name, reason="model has none")

        state = {"step": 0, "cancelled": False}
        total = first.steps

        def report(step_index: int, latents: Any) -> bool:
            """Progress, preview and the cancel check after a step; True when the run must stop."""
            state["step"] = step_index + 1
            if on_step is not None:
                on_step(step_index + 1, total)
            # The first step (something to show early), then every `preview_every` steps.
            due = step_index == 0 or (step_index + 1) % preview_every == 0
            wants_preview = due and (on_preview is not None or on_pending_preview is not None)
            is_sd_latent = isinstance(latents, torch.Tensor) and latents.ndim == 4 and latents.shape[1] == 4
            if wants_preview and is_sd_latent:
                if on_preview is not None:
                    on_preview(step_index + 1, latents_to_preview(latents))
                if on_pending_preview is not None:
                    on_pending_preview(step_index + 1, PendingPreview(latents))
            if should_cancel is not None and should_cancel():
                state["cancelled"] = True
                return True
            return False

        if "callback_on_step_end" in self._accepts:

            def on_step_end(
                pipe: Any, step_index: int, timestep: Any, tensors: dict[str, Any]
            ) -> dict[str, Any]:
                nonlocal total
                total = int(getattr(pipe, "_num_timesteps", None) or total)
                if report(step_index, tensors.get("latents")):
                    # diffusers' supported interrupt: the loop skips the remaining steps (then still decodes).
                    pipe._interrupt = True
                return tensors

            arguments["callback_on_step_end"] = on_step_end
            arguments["callback_on_step_end_tensor_inputs"] = ["latents"]
        elif "callback" in self._accepts:

            def legacy_callback(step_index: int, timestep: Any, latents: Any) -> None:
                if report(step_index, latents):
                    raise _LegacyInterrupt

            arguments["callback"] = legacy_callback
            arguments["callback_steps"] = 1

        started = time.perf_counter()
        with self._lock:
            try:
                output = pipeline(**arguments)  # type: ignore[operator]  # diffusers' stubs lack __call__
            except _LegacyInterrupt:
                state["cancelled"] = True
        if state["cancelled"]:
            log.info("generation_cancelled", model=self.spec.name, step=state["step"], total=total)
            raise GenerationCancelled(f"generation cancelled after step {state['step']} of {total}")
        images = output.images
        if len(images) != len(requests):
            raise RuntimeError(f"pipeline returned {len(images)} images for {len(requests)} requests")
        log.info(
            "generation_batch_done",
            model=self.spec.name,
            batch_size=len(requests),
            bucket=bucket_key(first, self.spec.name),
            duration_ms=round((time.perf_counter() - started) * 1000),
        )
        return images
