"""The job vocabulary shared by the web side and the worker: statuses, kinds and the image job spec."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from enum import IntEnum, StrEnum
from typing import Any

from service.db.models import JOB_STATUSES

_MAX_SEED = 2**64 - 1


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    QUARANTINED = "quarantined"

    @property
    def final(self) -> bool:
        return self in TERMINAL_STATUSES


TERMINAL_STATUSES = frozenset(
    {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.QUARANTINED}
)
# The database's check constraint and this enum must name the same statuses.
assert {status.value for status in JobStatus} == set(JOB_STATUSES)  # noqa: S101 - an import-time invariant


class JobPriority(IntEnum):
    """Claim order: lower runs first (so the claim index is plain ascending columns)."""

    INTERACTIVE = 0  # a clinician's page or a single API request: someone is watching the progress bar
    BULK = 10  # batch and bulk API requests: nobody waits on one image


class JobKind(StrEnum):
    ILLUSTRATION = "illustration"
    PORTRAIT = "portrait"


class JobSpecError(ValueError):
    """A job spec that cannot become an image (the message names the field, never the prompt)."""


def check_image_fields(*, seed: int, width: int, height: int, steps: int, guidance: float) -> None:
    """The ranges a diffusion call accepts; the message names the field and what is allowed."""
    if not 0 <= seed <= _MAX_SEED:
        raise JobSpecError(f"seed must be between 0 and 2**64-1, got {seed}")
    for side, value in (("width", width), ("height", height)):
        if value < 8 or value % 8:
            raise JobSpecError(f"{side} must be a positive multiple of 8, got {value}")
    if steps < 1:
        raise JobSpecError(f"steps must be at least 1, got {steps}")
    if not 0.0 <= guidance <= 50.0:
        raise JobSpecError(f"guidance must be between 0 and 50, got {guidance}")


def bucket_of(*, model: str, width: int, height: int, steps: int, guidance: float) -> str:
    """The batching bucket: jobs with the same key can share one pipeline call."""
    return f"{model}|{width}x{height}|steps={steps}|guidance={float(guidance)!r}"


@dataclass(frozen=True)
class ImageJobSpec:
    """What the worker needs to make one image; stored encrypted as the job's spec."""

    model: str
    prompt: str
    negative_prompt: str | None
    seed: int
    width: int
    height: int
    steps: int
    guidance: float

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, str) or not (
            self.negative_prompt is None or isinstance(self.negative_prompt, str)
        ):
            raise JobSpecError("prompt must be text")
        if not isinstance(self.model, str) or not self.model:
            raise JobSpecError("model must be a model name")
        check_image_fields(
            seed=self.seed, width=self.width, height=self.height, steps=self.steps, guidance=self.guidance
        )

    @property
    def bucket(self) -> str:
        return bucket_of(
            model=self.model, width=self.width, height=self.height, steps=self.steps, guidance=self.guidance
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_mapping(cls, spec: Mapping[str, Any]) -> ImageJobSpec:
        """Parse a stored spec; JobSpecError names what is missing or of the wrong type."""
        try:
            negative = spec.get("negative_prompt")
            return cls(
                model=str(spec["model"]),
                prompt=spec["prompt"],
                negative_prompt=negative if negative else None,
                seed=int(spec["seed"]),
                width=int(spec["width"]),
                height=int(spec["height"]),
                steps=int(spec["steps"]),
                guidance=float(spec["guidance"]),
            )
        except KeyError as error:
            raise JobSpecError(f"job spec lacks {error.args[0]!r}") from None
        except (TypeError, ValueError) as error:
            if isinstance(error, JobSpecError):
                raise
            raise JobSpecError("job spec has a field of the wrong type") from None
