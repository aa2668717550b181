"""In-memory state of the sandbox authorization server (launches, codes, tokens, assertion ids)."""

from __future__ import annotations

import secrets
import threading
import time
from dataclasses import dataclass, field


@dataclass(frozen=True)
class LaunchContext:
    """What an EHR launch (or a standalone patient pick) puts into the token response."""

    patient: str | None
    encounter: str | None
    fhir_user: str  # relative reference, e.g. "Practitioner/prac-1"
    need_patient_banner: bool
    auth_time: int = field(default_factory=lambda: int(time.time()))


@dataclass
class StoredLaunch:
    context: LaunchContext
    expires_at: float


@dataclass
class AuthorizationCode:
    """An issued authorization code (authlib's AuthorizationCodeMixin)."""

    code: str
    client_id: str
    redirect_uri: str
    scope: str
    code_challenge: str | None
    code_challenge_method: str | None
    nonce: str | None
    context: LaunchContext
    expires_at: float
    used: bool = False
    issued_access_jtis: list[str] = field(default_factory=list)
    issued_refresh_tokens: list[str] = field(default_factory=list)

    def get_redirect_uri(self) -> str:
        return self.redirect_uri

    def get_scope(self) -> str:
        return self.scope


@dataclass
class RefreshToken:
    """An issued refresh token (authlib's TokenMixin)."""

    token: str
    client_id: str
    scope: str
    context: LaunchContext
    origin_code: str | None
    expires_at: float
    revoked: bool = False

    def check_client(self, client: object) -> bool:
        return getattr(client, "client_id", None) == self.client_id

    def get_scope(self) -> str:
        return self.scope

    def is_expired(self) -> bool:
        return time.time() >= self.expires_at

    def is_revoked(self) -> bool:
        return self.revoked


@dataclass
class AccessTokenRecord:
    """What /introspect knows about an access token (by jti)."""

    jti: str
    client_id: str
    scope: str
    expires_at: float
    claims: dict[str, object]
    revoked: bool = False


class AuthStore:
    """Thread-safe maps: the runner and tests call into it from another thread than the server's loop."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._launches: dict[str, StoredLaunch] = {}
        self._codes: dict[str, AuthorizationCode] = {}
        self._refresh: dict[str, RefreshToken] = {}
        self._access: dict[str, AccessTokenRecord] = {}
        self._assertion_jtis: dict[str, float] = {}

    # launches
    def create_launch(self, context: LaunchContext, *, lifetime: int) -> str:
        launch_id = secrets.token_urlsafe(18)
        with self._lock:
            self._launches[launch_id] = StoredLaunch(context, time.time() + lifetime)
        return launch_id

    def get_launch(self, launch_id: str) -> LaunchContext | None:
        """The launch context, or None when unknown or expired (launches may be used more than once)."""
        with self._lock:
            stored = self._launches.get(launch_id)
            if stored is None:
                return None
            if time.time() >= stored.expires_at:
                del self._launches[launch_id]
                return None
            return stored.context

    # authorization codes
    def save_code(self, code: AuthorizationCode) -> None:
        with self._lock:
            self._codes[code.code] = code

    def get_code(self, code: str) -> AuthorizationCode | None:
        with self._lock:
            return self._codes.get(code)

    def mark_code_used(self, code: AuthorizationCode) -> None:
        with self._lock:
            code.used = True

    def revoke_from_code(self, code: AuthorizationCode) -> None:
        """OAuth security BCP: a replayed code revokes every token issued from it."""
        with self._lock:
            for token in code.issued_refresh_tokens:
                if token in self._refresh:
                    self._refresh[token].revoked = True
            for jti in code.issued_access_jtis:
                if jti in self._access:
                    self._access[jti].revoked = True

    # tokens
    def save_access(self, record: AccessTokenRecord, *, origin_code: str | None) -> None:
        with self._lock:
            self._access[record.jti] = record
            if origin_code and origin_code in self._codes:
                self._codes[origin_code].issued_access_jtis.append(record.jti)

    def get_access(self, jti: str) -> AccessTokenRecord | None:
        with self._lock:
            return self._access.get(jti)

    def save_refresh(self, token: RefreshToken) -> None:
        with self._lock:
            self._refresh[token.token] = token
            if token.origin_code and token.origin_code in self._codes:
                self._codes[token.origin_code].issued_refresh_tokens.append(token.token)

    def get_refresh(self, token: str) -> RefreshToken | None:
        with self._lock:
            return self._refresh.get(token)

    def revoke_refresh(self, token: RefreshToken) -> None:
        with self._lock:
            token.revoked = True

    # client assertions
    def use_assertion_jti(self, key: str, *, expires_at: float) -> bool:
        """Record a client assertion's (client, jti); False when it was seen before (a replay)."""
        now = time.time()
        with self._lock:
            for seen, until in list(self._assertion_jtis.items()):
                if until < now:
                    del self._assertion_jtis[seen]
            if key in self._assertion_jtis:
                return False
            self._assertion_jtis[key] = expires_at
            return True
