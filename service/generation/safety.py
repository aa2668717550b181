"""Optional safety classifier hook: a flagged image is still stored, but marked for the human reviewer."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
from PIL import Image

NO_CLASSIFIER = "none"
BLANK_IMAGE_CLASSIFIER = "blank-image"
_PYTHON_PREFIX = "python:"
_MAX_REASON = 200


@dataclass(frozen=True)
class SafetyVerdict:
    """What a classifier says about one image; `reason` is a short category, never the prompt."""

    flagged: bool
    reason: str | None = None

    def __post_init__(self) -> None:
        if self.flagged and not (self.reason and self.reason.strip()):
            raise ValueError("a flagged verdict needs a short reason for the reviewer")


@runtime_checkable
class SafetyClassifier(Protocol):
    """Checks one generated image. Called in the worker thread, after generation, before the image is stored.

    The prompt is passed so a classifier can compare image and request; it must never log or return it.
    """

    name: str

    def check(self, image: Image.Image, *, prompt: str) -> SafetyVerdict: ...


class BlankImageClassifier:
    """Flags nearly uniform images (a black frame is what many pipelines' own safety checkers put out).

    Needs no model weights, so it runs everywhere; a real content classifier plugs in through
    `python:module:factory`.
    """

    name = BLANK_IMAGE_CLASSIFIER

    def __init__(self, *, min_std: float = 2.0) -> None:
        if min_std < 0:
            raise ValueError("min_std must be ≥ 0")
        self.min_std = min_std

    def check(self, image: Image.Image, *, prompt: str) -> SafetyVerdict:
        pixels = np.asarray(image.convert("L"), dtype=np.float32)
        spread = float(pixels.std())
        if spread < self.min_std:
            return SafetyVerdict(flagged=True, reason="image is nearly blank (possible filtered output)")
        return SafetyVerdict(flagged=False)


def load_safety_classifier(choice: str | None) -> SafetyClassifier | None:
    """The classifier named by configuration: "none" (default), "blank-image" or "python:module:factory".

    A `python:` factory is called with no arguments and must return an object with `name` and `check`.
    """
    choice = (choice or NO_CLASSIFIER).strip()
    if choice == NO_CLASSIFIER:
        return None
    if choice == BLANK_IMAGE_CLASSIFIER:
        return BlankImageClassifier()
    if choice.startswith(_PYTHON_PREFIX):
        module_name, _, attribute = choice.removeprefix(_PYTHON_PREFIX).partition(":")
        if not module_name or not attribute:
            raise ValueError(f"safety classifier {choice!r} must look like python:package.module:factory")
        factory: Any = getattr(importlib.import_module(module_name), attribute, None)
        if not callable(factory):
            raise ValueError(f"safety classifier factory {attribute!r} not found in {module_name}")
        classifier = factory()
        if not isinstance(classifier, SafetyClassifier):
            raise ValueError(f"safety classifier from {choice!r} has no `name` and `check(image, *, prompt)`")
        return classifier
    raise ValueError(
        f"unknown safety classifier {choice!r}; use {NO_CLASSIFIER!r}, {BLANK_IMAGE_CLASSIFIER!r} "
        "or 'python:package.module:factory'"
    )


def safety_result(classifier: SafetyClassifier | None, image: Image.Image, *, prompt: str) -> dict[str, Any]:
    """The `safety` entry recorded with a job's result; a classifier that crashes flags the image."""
    if classifier is None:
        return {"checked": False, "flagged": False, "reason": None, "classifier": None}
    try:
        verdict = classifier.check(image, prompt=prompt)
    except Exception as error:  # fail towards the reviewer: an unchecked image is flagged, not hidden
        verdict = SafetyVerdict(flagged=True, reason=f"safety check failed ({type(error).__name__})")
    reason = verdict.reason[:_MAX_REASON] if verdict.reason else None
    return {"checked": True, "flagged": verdict.flagged, "reason": reason, "classifier": classifier.name}
