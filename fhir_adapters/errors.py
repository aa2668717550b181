"""Exceptions raised by fhir_adapters; the hierarchy is drawn in the package docstring."""

from __future__ import annotations

from enum import StrEnum
from typing import Any


class FhirError(Exception):
    """A FHIR or SMART exchange failed; `diagnostics` holds the server's OperationOutcome text, if any.

    The message (str) never contains the server's diagnostics, URLs with queries, ids or tokens, so it is
    safe to log; `diagnostics` may echo patient data and is for the caller to handle with care.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        operation_outcome: dict[str, Any] | None = None,
        diagnostics: str = "",
    ) -> None:
        super().__init__(message)
        self.status = status
        self.operation_outcome = operation_outcome
        self.diagnostics = diagnostics


class TemporaryFhirError(FhirError):
    """Worth retrying later: 408, 429, 500, 502, 503, 504, timeouts, connection errors."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        operation_outcome: dict[str, Any] | None = None,
        diagnostics: str = "",
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, status=status, operation_outcome=operation_outcome, diagnostics=diagnostics)
        self.retry_after = retry_after


class FatalFhirError(FhirError):
    """Retrying the same request will not help: other 4xx, unusable responses."""


class UnauthorizedError(FatalFhirError):
    """401 even after one re-authentication."""


class ForbiddenError(FatalFhirError):
    """403: the token lacks the rights for this request."""


class NotFoundError(FatalFhirError):
    """404 or 410: the resource does not exist (any more)."""


class PreconditionFailedError(FatalFhirError):
    """412: a conditional request matched several resources or a version check failed."""


class InvalidResponseError(FatalFhirError):
    """The server's answer cannot be used: malformed, wrong type, over a limit, redirect, foreign link,
    a `next` link that is no valid URL, a body that cannot be decoded."""


class RequestTooLargeError(FatalFhirError):
    """413, or a front proxy's 500 that says the request entity is too large: sending it again never helps.

    `sent_bytes` is the size of the refused body; `limit_bytes` the limit, when the answer stated one.
    """

    def __init__(
        self,
        message: str,
        *,
        sent_bytes: int | None = None,
        limit_bytes: int | None = None,
        status: int | None = None,
        operation_outcome: dict[str, Any] | None = None,
        diagnostics: str = "",
    ) -> None:
        super().__init__(message, status=status, operation_outcome=operation_outcome, diagnostics=diagnostics)
        self.sent_bytes = sent_bytes
        self.limit_bytes = limit_bytes


class InvalidRequestError(FatalFhirError):
    """The request could not be sent as built: an unusable URL (control characters) or header value."""


class TlsError(FatalFhirError):
    """The TLS handshake or the server's certificate check failed: a configuration problem, not a blip."""


class SmartError(FhirError):
    """A SMART App Launch or OAuth step failed; `error`/`error_description` as the server sent them."""

    def __init__(
        self,
        message: str,
        *,
        error: str = "",
        error_description: str = "",
        status: int | None = None,
        temporary: bool = False,
    ) -> None:
        super().__init__(message, status=status, diagnostics=error_description)
        self.error = error
        self.error_description = error_description
        self.temporary = temporary


class DiscoveryProblem(StrEnum):
    """Why a SMART configuration was refused: callers branch on this, never on the message text."""

    UNREADABLE = "unreadable"
    ORIGIN_NOT_ALLOWED = "origin_not_allowed"
    NO_PKCE = "no_pkce"


class DiscoveryError(SmartError):
    """The SMART configuration could not be fetched or does not match the registration."""

    def __init__(
        self, message: str, *, problem: DiscoveryProblem = DiscoveryProblem.UNREADABLE, **details: Any
    ) -> None:
        super().__init__(message, **details)
        self.problem = problem


class TokenError(SmartError):
    """The token endpoint refused or failed (authorization code, refresh, client credentials)."""


class IdTokenError(SmartError):
    """The id_token failed verification (signature, algorithm, issuer, audience, expiry, nonce)."""


class StateError(SmartError):
    """The callback's state does not match a pending authorization, or that authorization expired."""


class RequestLimitError(Exception):
    """A request of the write would be over the EHR's body limit even on its own; nothing was sent.

    `content_type` names the attachment whose Binary is too large (None: a resource without attachments);
    `max_data_bytes` is the most attachment bytes one Binary request under this limit can carry.
    """

    def __init__(
        self,
        message: str,
        *,
        content_type: str | None,
        request_bytes: int,
        limit_bytes: int,
        max_data_bytes: int,
    ) -> None:
        super().__init__(message)
        self.content_type = content_type
        self.request_bytes = request_bytes
        self.limit_bytes = limit_bytes
        self.max_data_bytes = max_data_bytes


class ResourceValidationError(Exception):
    """A resource we built does not validate against the FHIR models: our bug, never sent to a server."""


class WriteRefusal(StrEnum):
    """Why an EHR refused a write, classified once here so callers branch on it, never on the text."""

    ATTACHMENT_TYPE = "attachment_type"  # it does not take this attachment's content type (e.g. images)
    TOO_LARGE = "too_large"  # the whole request is over the server's (or its front proxy's) body limit
    INLINE_TOO_LARGE = "inline_too_large"  # an inline attachment is over its inline limit: use a Binary
    OTHER = "other"


# Servers that say which attachment type they refuse only in words (no issue expression) use these.
_CONTENT_TYPE_WORDS = ("contenttype", "content type", "content-type", "image/", "mime")


def write_refusal(error: FhirError) -> WriteRefusal:
    """Classify a refused write from its status and OperationOutcome (issue expression first, words last)."""
    if isinstance(error, RequestTooLargeError) or error.status == 413:
        return WriteRefusal.INLINE_TOO_LARGE if _names_inline_data(error) else WriteRefusal.TOO_LARGE
    if error.status not in (400, 415, 422):
        return WriteRefusal.OTHER
    if error.status == 415 or _names_content_type(error.operation_outcome):
        return WriteRefusal.ATTACHMENT_TYPE
    reason = (error.diagnostics or "").lower()
    return (
        WriteRefusal.ATTACHMENT_TYPE if any(w in reason for w in _CONTENT_TYPE_WORDS) else WriteRefusal.OTHER
    )


def _names_content_type(outcome: dict[str, Any] | None) -> bool:
    for issue in (outcome or {}).get("issue") or []:
        if not isinstance(issue, dict):
            continue
        paths = [*(issue.get("expression") or []), *(issue.get("location") or [])]
        if any(isinstance(path, str) and path.endswith("attachment.contentType") for path in paths):
            return True
    return False


def _names_inline_data(error: FhirError) -> bool:
    """A size refusal about one inline attachment (issue expression first, the word "inline" last)."""
    for issue in (error.operation_outcome or {}).get("issue") or []:
        if not isinstance(issue, dict):
            continue
        paths = [*(issue.get("expression") or []), *(issue.get("location") or [])]
        if any(isinstance(path, str) and path.endswith("attachment.data") for path in paths):
            return True
    return error.operation_outcome is not None and "inline" in (error.diagnostics or "").lower()
