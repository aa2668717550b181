"""Validate resources we are about to send with the fhir.resources R4B models."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fhir.resources.R4B import get_fhir_model_class
from pydantic import ValidationError

from fhir_adapters.errors import ResourceValidationError

_MAX_REPORTED_PROBLEMS = 3


def _field_path(resource_type: str, location: tuple[Any, ...]) -> str:
    path = resource_type
    for part in location:
        path += f"[{part}]" if isinstance(part, int) else f".{part}"
    return path


def validate_resource(resource: Mapping[str, Any]) -> None:
    """Raise ResourceValidationError naming the first bad fields (never their values) if invalid."""
    resource_type = resource.get("resourceType")
    if not isinstance(resource_type, str):
        raise ResourceValidationError("resource has no resourceType")
    try:
        model = get_fhir_model_class(resource_type)
    except (ValueError, KeyError):
        raise ResourceValidationError(f"{resource_type!r} is not an R4 resource type") from None
    try:
        model.model_validate(dict(resource))
    except ValidationError as exc:
        # Pydantic messages can quote the input; we report only field paths and the kind of problem.
        problems = [
            f"{_field_path(resource_type, tuple(err['loc']))}: {err['type']}"
            for err in exc.errors()[:_MAX_REPORTED_PROBLEMS]
        ]
        more = exc.error_count() - len(problems)
        suffix = f" (+{more} more)" if more > 0 else ""
        raise ResourceValidationError(f"invalid {resource_type}: " + "; ".join(problems) + suffix) from None
