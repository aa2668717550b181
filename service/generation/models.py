"""Model registry: the local diffusers pipelines this deployment may load, their defaults and limits."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

# Text-to-image pipelines the engine knows how to drive. A name outside this set is refused, so configuration
# can never make us import an arbitrary class.
ALLOWED_PIPELINE_CLASSES: frozenset[str] = frozenset(
    {
        "StableDiffusionPipeline",
        "StableDiffusionXLPipeline",
        "StableDiffusion3Pipeline",
        "FluxPipeline",
        "SanaPipeline",
        "SanaSprintPipeline",
        "PixArtAlphaPipeline",
        "PixArtSigmaPipeline",
    }
)
AUTO_PIPELINE_CLASS = "auto"
# Weights up to this size are loaded for real by check_model; bigger folders get a structural check only.
QUICK_LOAD_LIMIT_BYTES = 256 * 1024 * 1024
_WEIGHT_SUFFIXES = (".safetensors", ".bin")


class ModelConfigError(ValueError):
    """A model's configuration or folder is not usable; the message says what and what is allowed."""


def ensure_hub_offline() -> None:
    """Make any accidental Hugging Face Hub call fail fast instead of reaching for the network.

    huggingface_hub reads HF_HUB_OFFLINE once at import; when it is already imported we also flip the
    constant it consults at call time.
    """
    os.environ["HF_HUB_OFFLINE"] = "1"
    hub_constants = sys.modules.get("huggingface_hub.constants")
    if hub_constants is not None:
        hub_constants.HF_HUB_OFFLINE = True  # type: ignore[attr-defined]


class ModelSpec(BaseModel):
    """One configured model: where it lives, how to drive it, its defaults and batch limits."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    path: Path
    # Recorded on the Device written with every document, so a chart shows which weights made a picture.
    version: str = Field(default="1", min_length=1, max_length=64)
    pipeline_class: str = AUTO_PIPELINE_CLASS
    default_width: int = Field(default=512, ge=8, le=4096)
    default_height: int = Field(default=512, ge=8, le=4096)
    default_steps: int = Field(default=30, ge=1, le=500)
    default_guidance: float = Field(default=7.5, ge=0.0, le=50.0)
    supports_negative_prompt: bool = True
    # Largest batch per image edge length: a request uses the cap of the smallest bucket that holds its
    # pixel count (bigger images batch poorly and need more memory).
    batch_caps: dict[int, int] = Field(default_factory=lambda: {64: 16, 512: 8, 1024: 2})
    licence: str = ""
    is_test_model: bool = False

    @field_validator("pipeline_class")
    @classmethod
    def _pipeline_class_allowed(cls, value: str) -> str:
        if value != AUTO_PIPELINE_CLASS and value not in ALLOWED_PIPELINE_CLASSES:
            raise ValueError(
                f"pipeline_class {value!r} is not allowed; use 'auto' or one of "
                f"{', '.join(sorted(ALLOWED_PIPELINE_CLASSES))}"
            )
        return value

    @field_validator("batch_caps")
    @classmethod
    def _batch_caps_positive(cls, value: dict[int, int]) -> dict[int, int]:
        if not value:
            raise ValueError("batch_caps needs at least one entry {edge_length: max_batch}")
        for edge, cap in value.items():
            if edge < 8 or cap < 1:
                raise ValueError(f"batch_caps entry {edge}: {cap} is invalid; edge lengths ≥ 8 and caps ≥ 1")
        return dict(sorted(value.items()))

    @model_validator(mode="after")
    def _defaults_are_multiples_of_eight(self) -> ModelSpec:
        if self.default_width % 8 or self.default_height % 8:
            raise ValueError("default_width and default_height must be multiples of 8")
        return self

    def batch_cap_for(self, width: int, height: int) -> int:
        """Largest batch for images of this size (the cap of the smallest bucket that holds width×height)."""
        pixels = width * height
        for edge, cap in self.batch_caps.items():
            if pixels <= edge * edge:
                return cap
        # Larger than every configured bucket: scale the largest bucket's cap down by area, never below 1.
        largest_edge, largest_cap = next(reversed(self.batch_caps.items()))
        return max(1, (largest_cap * largest_edge * largest_edge) // pixels)


class ModelRegistry:
    """The configured models by name (settings supply the list of dicts)."""

    def __init__(self, specs: Iterable[ModelSpec]) -> None:
        self._specs: dict[str, ModelSpec] = {}
        for spec in specs:
            if spec.name in self._specs:
                raise ModelConfigError(f"model name {spec.name!r} is configured twice; names must be unique")
            self._specs[spec.name] = spec

    @classmethod
    def from_dicts(cls, entries: Iterable[Mapping[str, Any]]) -> ModelRegistry:
        return cls(ModelSpec.model_validate(dict(entry)) for entry in entries)

    def get(self, name: str) -> ModelSpec:
        try:
            return self._specs[name]
        except KeyError:
            known = ", ".join(sorted(self._specs)) or "(none configured)"
            raise KeyError(f"unknown model {name!r}; configured models: {known}") from None

    def names(self) -> list[str]:
        return list(self._specs)

    def __contains__(self, name: object) -> bool:
        return name in self._specs

    def __iter__(self) -> Iterator[ModelSpec]:
        return iter(self._specs.values())

    def __len__(self) -> int:
        return len(self._specs)


def read_model_index(path: Path) -> dict[str, Any]:
    """The folder's model_index.json as a dict; ModelConfigError when it is missing or not a JSON object."""
    index_file = Path(path) / "model_index.json"
    try:
        index = json.loads(index_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelConfigError(
            f"{index_file} does not exist; a model folder needs a diffusers model_index.json"
        ) from None
    except (OSError, ValueError) as error:
        raise ModelConfigError(f"{index_file} is not readable JSON ({type(error).__name__})") from None
    if not isinstance(index, dict):
        raise ModelConfigError(f"{index_file} must hold a JSON object")
    return index


def pipeline_class_name(spec: ModelSpec) -> str:
    """The allowed pipeline class name for a spec ('auto' resolved from model_index.json)."""
    if spec.pipeline_class != AUTO_PIPELINE_CLASS:
        return spec.pipeline_class
    declared = read_model_index(spec.path).get("_class_name")
    if not isinstance(declared, str) or declared not in ALLOWED_PIPELINE_CLASSES:
        raise ModelConfigError(
            f"model {spec.name!r} declares pipeline class {declared!r}, which is not allowed; allowed: "
            f"{', '.join(sorted(ALLOWED_PIPELINE_CLASSES))}"
        )
    return declared


def resolve_pipeline_class(spec: ModelSpec) -> type[DiffusionPipeline]:
    """The diffusers class for a spec, looked up only after the name passed the allow-list."""
    name = pipeline_class_name(spec)
    ensure_hub_offline()
    import diffusers

    pipeline_class: type[DiffusionPipeline] = getattr(diffusers, name)
    return pipeline_class


@dataclass
class ModelCheck:
    """What check_model found: ok only when `problems` is empty."""

    name: str
    pipeline_class: str | None = None
    weight_bytes: int = 0
    loaded: bool = False
    unet_or_transformer_parameters: int | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _weight_files(folder: Path) -> list[Path]:
    return [file for file in folder.rglob("*") if file.is_file() and file.name.endswith(_WEIGHT_SUFFIXES)]


def _structural_problems(path: Path, index: Mapping[str, Any]) -> list[str]:
    """Check that each component listed in model_index.json has its folder, config and readable weights."""
    from safetensors import safe_open

    problems: list[str] = []
    for component, declared in index.items():
        if component.startswith("_") or not isinstance(declared, list) or declared[0] is None:
            continue
        folder = path / component
        if not folder.is_dir():
            problems.append(f"component {component!r} has no folder")
            continue
        if not any(
            (folder / name).is_file()
            for name in (
                "config.json",
                "scheduler_config.json",
                "tokenizer_config.json",
                "preprocessor_config.json",
            )
        ):
            problems.append(f"component {component!r} has no config file")
        for weights in folder.glob("*.safetensors"):
            try:
                with safe_open(str(weights), framework="pt") as handle:
                    handle.keys()
            except Exception as error:  # safetensors raises its own error types for damaged headers
                problems.append(f"weights {component}/{weights.name} unreadable ({type(error).__name__})")
    return problems


def check_model(spec: ModelSpec, *, quick_load_limit_bytes: int = QUICK_LOAD_LIMIT_BYTES) -> ModelCheck:
    """Check a configured model without the network: folder, model_index.json, allowed class, and a load.

    Small models (weights up to `quick_load_limit_bytes`) are loaded for real on CPU; bigger ones get a
    structural check (every component has a folder, a config and safetensors headers that open).
    """
    result = ModelCheck(name=spec.name)
    path = Path(spec.path)
    if not path.is_dir():
        result.problems.append(f"model folder {path} does not exist")
        return result
    try:
        index = read_model_index(path)
        result.pipeline_class = pipeline_class_name(spec)
    except ModelConfigError as error:
        result.problems.append(str(error))
        return result
    declared = index.get("_class_name")
    if spec.pipeline_class != AUTO_PIPELINE_CLASS and declared != spec.pipeline_class:
        result.problems.append(
            f"configured pipeline_class {spec.pipeline_class!r} differs from the folder's {declared!r}"
        )
        return result
    result.weight_bytes = sum(file.stat().st_size for file in _weight_files(path))
    if result.weight_bytes == 0:
        result.problems.append("the folder holds no weight files (.safetensors or .bin)")
        return result
    if result.weight_bytes > quick_load_limit_bytes:
        result.problems.extend(_structural_problems(path, index))
        return result
    try:
        pipeline_class = resolve_pipeline_class(spec)
        pipeline = pipeline_class.from_pretrained(path, local_files_only=True)
    except Exception as error:  # any failure to load is a finding to report, not a crash of the check
        result.problems.append(f"loading the pipeline failed: {type(error).__name__}: {str(error)[:300]}")
        return result
    result.loaded = True
    denoiser = getattr(pipeline, "unet", None) or getattr(pipeline, "transformer", None)
    if denoiser is not None:
        result.unet_or_transformer_parameters = sum(p.numel() for p in denoiser.parameters())
    return result
