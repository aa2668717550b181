"""Push audit records to an EHR as BALP AuditEvents with a SMART Backend Services token, from a cursor."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

import httpx

from fhir_adapters import EhrRegistration, FhirClient, FhirError, SmartError
from fhir_adapters.smart import SmartConfiguration, TokenSet, backend_services_token, discover
from service.audit import AuditAction, AuditEntry, AuditOutcome, to_audit_event
from service.services import Services
from service.settings import EhrSettings

_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_PAGE = 200
_TOKEN_MARGIN_SECONDS = 30


class AuditPushError(Exception):
    """The push stopped; the message says why (safe to show) and the cursor stays at the last sent record."""

    def __init__(self, message: str, *, pushed: int = 0) -> None:
        super().__init__(message)
        self.pushed = pushed


@dataclass(frozen=True)
class PushResult:
    pushed: int
    through_seq: int  # the cursor after this run: every record up to here was sent (or belongs elsewhere)


def cursor_path(data_dir: Path, ehr_name: str) -> Path:
    if not _SAFE_NAME.match(ehr_name):
        raise AuditPushError("EHR name must be letters, digits, '.', '_' or '-' to name its push cursor")
    return data_dir / "audit-push" / f"{ehr_name}.json"


def read_cursor(path: Path) -> int:
    """The last pushed seq; 0 when nothing was pushed yet."""
    if not path.exists():
        return 0
    try:
        seq = json.loads(path.read_text(encoding="utf-8"))["last_seq"]
    except (OSError, ValueError, KeyError, TypeError):
        raise AuditPushError(f"push cursor {path} is unreadable; fix or remove it") from None
    if not isinstance(seq, int) or seq < 0:
        raise AuditPushError(f"push cursor {path} holds no valid last_seq")
    return seq


def write_cursor(path: Path, seq: int) -> None:
    """Atomically: a crash leaves the old cursor or the new one, never half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {"last_seq": seq, "updated_at": datetime.now(UTC).isoformat()}
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            json.dump(document, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


@contextlib.contextmanager
def _exclusive(path: Path) -> Iterator[None]:
    # Two pushes at once would both send the records after the same cursor.
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise AuditPushError("another audit push to this EHR is running") from None
        yield


class BackendTokenSource:
    """client_credentials tokens for FhirClient; a 401 or a token near expiry fetches a new one."""

    def __init__(
        self,
        *,
        registration: EhrRegistration,
        config: SmartConfiguration,
        scopes: Sequence[str],
        http: httpx.AsyncClient,
    ) -> None:
        self._registration = registration
        self._config = config
        self._scopes = tuple(scopes)
        self._http = http
        self.token_set: TokenSet | None = None

    async def fetch(self) -> str:
        self.token_set = await backend_services_token(
            registration=self._registration, config=self._config, scopes=self._scopes, http=self._http
        )
        return self.token_set.access_token

    async def access_token(self) -> str:
        if self.token_set is None or self.token_set.expires_within(_TOKEN_MARGIN_SECONDS):
            return await self.fetch()
        return self.token_set.access_token

    async def refreshed_token(self) -> str:
        return await self.fetch()


def backend_registration(services: Services, ehr: EhrSettings) -> EhrRegistration:
    """The EHR's registration with the backend client id, private_key_jwt (newest key) and backend scopes."""
    if not ehr.backend_client_id:
        raise AuditPushError(
            f"EHR {ehr.name!r} has no backend_client_id; set it to the client id the EHR registered "
            "for SMART Backend Services"
        )
    keys = services.ehrs.signing_keys(ehr)
    if not keys:
        raise AuditPushError(
            f"EHR {ehr.name!r} has no private_key_files; backend services sign with private_key_jwt"
        )
    return replace(
        services.ehrs.registration(ehr),
        client_id=ehr.backend_client_id,
        client_auth="private_key_jwt",
        client_secret=None,
        private_key=keys[-1].private_pem,
        key_id=keys[-1].kid,
        signing_alg=keys[-1].alg,
        scopes=tuple(ehr.backend_scopes),
    )


async def _pending(
    services: Services, *, ehr_name: str, after_seq: int, limit: int
) -> tuple[list[AuditEntry], int]:
    """Up to `limit` of this EHR's records after the cursor, and the last seq looked at."""
    selected: list[AuditEntry] = []
    examined = after_seq
    async with services.sessionmaker() as db:
        while True:
            page = await services.audit.entries(db, after_seq=examined, limit=_PAGE)
            for entry in page:
                # Only this EHR's records: other EHRs' patients are none of its business.
                if entry.ehr == ehr_name:
                    if len(selected) == limit:
                        return selected, examined
                    selected.append(entry)
                examined = entry.seq
            if len(page) < _PAGE:
                return selected, examined


async def push_audit_events(
    services: Services, *, ehr_name: str, limit: int = 1000, actor: str = "cli"
) -> PushResult:
    """Send the EHR's audit records after its cursor, one POST each; the cursor follows every success.

    Records of other EHRs are skipped (the cursor moves past them). A failure stops the run with
    AuditPushError and leaves the cursor after the last record the EHR accepted. The push is audited.
    """
    if not 0 < limit <= 10_000:
        raise AuditPushError("limit must be between 1 and 10000")
    try:
        ehr = services.ehrs.by_name(ehr_name)
    except LookupError:
        raise AuditPushError(
            f"no EHR named {ehr_name!r}; registered: {', '.join(e.name for e in services.ehrs.all())}"
        ) from None
    registration = backend_registration(services, ehr)
    path = cursor_path(services.settings.data_dir, ehr.name)
    with _exclusive(path):
        start = read_cursor(path)
        entries, examined = await _pending(services, ehr_name=ehr.name, after_seq=start, limit=limit)
        failure: AuditPushError | None = None
        pushed = 0
        try:
            if entries:
                pushed = await _send(services, ehr=ehr, registration=registration, entries=entries, path=path)
            if examined > start:
                write_cursor(path, examined)  # past the records sent and those of other EHRs
        except AuditPushError as error:
            failure, pushed = error, error.pushed
        cursor = read_cursor(path)
        await _audit_push(services, ehr=ehr, actor=actor, pushed=pushed, through=cursor, failed=bool(failure))
        if failure is not None:
            raise failure
        return PushResult(pushed=pushed, through_seq=cursor)


async def _send(
    services: Services,
    *,
    ehr: EhrSettings,
    registration: EhrRegistration,
    entries: list[AuditEntry],
    path: Path,
) -> int:
    pushed = 0
    try:
        http = services.connections.smart(ehr.name)
        config = await discover(ehr.iss, http=http, registration=registration)
        tokens = BackendTokenSource(
            registration=registration, config=config, scopes=ehr.backend_scopes, http=http
        )
        # Fetched before the first POST so a refused token means nothing was sent.
        await tokens.fetch()
    except FhirError as error:
        raise AuditPushError(
            f"backend-services token from EHR {ehr.name!r} failed: {error}"
            + (f" ({error.error})" if isinstance(error, SmartError) and error.error else "")
        ) from None
    pool = None if services.fhir_transport else services.connections.fhir(ehr.name)
    async with FhirClient(ehr.iss, auth=tokens, transport=services.fhir_transport, http=pool) as fhir:
        for entry in entries:
            event = to_audit_event(entry, site=services.settings.site_name, fhir_base=ehr.iss)
            event.pop("id")  # the EHR assigns ids on create
            try:
                await fhir.create(event)
            except FhirError as error:
                status = f" (HTTP {error.status})" if error.status else ""
                raise AuditPushError(
                    f"EHR {ehr.name!r} did not accept audit record {entry.seq}: {error}{status}; "
                    f"{pushed} sent before it, the next push resumes there",
                    pushed=pushed,
                ) from None
            pushed += 1
            write_cursor(path, entry.seq)
    return pushed


async def _audit_push(
    services: Services, *, ehr: EhrSettings, actor: str, pushed: int, through: int, failed: bool
) -> None:
    async with services.sessionmaker() as db:
        await services.audit.append(
            db,
            action=AuditAction.AUDIT_EXPORT,
            outcome=AuditOutcome.FAILURE if failed else AuditOutcome.SUCCESS,
            actor=actor,
            patient=None,
            # No `ehr` column: a push record pushed by the next run would make every run push one more.
            ehr=None,
            resource="AuditEvent",
            request_id=None,
            detail={"count": pushed, "through_seq": through, "pushed_to_ehr": ehr.name},
        )
        await db.commit()
