"""The portal's language matching is the handouts' (one function, not two that drift apart)."""

from __future__ import annotations

import pytest

from service.generation.languages import match_language_tag
from service.workflows.portal_text import PORTAL_LANGUAGES, portal_language

TAGS = [
    "en",
    "es-MX",
    "zh",
    "zh-CN",
    "zh-Hans-TW",
    "zh-Hant-TW",
    "cmn",
    "zho",
    "fil",
    "tgl",
    "ar-SA",
    "de",
    "ko_KR",
]


@pytest.mark.parametrize("tag", TAGS)
def test_portal_language_is_the_handouts_tag_matching(tag: str) -> None:
    assert portal_language(tag) == match_language_tag(tag, PORTAL_LANGUAGES)


def test_tags_the_old_copy_missed_are_matched() -> None:
    # The portal's own copy knew fewer aliases than the handouts' matcher and let a region beat the script.
    assert (portal_language("tgl"), portal_language("zho"), portal_language("zh-Hans-TW")) == (
        "tl",
        "zh-Hans",
        "zh-Hans",
    )
    assert (portal_language(None), portal_language(""), portal_language("de")) == (None, None, None)
