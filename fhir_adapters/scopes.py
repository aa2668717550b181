"""SMART scopes: parse granted v1/v2 scopes, answer "may I?", and choose the scopes to request."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

Interaction = Literal["read", "search", "create", "update", "delete"]
ScopeSyntax = Literal["v1", "v2"]
Purpose = Literal["ehr-launch", "standalone-patient", "backend-services"]

_INTERACTIONS = frozenset({"read", "search", "create", "update", "delete"})
_V2_LETTERS = {"c": "create", "r": "read", "u": "update", "d": "delete", "s": "search"}
_V1_PERMISSIONS = {
    "read": frozenset({"read", "search"}),
    "write": frozenset({"create", "update", "delete"}),
    "*": _INTERACTIONS,
}
_CLINICAL_SCOPE = re.compile(
    r"^(?P<context>patient|user|system)/(?P<resource>\*|[A-Z][A-Za-z]+)\.(?P<permission>[^?\s]+)(?:\?(?P<query>\S+))?$"
)


@dataclass(frozen=True)
class ClinicalScope:
    """One resource scope such as patient/Condition.rs or user/*.read."""

    context: str
    resource_type: str
    interactions: frozenset[str]
    query: str | None
    syntax: ScopeSyntax


def parse_clinical_scope(scope: str) -> ClinicalScope | None:
    """Parse one v1 or v2 resource scope; None when it is not a (valid) resource scope."""
    match = _CLINICAL_SCOPE.match(scope)
    if not match:
        return None
    permission = match["permission"]
    syntax: ScopeSyntax
    if permission in _V1_PERMISSIONS:
        if match["query"]:
            return None  # v1 scopes carry no query constraints
        interactions, syntax = _V1_PERMISSIONS[permission], "v1"
    else:
        # v2 permissions are a non-empty subset of c r u d s, in that order, each at most once.
        letters = list(permission)
        if not letters or any(ch not in _V2_LETTERS for ch in letters):
            return None
        order = [*_V2_LETTERS]
        positions = [order.index(ch) for ch in letters]
        if positions != sorted(set(positions)):
            return None
        interactions, syntax = frozenset(_V2_LETTERS[ch] for ch in letters), "v2"
    return ClinicalScope(
        context=match["context"],
        resource_type=match["resource"],
        interactions=interactions,
        query=match["query"],
        syntax=syntax,
    )


@dataclass(frozen=True)
class GrantedScopes:
    """The scopes a token response granted (which may be narrower than the ones requested)."""

    raw: tuple[str, ...]
    clinical: tuple[ClinicalScope, ...]

    @classmethod
    def parse(cls, scope: str | Iterable[str] | None) -> GrantedScopes:
        """Parse a space-separated scope string (or an iterable of scopes); unknown scopes are kept raw."""
        items = scope.split() if isinstance(scope, str) else list(scope or ())
        raw = tuple(dict.fromkeys(s for s in items if s))
        parsed = (parse_clinical_scope(s) for s in raw)
        return cls(raw=raw, clinical=tuple(p for p in parsed if p is not None))

    def __str__(self) -> str:
        return " ".join(self.raw)

    def has(self, scope: str) -> bool:
        """Whether this exact scope (e.g. "openid", "launch", "offline_access") was granted."""
        return scope in self.raw

    def allows(self, resource_type: str, interaction: Interaction, *, context: str | None = None) -> bool:
        """Whether some granted scope permits `interaction` on `resource_type` (in `context` if given).

        Query-constrained v2 scopes (patient/Observation.rs?category=...) count: the server narrows the
        results to the constraint, so the interaction itself is allowed.
        """
        if interaction not in _INTERACTIONS:
            raise ValueError(f"unknown interaction {interaction!r}; allowed: {sorted(_INTERACTIONS)}")
        return any(
            interaction in s.interactions
            and s.resource_type in ("*", resource_type)
            and (context is None or s.context == context)
            for s in self.clinical
        )


# What each purpose needs: (context, resource type, v2 permission letters).
_NEEDS: dict[str, tuple[tuple[str, str, str], ...]] = {
    "ehr-launch": (
        ("patient", "Patient", "r"),
        ("patient", "Condition", "rs"),
        ("patient", "Encounter", "r"),
        ("patient", "QuestionnaireResponse", "rs"),
        ("patient", "DocumentReference", "crus"),
        ("patient", "Binary", "cr"),
        ("patient", "Provenance", "crs"),
        ("user", "Device", "crs"),
    ),
    "standalone-patient": (
        ("patient", "Patient", "r"),
        ("patient", "DocumentReference", "rs"),
        ("patient", "Binary", "r"),
    ),
    "backend-services": (
        ("system", "DocumentReference", "crus"),
        ("system", "Binary", "cr"),
        ("system", "Provenance", "crs"),
        ("system", "Device", "crs"),
    ),
}
_IDENTITY: dict[str, tuple[str, ...]] = {
    "ehr-launch": ("launch", "openid", "fhirUser", "online_access"),
    "standalone-patient": ("launch/patient", "openid", "fhirUser", "offline_access"),
    "backend-services": (),
}


def scope_syntax_from_capabilities(capabilities: Iterable[str]) -> ScopeSyntax:
    """v2 when the SMART configuration advertises permission-v2, else v1."""
    return "v2" if "permission-v2" in set(capabilities) else "v1"


def requested_scopes(*, capabilities: ScopeSyntax | Iterable[str], purpose: Purpose) -> tuple[str, ...]:
    """Scopes to request for `purpose`, in v2 syntax (patient/Condition.rs) when offered, else v1."""
    if purpose not in _NEEDS:
        raise ValueError(f"unknown purpose {purpose!r}; allowed: {sorted(_NEEDS)}")
    if isinstance(capabilities, str):
        if capabilities not in ("v1", "v2"):
            raise ValueError(f"scope syntax must be 'v1' or 'v2', got {capabilities!r}")
        syntax: ScopeSyntax = "v2" if capabilities == "v2" else "v1"
    else:
        syntax = scope_syntax_from_capabilities(capabilities)
    scopes = list(_IDENTITY[purpose])
    for context, resource_type, letters in _NEEDS[purpose]:
        if syntax == "v2":
            scopes.append(f"{context}/{resource_type}.{letters}")
            continue
        if set(letters) & {"r", "s"}:
            scopes.append(f"{context}/{resource_type}.read")
        if set(letters) & {"c", "u", "d"}:
            scopes.append(f"{context}/{resource_type}.write")
    return tuple(scopes)


def scopes_in_syntax(scopes: Iterable[str], syntax: ScopeSyntax) -> tuple[str, ...]:
    """Rewrite clinical scopes for a server that speaks only v1 (`patient/Condition.rs` → `.read`).

    v1 scopes are left alone for v2 servers (SMART 2 servers accept them); non-clinical scopes pass through.
    """
    result: list[str] = []
    for scope in scopes:
        context, slash, rest = scope.partition("/")
        resource_type, dot, letters = rest.partition(".")
        is_v2 = bool(slash and dot and letters and set(letters) <= set("cruds") and letters != "*")
        if syntax == "v1" and is_v2 and context in ("patient", "user", "system"):
            if set(letters) & {"r", "s"}:
                result.append(f"{context}/{resource_type}.read")
            if set(letters) & {"c", "u", "d"}:
                result.append(f"{context}/{resource_type}.write")
        else:
            result.append(scope)
    return tuple(dict.fromkeys(result))
