"""Async FHIR R4 REST client: bounded pool, deadline, careful retries, one re-auth, safe paging."""

from __future__ import annotations

import asyncio
import email.utils
import json
import random
import re
import ssl
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Protocol
from urllib.parse import urlencode, urljoin, urlsplit

import httpx
import structlog

from fhir_adapters.errors import (
    FatalFhirError,
    FhirError,
    ForbiddenError,
    InvalidRequestError,
    InvalidResponseError,
    NotFoundError,
    PreconditionFailedError,
    RequestTooLargeError,
    TemporaryFhirError,
    TlsError,
    UnauthorizedError,
)

_log = structlog.get_logger("fhir_adapters.client")

FHIR_JSON = "application/fhir+json"
TEMPORARY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
_ACCEPTED_CONTENT_TYPES = frozenset({"application/fhir+json", "application/json", "application/json+fhir"})
_RESOURCE_TYPE = re.compile(r"^[A-Z][A-Za-z]{1,63}$")
_RESOURCE_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
_MAX_DIAGNOSTICS_CHARS = 2000
_DEFAULT_PORTS = {"http": 80, "https": 443}
# A front proxy that refuses a large body often answers a bare 500 ("request entity too large").
_TOO_LARGE_WORDS = ("too large", "entity too large", "payload too large", "body too large")
_STATED_LIMIT = re.compile(
    r"(?:at most|larger than|more than|exceeds?|limit(?: is| of)?|maximum(?: is| of)?)\s+(\d{1,12})\s*bytes",
    re.IGNORECASE,
)


class TokenSource(Protocol):
    """Where the client gets bearer tokens; `refreshed_token` is called once after a 401."""

    async def access_token(self) -> str: ...

    async def refreshed_token(self) -> str: ...


@dataclass(frozen=True)
class WriteResult:
    """Outcome of a create or update."""

    resource: dict[str, Any]
    status: int
    location: str | None
    created: bool

    @property
    def id(self) -> str | None:
        value = self.resource.get("id")
        return value if isinstance(value, str) else None

    @property
    def version_id(self) -> str | None:
        meta = self.resource.get("meta")
        value = meta.get("versionId") if isinstance(meta, dict) else None
        return value if isinstance(value, str) else None


def origin_of(url: str) -> tuple[str, str, int]:
    """(scheme, host, port) with default ports filled in, for whole-origin comparison."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not parts.hostname:
        raise ValueError("URL must be absolute http(s)")
    return scheme, parts.hostname.lower(), parts.port or _DEFAULT_PORTS[scheme]


def check_resource_type(resource_type: str) -> str:
    if not isinstance(resource_type, str) or not _RESOURCE_TYPE.match(resource_type):
        raise ValueError("resource type must be a FHIR resource name such as 'Condition'")
    return resource_type


def check_resource_id(resource_id: str) -> str:
    if not isinstance(resource_id, str) or not _RESOURCE_ID.match(resource_id):
        raise ValueError("resource id must be 1-64 of A-Z a-z 0-9 - .")
    return resource_id


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP-date); None if absent/unusable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


def operation_outcome_text(outcome: Mapping[str, Any] | None) -> str:
    """The human text of an OperationOutcome's issues (diagnostics, else details.text), joined."""
    if not isinstance(outcome, Mapping) or outcome.get("resourceType") != "OperationOutcome":
        return ""
    texts = []
    for issue in outcome.get("issue") or []:
        if not isinstance(issue, Mapping):
            continue
        text = issue.get("diagnostics")
        details = issue.get("details")
        if not isinstance(text, str) and isinstance(details, Mapping):
            text = details.get("text")
        if isinstance(text, str) and text.strip():
            texts.append(text.strip())
    return "; ".join(texts)[:_MAX_DIAGNOSTICS_CHARS]


def _stated_limit(text: str) -> int | None:
    match = _STATED_LIMIT.search(text)
    return int(match.group(1)) if match else None


def _tls_failure(error: BaseException) -> bool:
    """Whether an httpx connect error was caused by the TLS handshake or certificate check."""
    seen: BaseException | None = error
    for _ in range(8):
        if seen is None:
            return False
        if isinstance(seen, ssl.SSLError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _is_conditional_transaction(bundle: Mapping[str, Any]) -> bool:
    entries = bundle.get("entry") or []
    for entry in entries:
        request = entry.get("request") or {}
        method = str(request.get("method", "")).upper()
        if method == "POST" and not request.get("ifNoneExist"):
            return False
        if method not in ("POST", "PUT", "GET", "HEAD", "DELETE"):
            return False
    return bool(entries)


class _Attempt:
    """Per-operation bookkeeping: deadline and whether the one re-auth was used."""

    def __init__(self, deadline_seconds: float) -> None:
        self.deadline = time.monotonic() + deadline_seconds
        self.reauthenticated = False
        self.refreshed = False

    def remaining(self) -> float:
        return self.deadline - time.monotonic()


def fhir_pool(
    *,
    timeout: httpx.Timeout = httpx.Timeout(10.0, connect=5.0),  # noqa: B008 - immutable value
    max_connections: int = 4,
    transport: httpx.AsyncBaseTransport | None = None,
    verify: bool | ssl.SSLContext = True,
) -> httpx.AsyncClient:
    """The connection pool a FhirClient talks through: no redirects, no proxies from the environment."""
    return httpx.AsyncClient(
        timeout=timeout,
        limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
        follow_redirects=False,
        transport=transport,
        verify=verify,
        headers={"Accept": FHIR_JSON},
        trust_env=False,
    )


class FhirClient:
    """One FHIR server: `async with FhirClient(base, auth=...) as fhir: await fhir.read("Patient", pid)`."""

    def __init__(
        self,
        base_url: str,
        *,
        auth: TokenSource | None,
        timeout: httpx.Timeout = httpx.Timeout(10.0, connect=5.0),  # noqa: B008 - immutable value
        deadline_seconds: float = 30,
        max_connections: int = 4,
        retries: int = 3,
        backoff_seconds: float = 0.5,
        max_pages: int = 50,
        max_entries: int = 5000,
        max_bytes: int = 20_000_000,
        transport: httpx.AsyncBaseTransport | None = None,
        verify: bool | ssl.SSLContext = True,
        http: httpx.AsyncClient | None = None,
        capabilities: Mapping[str, Any] | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._origin = origin_of(self.base_url)
        if deadline_seconds <= 0 or retries < 0 or backoff_seconds < 0:
            raise ValueError("deadline_seconds must be > 0; retries and backoff_seconds must be >= 0")
        if min(max_pages, max_entries, max_bytes, max_connections) < 1:
            raise ValueError("max_pages, max_entries, max_bytes and max_connections must be >= 1")
        self._auth = auth
        self._deadline_seconds = deadline_seconds
        self._retries = retries
        self._backoff_seconds = backoff_seconds
        self._max_pages = max_pages
        self._max_entries = max_entries
        self._max_bytes = max_bytes
        # A CapabilityStatement the caller already holds (one fetch per EHR, not per client).
        self._capabilities: dict[str, Any] | None = dict(capabilities) if capabilities is not None else None
        # A shared pool (one per EHR, built once by the caller with `fhir_pool`) is borrowed, never closed
        # here: building a verifying client loads the CA bundle (~21 ms of blocked event loop) each time.
        self._owns_http = http is None
        self._http = http or fhir_pool(
            timeout=timeout, max_connections=max_connections, transport=transport, verify=verify
        )

    async def __aenter__(self) -> FhirClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._owns_http:
            await self._http.aclose()

    # ---- public operations -------------------------------------------------------------------------

    async def capabilities(self) -> dict[str, Any]:
        """The server's CapabilityStatement (GET [base]/metadata), fetched once per client."""
        if self._capabilities is None:
            response = await self._send(
                "GET", f"{self.base_url}/metadata", resource_type="CapabilityStatement", retryable=True
            )
            self._capabilities = self._expect(response, "CapabilityStatement")
        return self._capabilities

    async def read(self, resource_type: str, resource_id: str) -> dict[str, Any]:
        """GET [base]/Type/id."""
        check_resource_type(resource_type)
        check_resource_id(resource_id)
        response = await self._send(
            "GET",
            f"{self.base_url}/{resource_type}/{resource_id}",
            resource_type=resource_type,
            retryable=True,
        )
        resource = self._expect(response, resource_type)
        if resource.get("id") not in (None, resource_id):
            raise InvalidResponseError(f"read {resource_type} returned a resource with another id")
        return resource

    async def vread(self, resource_type: str, resource_id: str, version_id: str) -> dict[str, Any]:
        """GET [base]/Type/id/_history/vid."""
        check_resource_type(resource_type)
        check_resource_id(resource_id)
        check_resource_id(version_id)
        url = f"{self.base_url}/{resource_type}/{resource_id}/_history/{version_id}"
        response = await self._send("GET", url, resource_type=resource_type, retryable=True)
        return self._expect(response, resource_type)

    async def read_reference(self, reference: str) -> dict[str, Any]:
        """Read "Type/id", "Type/id/_history/v", or an absolute URL on this server's base."""
        relative = reference
        if "://" in reference:
            if not reference.startswith(self.base_url + "/"):
                raise ValueError("absolute references are read only from this client's FHIR base")
            relative = reference[len(self.base_url) + 1 :]
        parts = relative.split("/")
        if len(parts) == 2:
            return await self.read(parts[0], parts[1])
        if len(parts) == 4 and parts[2] == "_history":
            return await self.vread(parts[0], parts[1], parts[3])
        raise ValueError("reference must look like 'Type/id' or 'Type/id/_history/version'")

    async def search_bundles(
        self, resource_type: str, params: Mapping[str, str | Sequence[str]]
    ) -> list[dict[str, Any]]:
        """All searchset pages, following `next` links on this server's origin, within the limits."""
        check_resource_type(resource_type)
        pairs: list[tuple[str, str]] = []
        for key, value in params.items():
            values = [value] if isinstance(value, str) else list(value)
            pairs.extend((key, v) for v in values)
        url: str | None = f"{self.base_url}/{resource_type}" + (f"?{urlencode(pairs)}" if pairs else "")
        attempt = _Attempt(self._deadline_seconds)
        seen_urls: set[str] = set()
        pages: list[dict[str, Any]] = []
        entries = total_bytes = 0
        while url is not None:
            if url in seen_urls:
                raise InvalidResponseError(f"search {resource_type}: next links loop back to an earlier page")
            seen_urls.add(url)
            if len(pages) >= self._max_pages:
                raise InvalidResponseError(f"search {resource_type}: more than {self._max_pages} pages")
            response = await self._send(
                "GET",
                url,
                resource_type=resource_type,
                retryable=True,
                attempt=attempt,
                byte_budget=self._max_bytes - total_bytes,
            )
            total_bytes += len(response.content)
            bundle = self._expect(response, "Bundle")
            if bundle.get("type") != "searchset":
                raise InvalidResponseError(f"search {resource_type}: expected a searchset Bundle")
            page_entries = bundle.get("entry") or []
            if not isinstance(page_entries, list):
                raise InvalidResponseError(f"search {resource_type}: Bundle.entry is not a list")
            entries += len(page_entries)
            if entries > self._max_entries:
                raise InvalidResponseError(f"search {resource_type}: more than {self._max_entries} entries")
            pages.append(bundle)
            url = self._next_link(bundle, resource_type)
        return pages

    async def search(
        self, resource_type: str, params: Mapping[str, str | Sequence[str]]
    ) -> list[dict[str, Any]]:
        """The matching resources of a search (entries with search.mode 'match' or no mode), all pages."""
        matches: list[dict[str, Any]] = []
        for bundle in await self.search_bundles(resource_type, params):
            for entry in bundle.get("entry") or []:
                if not isinstance(entry, dict):
                    raise InvalidResponseError(f"search {resource_type}: malformed Bundle entry")
                mode = (entry.get("search") or {}).get("mode", "match")
                resource = entry.get("resource")
                if mode != "match":
                    continue
                if not isinstance(resource, dict) or resource.get("resourceType") != resource_type:
                    raise InvalidResponseError(f"search {resource_type}: a match entry has another type")
                matches.append(resource)
        return matches

    async def create(self, resource: Mapping[str, Any], *, if_none_exist: str | None = None) -> WriteResult:
        """POST [base]/Type; with `if_none_exist` a conditional create (200 = it already existed)."""
        resource_type = check_resource_type(str(resource.get("resourceType")))
        headers = {"Prefer": "return=representation"}
        if if_none_exist is not None:
            headers["If-None-Exist"] = if_none_exist
        # A plain POST that fails after the server committed it would create a duplicate if sent again, so
        # only conditional creates are retried: the server answers the repeat with the existing resource.
        response = await self._send(
            "POST",
            f"{self.base_url}/{resource_type}",
            resource_type=resource_type,
            retryable=if_none_exist is not None,
            body=resource,
            headers=headers,
        )
        return await self._write_result(response, resource_type)

    async def update(self, resource: Mapping[str, Any], *, if_match: str | None = None) -> WriteResult:
        """PUT [base]/Type/id (idempotent, so retried); `if_match` is an ETag like 'W/"3"'."""
        resource_type = check_resource_type(str(resource.get("resourceType")))
        resource_id = check_resource_id(str(resource.get("id")))
        headers = {"Prefer": "return=representation"}
        if if_match is not None:
            headers["If-Match"] = if_match
        response = await self._send(
            "PUT",
            f"{self.base_url}/{resource_type}/{resource_id}",
            resource_type=resource_type,
            retryable=True,
            body=resource,
            headers=headers,
        )
        return await self._write_result(response, resource_type)

    async def transaction(self, bundle: Mapping[str, Any]) -> dict[str, Any]:
        """POST a transaction Bundle to [base]; returns the transaction-response Bundle."""
        if bundle.get("resourceType") != "Bundle" or bundle.get("type") != "transaction":
            raise ValueError("transaction() needs a Bundle of type 'transaction'")
        # A transaction is all-or-nothing, but resending one the server committed repeats its creates;
        # it is safe only when every POST is conditional (and other entries are idempotent PUT/GET/DELETE).
        response = await self._send(
            "POST",
            self.base_url,
            resource_type="Bundle",
            retryable=_is_conditional_transaction(bundle),
            body=bundle,
            headers={"Prefer": "return=representation"},
        )
        result = self._expect(response, "Bundle")
        if result.get("type") != "transaction-response":
            raise InvalidResponseError("transaction answered with a Bundle that is no transaction-response")
        if len(result.get("entry") or []) != len(bundle.get("entry") or []):
            raise InvalidResponseError("transaction-response has a different number of entries")
        return result

    # ---- internals ---------------------------------------------------------------------------------

    def _next_link(self, bundle: Mapping[str, Any], resource_type: str) -> str | None:
        for link in bundle.get("link") or []:
            if isinstance(link, Mapping) and link.get("relation") == "next":
                url = link.get("url")
                if not isinstance(url, str) or not url:
                    raise InvalidResponseError(f"search {resource_type}: next link without a URL")
                # Relative links resolve against the base like a browser would; the origin check follows.
                url = urljoin(self.base_url + "/", url)
                try:
                    same_origin = origin_of(url) == self._origin
                except ValueError:
                    same_origin = False
                if not same_origin:
                    raise InvalidResponseError(f"search {resource_type}: next link points to another origin")
                try:
                    httpx.URL(url)
                except httpx.InvalidURL:
                    # e.g. control characters: the server's link is unusable, whatever its origin.
                    raise InvalidResponseError(
                        f"search {resource_type}: next link is not a valid URL"
                    ) from None
                return url
        return None

    async def _write_result(self, response: httpx.Response, resource_type: str) -> WriteResult:
        location = response.headers.get("Location") or response.headers.get("Content-Location")
        if response.content.strip():
            resource = self._expect(response, resource_type)
        elif location:
            # Servers that ignore Prefer: return=representation send only a Location; read what was written.
            path = location.split(self.base_url + "/", 1)[-1].lstrip("/")
            resource = await self.read_reference("/".join(path.split("/")[:4]))
        else:
            raise InvalidResponseError(f"write {resource_type}: no resource and no Location in the answer")
        status = response.status_code
        return WriteResult(resource=resource, status=status, location=location, created=status == 201)

    def _expect(self, response: httpx.Response, resource_type: str) -> dict[str, Any]:
        content_type = response.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if content_type not in _ACCEPTED_CONTENT_TYPES:
            raise InvalidResponseError(
                f"{resource_type}: expected FHIR JSON, got content type {content_type or 'none'}",
                status=response.status_code,
            )
        try:
            data = json.loads(response.content)
        except (ValueError, UnicodeDecodeError):
            raise InvalidResponseError(
                f"{resource_type}: response is not valid JSON", status=response.status_code
            ) from None
        if not isinstance(data, dict) or data.get("resourceType") != resource_type:
            raise InvalidResponseError(
                f"expected a {resource_type}, got another resourceType", status=response.status_code
            )
        return data

    def _error_for(
        self, response: httpx.Response, method: str, resource_type: str, *, sent_bytes: int | None = None
    ) -> FhirError:
        status = response.status_code
        outcome: dict[str, Any] | None = None
        try:
            parsed = json.loads(response.content) if response.content else None
            if isinstance(parsed, dict) and parsed.get("resourceType") == "OperationOutcome":
                outcome = parsed
        except (ValueError, UnicodeDecodeError):
            outcome = None
        kwargs: dict[str, Any] = {
            "status": status,
            "operation_outcome": outcome,
            "diagnostics": operation_outcome_text(outcome),
        }
        reason = response.reason_phrase or "error"
        message = f"{method} {resource_type}: server answered {status} {reason}"
        too_large = self._too_large(response, status, kwargs["diagnostics"], sent_bytes=sent_bytes)
        if too_large is not None:
            too_large.operation_outcome, too_large.diagnostics = outcome, kwargs["diagnostics"]
            return too_large
        if status in TEMPORARY_STATUSES:
            return TemporaryFhirError(
                message, retry_after=parse_retry_after(response.headers.get("Retry-After")), **kwargs
            )
        if 300 <= status < 400:
            return InvalidResponseError(f"{method} {resource_type}: redirect {status} refused", **kwargs)
        error_class: type[FatalFhirError] = {
            401: UnauthorizedError,
            403: ForbiddenError,
            404: NotFoundError,
            410: NotFoundError,
            412: PreconditionFailedError,
        }.get(status, FatalFhirError)
        if status < 300:
            error_class = InvalidResponseError
        return error_class(message, **kwargs)

    @staticmethod
    def _too_large(
        response: httpx.Response, status: int, diagnostics: str, *, sent_bytes: int | None
    ) -> RequestTooLargeError | None:
        """413, or a 500 whose text says the body was too large (a proxy's answer: retrying never helps)."""
        if status not in (413, 500):
            return None
        text = diagnostics or response.content[:4000].decode("utf-8", "replace")
        if status == 500 and not any(word in text.lower() for word in _TOO_LARGE_WORDS):
            return None
        size = f" ({sent_bytes} bytes)" if sent_bytes is not None else ""
        return RequestTooLargeError(
            f"{response.request.method} refused as too large{size}: server answered {status}",
            status=status,
            sent_bytes=sent_bytes,
            limit_bytes=_stated_limit(text),
        )

    def _backoff(self, retry_number: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return retry_after
        # Full jitter keeps many clients that failed together from retrying together.
        return random.uniform(0, self._backoff_seconds * 2**retry_number) + self._backoff_seconds / 2  # noqa: S311

    async def _read_limited(
        self, response: httpx.Response, budget: int, method: str, resource_type: str
    ) -> httpx.Response:
        """Read a streamed body, stopping as soon as it passes `budget` bytes (decoded)."""
        too_big = f"{method} {resource_type}: response exceeds the {self._max_bytes}-byte limit"
        declared = response.headers.get("Content-Length")
        if declared and declared.isdigit() and int(declared) > budget:
            raise InvalidResponseError(too_big)
        chunks: list[bytes] = []
        size = 0
        async for chunk in response.aiter_bytes():
            size += len(chunk)
            if size > budget:
                raise InvalidResponseError(too_big)
            chunks.append(chunk)
        # A fresh, fully read response; the body is already decoded, so encoding headers no longer apply.
        headers = [
            (key, value)
            for key, value in response.headers.multi_items()
            if key.lower() not in ("content-encoding", "content-length", "transfer-encoding")
        ]
        return httpx.Response(
            response.status_code, headers=headers, content=b"".join(chunks), request=response.request
        )

    async def _send(
        self,
        method: str,
        url: str,
        *,
        resource_type: str,
        retryable: bool,
        body: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        attempt: _Attempt | None = None,
        byte_budget: int | None = None,
    ) -> httpx.Response:
        attempt = attempt or _Attempt(self._deadline_seconds)
        budget = self._max_bytes if byte_budget is None else byte_budget
        content = json.dumps(body, separators=(",", ":")).encode("utf-8") if body is not None else None
        retry_number = 0
        while True:
            request_headers = dict(headers or {})
            if content is not None:
                request_headers["Content-Type"] = FHIR_JSON
            if self._auth is not None:
                # The refresh happens once, right after the 401; later retries use the token source's
                # current token (which is the refreshed one).
                refresh_now = attempt.reauthenticated and not attempt.refreshed
                token = await (self._auth.refreshed_token() if refresh_now else self._auth.access_token())
                attempt.refreshed = attempt.refreshed or refresh_now
                request_headers["Authorization"] = f"Bearer {token}"
            started = time.monotonic()
            error: FhirError
            try:
                remaining = attempt.remaining()
                if remaining <= 0:
                    raise TimeoutError
                async with asyncio.timeout(remaining):
                    request = self._http.build_request(method, url, content=content, headers=request_headers)
                    streamed = await self._http.send(request, stream=True)
                    try:
                        response = await self._read_limited(streamed, budget, method, resource_type)
                    finally:
                        await streamed.aclose()
            except TimeoutError:
                _log.info("fhir.request", method=method, resource_type=resource_type, outcome="deadline")
                raise TemporaryFhirError(
                    f"{method} {resource_type}: no answer within the {self._deadline_seconds}s deadline"
                ) from None
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                if _tls_failure(exc):
                    # A certificate the pool does not trust stays untrusted: say so instead of retrying.
                    raise TlsError(
                        f"{method} {resource_type}: the TLS handshake or certificate check failed"
                    ) from None
                # Nothing reached the server, so even a plain POST may be sent again.
                error = TemporaryFhirError(f"{method} {resource_type}: could not connect to the FHIR server")
                may_retry = True
            except (httpx.UnsupportedProtocol, httpx.LocalProtocolError, httpx.InvalidURL) as exc:
                # Our side could not put the request on the wire (a URL or header value it cannot send).
                raise InvalidRequestError(
                    f"{method} {resource_type}: the request could not be sent ({type(exc).__name__})"
                ) from None
            except httpx.TransportError as exc:
                error = TemporaryFhirError(
                    f"{method} {resource_type}: connection failed ({type(exc).__name__})"
                )
                may_retry = retryable
            except ssl.SSLError:
                raise TlsError(f"{method} {resource_type}: the TLS connection failed") from None
            except httpx.HTTPError as exc:
                # Whatever else httpx raises (an undecodable Content-Encoding, a stream error): the answer
                # cannot be used, and the error pages must be able to say so.
                raise InvalidResponseError(
                    f"{method} {resource_type}: the answer could not be read ({type(exc).__name__})"
                ) from None
            else:
                duration_ms = round((time.monotonic() - started) * 1000, 1)
                _log.info(
                    "fhir.request",
                    method=method,
                    resource_type=resource_type,
                    status=response.status_code,
                    duration_ms=duration_ms,
                )
                if 200 <= response.status_code < 300:
                    return response
                if response.status_code == 401 and self._auth is not None and not attempt.reauthenticated:
                    attempt.reauthenticated = True
                    continue
                error = self._error_for(
                    response, method, resource_type, sent_bytes=len(content) if content is not None else None
                )
                may_retry = retryable and isinstance(error, TemporaryFhirError)
            if not may_retry or retry_number >= self._retries:
                raise error
            retry_after = error.retry_after if isinstance(error, TemporaryFhirError) else None
            delay = self._backoff(retry_number, retry_after)
            if delay >= attempt.remaining():
                raise error
            retry_number += 1
            await asyncio.sleep(delay)
