"""Image generation: diffusion engine, model registry, tiny offline pipeline, metadata-free PNG."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from service.generation.engine import (
        DiffusionEngine,
        GenerationCancelled,
        ImageRequest,
        ItemOutcome,
        bucket_key,
        latents_to_preview,
        select_device_and_dtype,
    )
    from service.generation.models import (
        ALLOWED_PIPELINE_CLASSES,
        ModelCheck,
        ModelConfigError,
        ModelRegistry,
        ModelSpec,
        check_model,
    )
    from service.generation.png import encode_png, png_dimensions
    from service.generation.tiny import TINY_MODEL_NAME, build_tiny_pipeline

__all__ = [
    "ALLOWED_PIPELINE_CLASSES",
    "TINY_MODEL_NAME",
    "DiffusionEngine",
    "GenerationCancelled",
    "ImageRequest",
    "ItemOutcome",
    "ModelCheck",
    "ModelConfigError",
    "ModelRegistry",
    "ModelSpec",
    "bucket_key",
    "build_tiny_pipeline",
    "check_model",
    "encode_png",
    "latents_to_preview",
    "png_dimensions",
    "select_device_and_dtype",
]

# Resolved on first access (PEP 562) so that importing a light sibling module (prompts, readability) does not
# pull in torch and diffusers.
_MODULE_OF = {
    "ALLOWED_PIPELINE_CLASSES": "models",
    "TINY_MODEL_NAME": "tiny",
    "DiffusionEngine": "engine",
    "GenerationCancelled": "engine",
    "ImageRequest": "engine",
    "ItemOutcome": "engine",
    "ModelCheck": "models",
    "ModelConfigError": "models",
    "ModelRegistry": "models",
    "ModelSpec": "models",
    "bucket_key": "engine",
    "build_tiny_pipeline": "tiny",
    "check_model": "models",
    "encode_png": "png",
    "latents_to_preview": "engine",
    "png_dimensions": "png",
    "select_device_and_dtype": "engine",
}


def __getattr__(name: str) -> Any:
    module_name = _MODULE_OF.get(name)
    if module_name is None:
        raise AttributeError(f"module 'service.generation' has no attribute {name!r}")
    return getattr(importlib.import_module(f"service.generation.{module_name}"), name)
