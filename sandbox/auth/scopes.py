"""SMART scope matching (v1 `read`/`write`/`*` and v2 `cruds` syntax) against a client's allowed scopes."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

_RESOURCE_SCOPE = re.compile(
    r"^(?P<level>patient|user|system)/(?P<resource>[A-Za-z]+|\*)\.(?P<perms>read|write|\*|[cruds]+)"
    r"(?:\?(?P<query>.+))?$"
)
_V1_PERMISSIONS = {"read": "rs", "write": "cud", "*": "cruds"}


@dataclass(frozen=True)
class ResourceScope:
    """A parsed `patient/Condition.rs?category=…`-style scope."""

    level: str
    resource: str
    permissions: frozenset[str]
    query: str | None

    def covers(self, other: ResourceScope) -> bool:
        """True when every access `other` asks for is allowed by this (broader or equal) scope."""
        return (
            self.level == other.level
            and self.resource in ("*", other.resource)
            and other.permissions <= self.permissions
            and (self.query is None or self.query == other.query)
        )


def parse_resource_scope(scope: str) -> ResourceScope | None:
    """Parse a resource scope; None for anything else (launch, openid, malformed)."""
    match = _RESOURCE_SCOPE.match(scope)
    if not match:
        return None
    perms = match["perms"]
    letters = _V1_PERMISSIONS.get(perms, perms)
    # v2 requires the letters in c,r,u,d,s order without repeats; anything else is not a scope we know.
    if perms not in _V1_PERMISSIONS and "".join(sorted(set(perms), key="cruds".index)) != perms:
        return None
    return ResourceScope(match["level"], match["resource"], frozenset(letters), match["query"])


def split_scope(scope: str | None) -> list[str]:
    """Space-separated scope string → list, without duplicates, order kept."""
    seen: dict[str, None] = {}
    for item in (scope or "").split():
        seen.setdefault(item, None)
    return list(seen)


def is_allowed(requested: str, allowed: Iterable[str]) -> bool:
    """Whether one requested scope is within the client's allowed scopes."""
    allowed = list(allowed)
    if requested in allowed:
        return True
    wanted = parse_resource_scope(requested)
    if wanted is None:
        return False
    return any((grant := parse_resource_scope(item)) is not None and grant.covers(wanted) for item in allowed)


def narrow(requested: Iterable[str], allowed: Iterable[str]) -> list[str]:
    """The requested scopes the client may have (a server may grant fewer than asked)."""
    allowed = list(allowed)
    return [scope for scope in requested if is_allowed(scope, allowed)]


def has_patient_scopes(scopes: Iterable[str]) -> bool:
    """Whether any granted scope is patient-level (then the access token carries a `patient` claim)."""
    return any(scope.startswith("patient/") for scope in scopes)
