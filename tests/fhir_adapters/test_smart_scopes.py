"""SMART scope parsing (v1 and v2), permission checks, and the scopes we request."""

from __future__ import annotations

import pytest

from fhir_adapters import GrantedScopes, requested_scopes
from fhir_adapters.scopes import parse_clinical_scope


def test_v1_scopes() -> None:
    scopes = GrantedScopes.parse("launch openid patient/Condition.read user/DocumentReference.write")
    assert scopes.allows("Condition", "read")
    assert scopes.allows("Condition", "search")
    assert not scopes.allows("Condition", "create")
    assert scopes.allows("DocumentReference", "create")
    assert scopes.allows("DocumentReference", "update")
    assert not scopes.allows("DocumentReference", "read")
    assert scopes.has("openid")
    assert not scopes.has("offline_access")


def test_v2_scopes() -> None:
    scopes = GrantedScopes.parse("patient/Condition.rs patient/DocumentReference.cu system/*.r")
    assert scopes.allows("Condition", "search")
    assert not scopes.allows("Condition", "update")
    assert scopes.allows("DocumentReference", "create")
    assert not scopes.allows("DocumentReference", "search")
    assert scopes.allows("Anything", "read", context="system")
    assert not scopes.allows("Anything", "read", context="patient")
    assert scopes.clinical[0].syntax == "v2"


def test_wildcards_and_query_constrained_scopes() -> None:
    scopes = GrantedScopes.parse("user/*.* patient/Observation.rs?category=laboratory")
    assert scopes.allows("Device", "create")
    assert scopes.allows("Observation", "search", context="patient")
    assert scopes.clinical[1].query == "category=laboratory"


@pytest.mark.parametrize(
    "scope",
    [
        "patient/Condition.sr",
        "patient/Condition.rr",
        "patient/Condition.x",
        "patient/Condition.",
        "group/X.r",
        "patient/Condition.read?x=1",
        "patient/condition.r",
    ],
)
def test_invalid_resource_scopes_grant_nothing(scope: str) -> None:
    assert parse_clinical_scope(scope) is None
    scopes = GrantedScopes.parse(scope)
    assert scopes.raw == (scope,)
    assert not scopes.allows("Condition", "read")


def test_unknown_interaction_is_a_caller_error() -> None:
    with pytest.raises(ValueError, match="unknown interaction"):
        GrantedScopes.parse("user/*.*").allows("Condition", "patch")  # type: ignore[arg-type]


def test_narrower_grant_degrades() -> None:
    requested = requested_scopes(capabilities="v2", purpose="ehr-launch")
    granted = GrantedScopes.parse(" ".join(s for s in requested if "DocumentReference" not in s))
    assert granted.allows("Condition", "search")
    assert not granted.allows("DocumentReference", "create")


def test_requested_scopes_follow_server_capabilities() -> None:
    v2 = requested_scopes(capabilities=["launch-ehr", "permission-v2", "permission-v1"], purpose="ehr-launch")
    v1 = requested_scopes(capabilities=["launch-ehr", "permission-v1"], purpose="ehr-launch")
    assert "patient/Condition.rs" in v2
    assert "patient/DocumentReference.crus" in v2
    assert "patient/Condition.read" in v1
    assert "patient/DocumentReference.read" in v1
    assert "patient/DocumentReference.write" in v1
    assert all(".read" not in s and ".write" not in s for s in v2)
    for scopes in (v1, v2):
        assert {"launch", "openid", "fhirUser"} <= set(scopes)
        parsed = GrantedScopes.parse(scopes)
        for resource_type, interaction in [
            ("Condition", "search"),
            ("DocumentReference", "create"),
            ("Provenance", "create"),
            ("Device", "create"),
        ]:
            assert parsed.allows(resource_type, interaction)  # type: ignore[arg-type]
    standalone = requested_scopes(capabilities="v1", purpose="standalone-patient")
    assert "launch/patient" in standalone
    assert not GrantedScopes.parse(standalone).allows("DocumentReference", "create")


def test_requested_scopes_rejects_unknowns() -> None:
    with pytest.raises(ValueError, match="unknown purpose"):
        requested_scopes(capabilities="v2", purpose="everything")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="'v1' or 'v2'"):
        requested_scopes(capabilities="v3", purpose="ehr-launch")  # type: ignore[arg-type]


def test_v2_scopes_are_rewritten_for_a_v1_only_server() -> None:
    from fhir_adapters.scopes import scopes_in_syntax

    asked = (
        "launch",
        "openid",
        "patient/Condition.rs",
        "patient/DocumentReference.cruds",
        "user/Patient.read",
    )
    assert scopes_in_syntax(asked, "v1") == (
        "launch",
        "openid",
        "patient/Condition.read",
        "patient/DocumentReference.read",
        "patient/DocumentReference.write",
        "user/Patient.read",
    )
    assert scopes_in_syntax(asked, "v2") == asked
    assert scopes_in_syntax(("patient/*.*", "launch/patient"), "v1") == ("patient/*.*", "launch/patient")
