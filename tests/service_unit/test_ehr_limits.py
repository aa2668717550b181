"""Body limits learned from an EHR's refusals: lower each time, remembered per EHR, never resending a size."""

from __future__ import annotations

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
