"""Every vendor quirk of one EHR in one place: built once from its CapabilityStatement and registration.

EhrProfile        attachments (images? inline size), transactions, document update (supersede,
                  withdraw), request-body limit, scope syntax, portal scopes — what workflows ask
                  instead of poking at the CapabilityStatement or the registration themselves
EhrProfiles       the app's cache: one CapabilityStatement fetch per EHR (refreshed hourly), seeded
                  into every FhirClient so no request fetches /metadata again; and the body limits
                  learned from the EHR's refusals (kept for the process's life)
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from fhir_adapters import AttachmentPolicy, FhirClient
from fhir_adapters.scopes import ScopeSyntax, scope_syntax_from_capabilities
from fhir_adapters.write import attachment_policy_from_capabilities, supports_transactions
from service.settings import EhrSettings

CAPABILITIES_MAX_AGE_SECONDS = 3600.0
# Below this no write-back fits (a Device or a Provenance alone is a few kilobytes).
MIN_REQUEST_BYTES = 10_000
# Body limits front proxies and gateways are commonly set to (nginx, Apache, IIS, cloud gateways).
COMMON_BODY_LIMITS = (
    64 * 1024,
    100_000,
    128 * 1024,
    250_000,
    256 * 1024,
    500_000,
    512 * 1024,
    1_000_000,
    1024 * 1024,
    2_000_000,
    2 * 1024 * 1024,
    4 * 1024 * 1024,
    5_000_000,
    8 * 1024 * 1024,
    10 * 1024 * 1024,
)


@dataclass(frozen=True)
class AttachmentOverrides:
    """What the EHR registration says about attachments; None where it says nothing."""

    accept_images: bool | None = None
    max_inline_bytes: int | None = None

    @classmethod
    def from_registration(cls, ehr: EhrSettings) -> AttachmentOverrides:
        # max_inline_bytes always has a value; only one written into the registration overrides the server.
        explicit = "max_inline_bytes" in ehr.model_fields_set
        return cls(
            accept_images=ehr.accept_images, max_inline_bytes=ehr.max_inline_bytes if explicit else None
        )


def merge_attachment_policy(
    *, capabilities: Mapping[str, Any], overrides: AttachmentOverrides
) -> AttachmentPolicy:
    """The CapabilityStatement's hints, then the registration's overrides on top (the registration wins)."""
    advertised = attachment_policy_from_capabilities(capabilities, default=AttachmentPolicy())
    return AttachmentPolicy(
        accept_images=advertised.accept_images
        if overrides.accept_images is None
        else overrides.accept_images,
        max_inline_bytes=(
            advertised.max_inline_bytes if overrides.max_inline_bytes is None else overrides.max_inline_bytes
        ),
    )


def offers_interaction(capabilities: Mapping[str, Any], resource_type: str, interaction: str) -> bool:
    """Whether the CapabilityStatement lists `interaction` for `resource_type` (rest[0])."""
    for rest in capabilities.get("rest") or []:
        for resource in rest.get("resource") or [] if isinstance(rest, Mapping) else []:
            if isinstance(resource, Mapping) and resource.get("type") == resource_type:
                return any(
                    isinstance(item, Mapping) and item.get("code") == interaction
                    for item in resource.get("interaction") or []
                )
        return False
    return False


@dataclass(frozen=True)
class LearnedLimit:
    """Body limits learned from refusals: aim for `target`; above `ceiling` a body is known to be refused."""

    target: int
    ceiling: int


@dataclass(frozen=True)
class EhrProfile:
    name: str
    attachments: AttachmentPolicy
    transactions: bool
    updates_documents: bool
    portal_scopes: tuple[str, ...]
    # A Communication can record that the patient was given a handout (FHIR's "education provided").
    records_handouts: bool = False
    # The request body size to aim for: the registration's, or lower where the EHR refused one; and the
    # size known to be refused above (a request between the two is still tried).
    max_request_bytes: int = 1_000_000
    request_ceiling_bytes: int = 1_000_000

    @classmethod
    def build(
        cls, ehr: EhrSettings, capabilities: Mapping[str, Any], *, learned: LearnedLimit | None = None
    ) -> EhrProfile:
        limit = ehr.max_request_bytes
        return cls(
            name=ehr.name,
            attachments=merge_attachment_policy(
                capabilities=capabilities, overrides=AttachmentOverrides.from_registration(ehr)
            ),
            transactions=supports_transactions(capabilities),
            updates_documents=offers_interaction(capabilities, "DocumentReference", "update"),
            portal_scopes=tuple(ehr.portal_scopes),
            records_handouts=offers_interaction(capabilities, "Communication", "create"),
            max_request_bytes=limit if learned is None else min(limit, learned.target),
            request_ceiling_bytes=limit if learned is None else min(limit, learned.ceiling),
        )

    @staticmethod
    def scope_syntax(smart_capabilities: Iterable[str]) -> ScopeSyntax:
        """v2 scopes where the SMART configuration advertises permission-v2, their v1 forms where not."""
        return scope_syntax_from_capabilities(smart_capabilities)


@dataclass
class _Cached:
    capabilities: Mapping[str, Any]
    fetched_at: float


class EhrProfiles:
    """One CapabilityStatement per EHR for the app's life (refreshed after an hour), and its profile."""

    def __init__(self, *, max_age_seconds: float = CAPABILITIES_MAX_AGE_SECONDS) -> None:
        self._max_age = max_age_seconds
        self._cached: dict[str, _Cached] = {}
        self._request_limits: dict[str, LearnedLimit] = {}

    def capabilities(self, ehr_name: str) -> Mapping[str, Any] | None:
        """The cached CapabilityStatement to seed a new FhirClient with (None: it fetches its own)."""
        cached = self._cached.get(ehr_name)
        if cached is None or time.monotonic() - cached.fetched_at >= self._max_age:
            return None
        return cached.capabilities

    def forget(self) -> None:
        """Read every EHR's CapabilityStatement again on next use (an EHR upgraded in place)."""
        self._cached.clear()

    async def profile(self, ehr: EhrSettings, fhir: FhirClient) -> EhrProfile:
        capabilities = self.capabilities(ehr.name)
        if capabilities is None:
            capabilities = await fhir.capabilities()
            self._cached[ehr.name] = _Cached(capabilities, time.monotonic())
        return EhrProfile.build(ehr, capabilities, learned=self._request_limits.get(ehr.name))

    def forget_request_limits(self) -> None:
        """Back to the registrations' body limits (the proxy in front of an EHR was reconfigured)."""
        self._request_limits.clear()

    def learn_request_limit(
        self, ehr_name: str, *, current: LearnedLimit, refused_bytes: int | None, stated_limit: int | None
    ) -> LearnedLimit | None:
        """Remember lower body limits after the EHR refused `refused_bytes` as too large.

        The answer's own figure wins where it gave one. Else everything from `refused_bytes` up is known to
        be refused (the ceiling), and the target becomes the largest common proxy limit below it (1 MiB,
        512 KiB, ...: a guess on the safe side). None: nothing lower is left, trying again would not help.
        """
        if refused_bytes is None:
            return None
        if stated_limit is not None and stated_limit < refused_bytes:
            ceiling = target = stated_limit
        else:
            ceiling = refused_bytes - 1
            if refused_bytes > current.ceiling:
                # Sent over our own ceiling (a request we do not size): lower it by the excess.
                ceiling = current.ceiling - (refused_bytes - current.ceiling)
            target = max((size for size in COMMON_BODY_LIMITS if size <= ceiling), default=ceiling // 2)
        learned = LearnedLimit(
            target=min(target, current.target, ceiling), ceiling=min(ceiling, current.ceiling)
        )
        if learned.ceiling < MIN_REQUEST_BYTES or learned == current:
            return None
        known = self._request_limits.get(ehr_name)
        if known is not None:
            learned = LearnedLimit(min(learned.target, known.target), min(learned.ceiling, known.ceiling))
        self._request_limits[ehr_name] = learned
        return learned
