"""One translation from workflow refusals to AppError (status + code), shared by the pages and the API."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from sqlalchemy.ext.asyncio import AsyncSession

from fhir_adapters import FhirError
from service.fhir_access import SessionExpiredError
from service.web.errors import AppError, ErrorCode, fhir_failure, session_ended
from service.workflows.errors import Reason, WorkflowError

# status, title, code: decided on the reason code, never on the message text.
_BY_REASON: dict[Reason, tuple[int, str, ErrorCode]] = {
    Reason.CONDITION_NOT_FOUND: (404, "Condition not found", ErrorCode.NOT_FOUND),
    Reason.WRONG_PATIENT: (403, "Not this patient's record", ErrorCode.NOT_ALLOWED),
    Reason.NO_STORY: (404, "No portrait story yet", ErrorCode.NOT_FOUND),
    Reason.NOT_REPLACEABLE: (404, "No such saved picture", ErrorCode.NOT_FOUND),
    Reason.NOT_READY: (409, "Not ready to approve", ErrorCode.NOT_READY),
    Reason.APPROVAL_IN_PROGRESS: (409, "Being saved right now", ErrorCode.CONFLICT),
    Reason.BINARY_SCOPE_MISSING: (502, "The EHR did not accept the document", ErrorCode.EHR_ERROR),
    Reason.WRITE_BACK_RETRYABLE: (503, "The EHR did not answer in time", ErrorCode.EHR_UNAVAILABLE),
    Reason.WRITE_BACK_REJECTED: (502, "The EHR did not accept the document", ErrorCode.EHR_ERROR),
    Reason.WRITE_BACK_TOO_LARGE: (502, "Too large for this EHR", ErrorCode.EHR_TOO_LARGE),
    Reason.ORGANIZATION_UNKNOWN: (409, "Your organization is not known", ErrorCode.NO_ORGANIZATION),
    Reason.JOB_NOT_FOUND: (404, "No such illustration", ErrorCode.NOT_FOUND),
    Reason.FILE_NOT_AVAILABLE: (404, "File not available", ErrorCode.NOT_FOUND),
    Reason.FILE_DAMAGED: (502, "The file could not be read", ErrorCode.EHR_ERROR),
    Reason.NOT_ALLOWED: (403, "This is not allowed for this launch", ErrorCode.NOT_ALLOWED),
    Reason.ABOVE_READING_TARGET: (422, "The caption is hard to read", ErrorCode.ABOVE_READING_TARGET),
    Reason.PORTRAIT_NOT_REVIEWED: (409, "Not approved by a reviewer yet", ErrorCode.PORTRAIT_NOT_REVIEWED),
    Reason.TOPIC_ALREADY_MATCHED: (422, "This condition has its own topic", ErrorCode.TOPIC_ALREADY_MATCHED),
}


def app_error_for(error: WorkflowError) -> AppError:
    status, title, code = _BY_REASON[error.reason]
    return AppError(status, title, error.message, code=code)


@contextlib.asynccontextmanager
async def workflow_errors(db: AsyncSession) -> AsyncIterator[None]:
    """Roll back the request's transaction on a refusal, and say what was refused and why."""
    try:
        yield
    except WorkflowError as error:
        await db.rollback()
        raise app_error_for(error) from error
    except SessionExpiredError as error:
        await db.rollback()
        raise session_ended(str(error)) from error
    except FhirError as error:
        await db.rollback()
        raise fhir_failure(error) from error
