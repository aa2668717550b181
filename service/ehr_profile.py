"""Every vendor quirk of one EHR in one place: built once from its CapabilityStatement and registration.

EhrProfile        attachments (images? inline size), transactions, document update (supersede,
                  withdraw), scope syntax, portal scopes — what workflows ask instead of poking
                  at the CapabilityStatement or the registration themselves
EhrProfiles       the app's cache: one CapabilityStatement fetch per EHR (refreshed hourly), seeded
                  into every FhirClient so no request fetches /metadata again
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
class EhrProfile:
    name: str
    attachments: AttachmentPolicy
    transactions: bool
    updates_documents: bool
    portal_scopes: tuple[str, ...]
    # A Communication can record that the patient was given a handout (FHIR's "education provided").
    records_handouts: bool = False

    @classmethod
    def build(cls, ehr: EhrSettings, capabilities: Mapping[str, Any]) -> EhrProfile:
        return cls(
            name=ehr.name,
            attachments=merge_attachment_policy(
                capabilities=capabilities, overrides=AttachmentOverrides.from_registration(ehr)
            ),
            transactions=supports_transactions(capabilities),
            updates_documents=offers_interaction(capabilities, "DocumentReference", "update"),
            portal_scopes=tuple(ehr.portal_scopes),
            records_handouts=offers_interaction(capabilities, "Communication", "create"),
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
        return EhrProfile.build(ehr, capabilities)
