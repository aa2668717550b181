"""Everything that speaks FHIR and SMART; never imports the service package.

Exception hierarchy::

    FhirError                      status, operation_outcome, diagnostics
    ├── TemporaryFhirError         408 429 500 502 503 504, timeouts, connection and remote protocol errors
    │                              (retry later)
    ├── FatalFhirError             other 4xx, unusable answers (do not retry)
    │   ├── UnauthorizedError      401 after one re-authentication
    │   ├── ForbiddenError         403
    │   ├── NotFoundError          404, 410
    │   ├── PreconditionFailedError 412
    │   ├── RequestTooLargeError   413, or a proxy's 500 "request entity too large"; sent_bytes, limit_bytes
    │   ├── InvalidRequestError    the request cannot be sent: bad URL (control characters), bad header
    │   ├── TlsError               TLS handshake or certificate verification failed
    │   └── InvalidResponseError   malformed JSON, wrong type, limits, redirects, foreign or invalid next
    │                              links, undecodable bodies
    └── SmartError                 error, error_description, temporary
        ├── DiscoveryError
        ├── TokenError
        ├── IdTokenError
        └── StateError

    ResourceValidationError        a resource we built is invalid: our bug, nothing was sent
    RequestLimitError              one request of a write would be over the EHR's body limit on its own;
                                   content_type, request_bytes, limit_bytes, max_data_bytes; nothing sent
"""

from fhir_adapters.client import FhirClient, TokenSource, WriteResult, fhir_pool
from fhir_adapters.conditions import (
    Coding,
    ConditionSummary,
    EncounterSummary,
    PatientBanner,
    PortraitStory,
    person_name,
    summarize_condition,
    summarize_encounter,
    summarize_patient,
    summarize_story,
)
from fhir_adapters.errors import (
    DiscoveryError,
    DiscoveryProblem,
    FatalFhirError,
    FhirError,
    ForbiddenError,
    IdTokenError,
    InvalidRequestError,
    InvalidResponseError,
    NotFoundError,
    PreconditionFailedError,
    RequestLimitError,
    RequestTooLargeError,
    ResourceValidationError,
    SmartError,
    StateError,
    TemporaryFhirError,
    TlsError,
    TokenError,
    UnauthorizedError,
    WriteRefusal,
    write_refusal,
)
from fhir_adapters.scopes import GrantedScopes, requested_scopes
from fhir_adapters.smart import (
    EhrRegistration,
    PendingAuthorization,
    SmartConfiguration,
    SmartTokenSource,
    TokenSet,
    backend_services_token,
    begin_authorization,
    check_state,
    discover,
    exchange_code,
    refresh,
    verify_id_token,
)
from fhir_adapters.text import clean_text
from fhir_adapters.validate import validate_resource
from fhir_adapters.write import (
    AttachmentPolicy,
    BinaryUpload,
    RequestPlan,
    WrittenDocument,
    apply_attachment_policy,
    attachment_policy_from_capabilities,
    body_bytes,
    fit_request_limit,
    mark_entered_in_error,
    supports_transactions,
    write_document_set,
)
from fhir_adapters.writeback import (
    DocumentReferenceInput,
    build_binary,
    build_document_reference,
    build_model_device,
    build_provenance,
)

__all__ = [
    "AttachmentPolicy",
    "BinaryUpload",
    "Coding",
    "ConditionSummary",
    "DiscoveryError",
    "DiscoveryProblem",
    "DocumentReferenceInput",
    "EhrRegistration",
    "EncounterSummary",
    "FatalFhirError",
    "FhirClient",
    "FhirError",
    "ForbiddenError",
    "GrantedScopes",
    "IdTokenError",
    "InvalidRequestError",
    "InvalidResponseError",
    "NotFoundError",
    "PatientBanner",
    "PendingAuthorization",
    "PortraitStory",
    "PreconditionFailedError",
    "RequestLimitError",
    "RequestPlan",
    "RequestTooLargeError",
    "ResourceValidationError",
    "SmartConfiguration",
    "SmartError",
    "SmartTokenSource",
    "StateError",
    "TemporaryFhirError",
    "TlsError",
    "TokenError",
    "TokenSet",
    "TokenSource",
    "UnauthorizedError",
    "WriteRefusal",
    "WriteResult",
    "WrittenDocument",
    "apply_attachment_policy",
    "attachment_policy_from_capabilities",
    "backend_services_token",
    "begin_authorization",
    "body_bytes",
    "build_binary",
    "build_document_reference",
    "build_model_device",
    "build_provenance",
    "check_state",
    "clean_text",
    "discover",
    "exchange_code",
    "fhir_pool",
    "fit_request_limit",
    "mark_entered_in_error",
    "person_name",
    "refresh",
    "requested_scopes",
    "summarize_condition",
    "summarize_encounter",
    "summarize_patient",
    "summarize_story",
    "supports_transactions",
    "validate_resource",
    "verify_id_token",
    "write_document_set",
    "write_refusal",
]
