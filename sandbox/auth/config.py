"""Configuration of the sandbox authorization server: clients, lifetimes, misbehaviour switches."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from joserfc.jwk import RSAKey

from sandbox.keys import generate_signing_key

ClientType = Literal["public", "confidential-symmetric", "confidential-asymmetric"]
CLIENT_TYPES: tuple[str, ...] = ("public", "confidential-symmetric", "confidential-asymmetric")
DEFAULT_DATA_FILE = Path(__file__).resolve().parent.parent / "data" / "synthetic.json"

DEMO_CLIENT_ID = "carecanvas-demo"
DEMO_CLIENT_SCOPES: tuple[str, ...] = (
    "launch",
    "launch/patient",
    "launch/encounter",
    "openid",
    "fhirUser",
    "profile",
    "offline_access",
    "online_access",
    # v1 syntax
    "patient/*.*",
    "user/*.*",
    "patient/*.read",
    "user/*.read",
    # v2 syntax
    "patient/*.cruds",
    "user/*.cruds",
)


@dataclass
class ClientRegistration:
    """One registered client. `jwks` is the inline public JWKS for private_key_jwt clients."""

    client_id: str
    client_type: ClientType = "public"
    redirect_uris: list[str] = field(default_factory=list)
    scopes: list[str] = field(default_factory=lambda: list(DEMO_CLIENT_SCOPES))
    secret: str | None = None
    jwks: dict[str, Any] | None = None
    grant_types: list[str] | None = None

    def __post_init__(self) -> None:
        if self.client_type not in CLIENT_TYPES:
            raise ValueError(f"client_type {self.client_type!r} is not one of {', '.join(CLIENT_TYPES)}")
        if self.client_type == "confidential-symmetric" and not self.secret:
            raise ValueError(f"client {self.client_id!r} is confidential-symmetric and needs a secret")
        if self.client_type == "confidential-asymmetric" and not (self.jwks and self.jwks.get("keys")):
            raise ValueError(f"client {self.client_id!r} is confidential-asymmetric and needs an inline jwks")

    @property
    def allowed_grant_types(self) -> list[str]:
        """Grant types this client may use; backend services (client_credentials) need a key pair."""
        if self.grant_types is not None:
            return self.grant_types
        grants = ["authorization_code", "refresh_token"]
        if self.client_type == "confidential-asymmetric":
            grants.append("client_credentials")
        return grants


def demo_client(redirect_uris: list[str] | None = None) -> ClientRegistration:
    """The service's demo registration: public client with PKCE."""
    return ClientRegistration(DEMO_CLIENT_ID, client_type="public", redirect_uris=list(redirect_uris or []))


# Names tests may set at run time; anything else is a typo and is refused.
MISBEHAVIOUR_NAMES: tuple[str, ...] = (
    "foreign_issuer",
    "foreign_token_endpoint",
    "id_token_wrong_key",
    "id_token_alg_none",
    "id_token_wrong_aud",
    "id_token_expired",
    "id_token_wrong_nonce",
    "grant_fewer_scopes",
    "access_token_lifetime",
    "rotate_refresh_tokens",
    "allow_code_reuse",
)


class Misbehaviour:
    """Run-time switches that make the server misbehave in one specific, observable way each."""

    foreign_issuer: bool
    foreign_token_endpoint: bool
    id_token_wrong_key: bool
    id_token_alg_none: bool
    id_token_wrong_aud: bool
    id_token_expired: bool
    id_token_wrong_nonce: bool
    grant_fewer_scopes: set[str]
    access_token_lifetime: int | None
    rotate_refresh_tokens: bool
    allow_code_reuse: bool
    _listeners: list[Callable[[str], None]]
    _lock: threading.Lock

    def __init__(self) -> None:
        object.__setattr__(self, "_listeners", [])
        object.__setattr__(self, "_lock", threading.Lock())
        self.reset()

    def reset(self) -> None:
        """Back to a well-behaved server."""
        for name in MISBEHAVIOUR_NAMES:
            off: Any = {"grant_fewer_scopes": set(), "access_token_lifetime": None}.get(name, False)
            setattr(self, name, off)

    def on_change(self, listener: Callable[[str], None]) -> None:
        """Call `listener(name)` after a switch changes (the runner rewrites the smart-configuration file)."""
        self._listeners.append(listener)

    def __setattr__(self, name: str, value: Any) -> None:
        if name not in MISBEHAVIOUR_NAMES:
            raise AttributeError(f"unknown misbehaviour {name!r}; known: {', '.join(MISBEHAVIOUR_NAMES)}")
        if name == "grant_fewer_scopes":
            value = set(value or ())
        elif (
            name == "access_token_lifetime"
            and value is not None
            and (not isinstance(value, int) or isinstance(value, bool) or value < 1)
        ):
            raise ValueError("access_token_lifetime must be a positive number of seconds or None")
        with self._lock:
            object.__setattr__(self, name, value)
        for listener in list(self._listeners):
            listener(name)

    def active(self) -> dict[str, Any]:
        """The switches that are currently on (for logs and the runner's banner)."""
        return {name: getattr(self, name) for name in MISBEHAVIOUR_NAMES if getattr(self, name)}


FOREIGN_ISSUER = "https://foreign-issuer.invalid"
FOREIGN_TOKEN_ENDPOINT = "https://foreign-issuer.invalid/token"


@dataclass
class AuthServerConfig:
    """Everything the authorization server needs; `fhir_base` may be set after the FHIR server starts."""

    issuer: str
    fhir_base: str = ""
    clients: list[ClientRegistration] = field(default_factory=list)
    data_file: Path = DEFAULT_DATA_FILE
    app_launch_url: str | None = None
    portal_url: str | None = None
    signing_key: RSAKey = field(default_factory=generate_signing_key)
    access_token_lifetime: int = 3600
    refresh_token_lifetime: int = 24 * 3600
    id_token_lifetime: int = 3600
    code_lifetime: int = 120
    launch_lifetime: int = 300
    client_assertion_max_lifetime: int = 300
    misbehave: Misbehaviour = field(default_factory=Misbehaviour)

    def __post_init__(self) -> None:
        self.issuer = self.issuer.rstrip("/")
        self.fhir_base = self.fhir_base.rstrip("/")

    @property
    def authorization_endpoint(self) -> str:
        return f"{self.issuer}/authorize"

    @property
    def token_endpoint(self) -> str:
        return f"{self.issuer}/token"

    @property
    def jwks_uri(self) -> str:
        return f"{self.issuer}/jwks.json"

    @property
    def introspection_endpoint(self) -> str:
        return f"{self.issuer}/introspect"

    @property
    def smart_style_url(self) -> str:
        return f"{self.issuer}/smart-style.json"

    @property
    def ehr_url(self) -> str:
        return f"{self.issuer}/ehr"
