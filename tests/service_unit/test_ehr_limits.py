"""Body limits learned from an EHR's refusals: lower each time, remembered per EHR, never resending a size."""

from __future__ import annotations

import io
from types import SimpleNamespace
from typing import Any

import numpy as np
from PIL import Image

from fhir_adapters import RequestLimitError
from service.ehr_profile import EhrProfile, EhrProfiles, LearnedLimit
from service.settings import EhrSettings

EHR = EhrSettings(name="clinic", iss="https://ehr.example/fhir", client_id="c", organization_id="org-1")


def test_a_refusal_sets_a_ceiling_just_below_it_and_aims_at_a_common_proxy_limit() -> None:
    profiles = EhrProfiles()
    start = LearnedLimit(target=5_000_000, ceiling=5_000_000)
    learned = profiles.learn_request_limit(
        "clinic", current=start, refused_bytes=1_900_000, stated_limit=None
    )
    assert learned == LearnedLimit(target=1024 * 1024, ceiling=1_899_999)
    lower = profiles.learn_request_limit(
        "clinic", current=learned, refused_bytes=1_040_000, stated_limit=None
    )
    assert lower == LearnedLimit(target=1_000_000, ceiling=1_039_999)
    profile = EhrProfile.build(EHR, {}, learned=lower)
    assert (profile.max_request_bytes, profile.request_ceiling_bytes) == (
        1_000_000,
        1_000_000,
    )  # registration


def test_a_stated_limit_wins_and_nothing_lower_means_give_up() -> None:
    profiles = EhrProfiles()
    start = LearnedLimit(target=1_000_000, ceiling=1_000_000)
    stated = profiles.learn_request_limit(
        "clinic", current=start, refused_bytes=900_000, stated_limit=262_144
    )
    assert stated == LearnedLimit(target=262_144, ceiling=262_144)
    assert (
        profiles.learn_request_limit("clinic", current=start, refused_bytes=None, stated_limit=None) is None
    )
    tiny = LearnedLimit(target=10_000, ceiling=10_000)
    assert (
        profiles.learn_request_limit("clinic", current=tiny, refused_bytes=9_000, stated_limit=None) is None
    )
    # Another EHR learns nothing from this one.
    assert profiles.learn_request_limit("other", current=start, refused_bytes=600_000, stated_limit=None) == (
        LearnedLimit(target=512 * 1024, ceiling=599_999)
    )


def _write_back(png: bytes) -> Any:
    """Just the state `_shrink_picture` reads, without a database or an EHR behind it."""
    from fhir_adapters import AttachmentPolicy
    from service.workflows.approve import _WriteBack

    write_back: Any = object.__new__(_WriteBack)  # no database or EHR needed for this
    write_back.png = write_back.attachment_png = png
    write_back.png_optimised = False
    write_back.policy = AttachmentPolicy()
    write_back.notes = []
    write_back.ctx = SimpleNamespace(ehr=EHR)
    write_back.document = SimpleNamespace(job_id="job-1")
    return write_back


def _too_large(content_type: str, max_data_bytes: int) -> RequestLimitError:
    return RequestLimitError(
        "too large", content_type=content_type, request_bytes=1, limit_bytes=1, max_data_bytes=max_data_bytes
    )


def test_a_png_too_large_alone_is_made_smaller_then_dropped_and_a_pdf_is_not_touched() -> None:
    pixels = np.random.default_rng(3).integers(0, 256, (96, 96, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, format="PNG")
    png = buffer.getvalue()
    write_back = _write_back(png)
    assert write_back._shrink_picture(_too_large("image/png", len(png) // 2)) is True
    assert len(write_back.attachment_png) <= len(png) // 2
    assert write_back.png == png  # the handout keeps the original picture
    assert write_back.policy.accept_images is True
    assert "smaller form" in write_back.notes[-1]
    # Still too large at the next, lower limit: the PNG is left out and the PDF handout kept.
    assert write_back._shrink_picture(_too_large("image/png", 100)) is True
    assert write_back.policy.accept_images is False
    assert "only the PDF handout" in write_back.notes[-1]
    assert write_back._shrink_picture(_too_large("image/png", 100)) is False  # nothing left to shrink
    assert _write_back(png)._shrink_picture(_too_large("application/pdf", 100)) is False
