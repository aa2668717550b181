"""The registered EHRs: looked up by exact `iss` (never a prefix), turned into SMART registrations."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from joserfc import jwk

from fhir_adapters import EhrRegistration, GrantedScopes
from service.settings import EhrSettings, Settings

SigningAlg = Literal["RS384", "ES384"]
MIN_RSA_BITS = 2048


class UnregisteredIssuerError(LookupError):
    """A launch named an `iss` that no registration has; nothing is fetched from it."""


def origin_of(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}".lower()


@dataclass(frozen=True)
class ClientSigningKey:
    """One of our private_key_jwt keys: the private PEM stays here, the public JWK is published."""

    kid: str
    alg: SigningAlg
    public_jwk: dict[str, Any]
    private_pem: str = field(repr=False)


def load_signing_key(path: Path, *, kid: str | None = None) -> ClientSigningKey:
    """Read a PEM private key: RSA (≥ 2048 bits, signs RS384) or EC P-384 (signs ES384)."""
    try:
        pem = Path(path).read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"signing key file {path} cannot be read ({type(error).__name__})") from None
    # cryptography checks type and size first: joserfc itself only warns about short RSA keys.
    try:
        private = serialization.load_pem_private_key(pem.encode("ascii"), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise ValueError(
            f"signing key file {path} must hold an unencrypted RSA or EC P-384 private key in PEM"
        ) from None
    alg: SigningAlg
    if isinstance(private, rsa.RSAPrivateKey):
        if private.key_size < MIN_RSA_BITS:
            raise ValueError(f"signing key file {path}: RSA keys need at least {MIN_RSA_BITS} bits")
        key: Any = jwk.import_key(pem, "RSA")
        alg = "RS384"
    elif isinstance(private, ec.EllipticCurvePrivateKey):
        if private.curve.name != "secp384r1":
            raise ValueError(f"signing key file {path}: EC keys must use curve P-384 (ES384)")
        key = jwk.import_key(pem, "EC")
        alg = "ES384"
    else:
        raise ValueError(f"signing key file {path} must hold an RSA or EC P-384 private key")
    public = dict(key.as_dict(private=False))
    key_id = kid or key.thumbprint()
    public.update({"kid": key_id, "alg": alg, "use": "sig"})
    return ClientSigningKey(kid=key_id, alg=alg, public_jwk=public, private_pem=pem)


def signing_keys_of(ehr: EhrSettings) -> list[ClientSigningKey]:
    """The EHR's keys, oldest first (the last one signs); a legacy `private_key_file` keeps its `key_id`."""
    keys = [load_signing_key(path) for path in ehr.private_key_files]
    if ehr.private_key_file is not None and not keys:
        legacy = load_signing_key(ehr.private_key_file, kid=ehr.key_id)
        if legacy.alg != ehr.signing_alg:
            raise ValueError(
                f"EHR {ehr.name!r}: signing_alg {ehr.signing_alg} does not fit its {legacy.alg} key file"
            )
        keys.append(legacy)
    if ehr.client_auth == "private_key_jwt" and not keys:
        raise ValueError(f"EHR {ehr.name!r} uses private_key_jwt and needs private_key_files")
    return keys


def check_organization_source(ehr: EhrSettings) -> None:
    """US Core needs an organization on every document (custodian) and Provenance agent (onBehalfOf).

    It comes from `organization_id`, else from the clinician's PractitionerRole read at approval, which
    needs a PractitionerRole search scope; a registration with neither cannot write a conforming note.
    """
    if ehr.organization_id:
        return
    if GrantedScopes.parse(ehr.scopes).allows("PractitionerRole", "search"):
        return
    raise ValueError(
        f"EHR {ehr.name!r}: set organization_id (the Organization written as DocumentReference.custodian "
        "and Provenance.agent.onBehalfOf, which US Core requires), or add a scope such as "
        "user/PractitionerRole.rs so CareCanvas can read it from the clinician's PractitionerRole"
    )


class EhrRegistry:
    def __init__(self, ehrs: list[EhrSettings], *, redirect_uri: str) -> None:
        for ehr in ehrs:
            check_organization_source(ehr)
        self._by_iss = {ehr.iss: ehr for ehr in ehrs}
        self._by_name = {ehr.name: ehr for ehr in ehrs}
        self._redirect_uri = redirect_uri
        # Loaded once, at start-up, so a broken key file stops the app instead of a clinician's launch.
        self._keys = {ehr.name: signing_keys_of(ehr) for ehr in ehrs}

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

    def signing_keys(self, ehr: EhrSettings) -> list[ClientSigningKey]:
        return list(self._keys.get(ehr.name, ()))

    def public_jwks(self) -> dict[str, Any]:
        """Every public key of every registration (old ones too, until they are removed from settings)."""
        seen: dict[str, dict[str, Any]] = {}
        for keys in self._keys.values():
            for key in keys:
                seen.setdefault(key.kid, key.public_jwk)
        return {"keys": list(seen.values())}

    def registration(self, ehr: EhrSettings) -> EhrRegistration:
        keys = self._keys.get(ehr.name, [])
        newest = keys[-1] if keys and ehr.client_auth == "private_key_jwt" else None
        return EhrRegistration(
            name=ehr.name,
            iss=ehr.iss,
            client_id=ehr.client_id,
            client_auth=ehr.client_auth,
            client_secret=ehr.client_secret,
            private_key=newest.private_pem if newest else None,
            key_id=newest.kid if newest else None,
            signing_alg=newest.alg if newest else ehr.signing_alg,
            scopes=tuple(ehr.scopes),
            frame_origins=tuple(ehr.frame_origins),
            auth_origins=tuple(ehr.auth_origins),
            redirect_uri=self._redirect_uri,
        )
