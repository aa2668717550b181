"""The registered EHRs: looked up by exact `iss` (never a prefix), turned into SMART registrations."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

from fhir_adapters import EhrRegistration
from service.settings import EhrSettings, Settings


class UnregisteredIssuerError(LookupError):
    """A launch named an `iss` that no registration has; nothing is fetched from it."""


def origin_of(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}".lower()


class EhrRegistry:
    def __init__(self, ehrs: list[EhrSettings], *, redirect_uri: str) -> None:
        self._by_iss = {ehr.iss: ehr for ehr in ehrs}
        self._by_name = {ehr.name: ehr for ehr in ehrs}
        self._redirect_uri = redirect_uri

    @classmethod
    def from_settings(cls, settings: Settings) -> EhrRegistry:
        return cls(settings.registered_ehrs(), redirect_uri=f"{settings.public_url}/callback")

    @property
    def redirect_uri(self) -> str:
        return self._redirect_uri

    def by_iss(self, iss: str | None) -> EhrSettings:
        # Exact string comparison: https://ehr.example/fhir.evil.test or an http:// downgrade never match.
        if not iss or iss not in self._by_iss:
            raise UnregisteredIssuerError("this EHR is not registered with CareCanvas")
        return self._by_iss[iss]

    def by_name(self, name: str) -> EhrSettings:
        if name not in self._by_name:
            raise UnregisteredIssuerError("this EHR is not registered with CareCanvas")
        return self._by_name[name]

    def all(self) -> list[EhrSettings]:
        return list(self._by_name.values())

    def frame_origins(self) -> list[str]:
        origins: list[str] = []
        for ehr in self._by_name.values():
            origins.extend(ehr.frame_origins or (origin_of(ehr.iss),))
        return sorted(set(origins))

    def registration(self, ehr: EhrSettings) -> EhrRegistration:
        private_key = Path(ehr.private_key_file).read_text() if ehr.private_key_file else None
        return EhrRegistration(
            name=ehr.name,
            iss=ehr.iss,
            client_id=ehr.client_id,
            client_auth=ehr.client_auth,
            client_secret=ehr.client_secret,
            private_key=private_key,
            key_id=ehr.key_id,
            signing_alg=ehr.signing_alg,
            scopes=tuple(ehr.scopes),
            frame_origins=tuple(ehr.frame_origins),
            auth_origins=tuple(ehr.auth_origins),
            redirect_uri=self._redirect_uri,
        )
