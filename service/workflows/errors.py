"""Why a workflow refused: one exception family, each with a reason code the faces map to a status.

    WorkflowError(message)               .reason: Reason (stable, never matched on message text)
      ├── JobNotFoundError                job_not_found (unknown, or another session's)
      ├── ConditionNotFoundError          condition_not_found
      ├── WrongPatientError               wrong_patient
      ├── NoStoryError                    no_story
      ├── NotReplaceableError             not_replaceable
      ├── NotReadyError                   not_ready
      ├── ApprovalInProgressError         approval_in_progress
      ├── BinaryScopeMissingError         binary_scope_missing
      ├── NotAllowedError                 not_allowed
      ├── AboveReadingTargetError         above_reading_target (approve anyway needs a reason)
      ├── PortraitNotReviewedError        portrait_not_reviewed (reviewers are on: none approved it)
      ├── PortalFileError                 file_not_available | file_damaged
      └── WriteBackFailedError            write_back_retryable | write_back_rejected
            ├── WriteBackTooLargeError      write_back_too_large (over the EHR's body limit: never retry)
            └── OrganizationUnknownError    organization_unknown (no custodian for US Core)

Messages are written for the clinician and never carry patient data.
"""

from __future__ import annotations

from enum import StrEnum


class Reason(StrEnum):
    CONDITION_NOT_FOUND = "condition_not_found"
    WRONG_PATIENT = "wrong_patient"
    NO_STORY = "no_story"
    NOT_REPLACEABLE = "not_replaceable"
    NOT_READY = "not_ready"
    APPROVAL_IN_PROGRESS = "approval_in_progress"
    BINARY_SCOPE_MISSING = "binary_scope_missing"
    WRITE_BACK_RETRYABLE = "write_back_retryable"
    WRITE_BACK_REJECTED = "write_back_rejected"
    WRITE_BACK_TOO_LARGE = "write_back_too_large"
    ORGANIZATION_UNKNOWN = "organization_unknown"
    NOT_ALLOWED = "not_allowed"
    JOB_NOT_FOUND = "job_not_found"
    FILE_NOT_AVAILABLE = "file_not_available"
    FILE_DAMAGED = "file_damaged"
    ABOVE_READING_TARGET = "above_reading_target"
    PORTRAIT_NOT_REVIEWED = "portrait_not_reviewed"
    TOPIC_ALREADY_MATCHED = "topic_already_matched"


class WorkflowError(Exception):
    reason: Reason

    @property
    def message(self) -> str:
        return str(self)


class ConditionNotFoundError(WorkflowError, LookupError):
    """The condition id is unknown to the EHR (or not visible with this launch)."""

    reason = Reason.CONDITION_NOT_FOUND


class WrongPatientError(WorkflowError, PermissionError):
    """The request names a resource that belongs to another patient than the launch's."""

    reason = Reason.WRONG_PATIENT


class NoStoryError(WorkflowError, LookupError):
    """The patient has no completed portrait story (QuestionnaireResponse) in the record."""

    reason = Reason.NO_STORY


class NotReplaceableError(WorkflowError, LookupError):
    """The document is unknown here, not this patient's, or was never written to the chart."""

    reason = Reason.NOT_REPLACEABLE


class NotReadyError(WorkflowError, RuntimeError):
    """The image is not finished (or the job failed), so there is nothing to approve yet."""

    reason = Reason.NOT_READY


class ApprovalInProgressError(WorkflowError, RuntimeError):
    """Someone else is saving this picture right now and has not finished within the wait."""

    reason = Reason.APPROVAL_IN_PROGRESS


class BinaryScopeMissingError(WorkflowError, RuntimeError):
    """The attachments must go into Binaries, but the launch was not granted Binary create."""

    reason = Reason.BINARY_SCOPE_MISSING


class WriteBackFailedError(WorkflowError, RuntimeError):
    """The EHR refused or failed the write-back; the message is safe to show, the draft is kept."""

    def __init__(self, message: str, *, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.reason = Reason.WRITE_BACK_RETRYABLE if retryable else Reason.WRITE_BACK_REJECTED


class WriteBackTooLargeError(WriteBackFailedError):
    """The EHR (or its proxy) refuses the files as too large even sent apart: trying again never helps."""

    def __init__(self, message: str) -> None:
        super().__init__(message, retryable=False)
        self.reason = Reason.WRITE_BACK_TOO_LARGE


class OrganizationUnknownError(WriteBackFailedError):
    """Neither the registration nor the clinician's PractitionerRole names the organization US Core needs."""

    def __init__(self, message: str) -> None:
        super().__init__(message, retryable=False)
        self.reason = Reason.ORGANIZATION_UNKNOWN


class NotAllowedError(WorkflowError, PermissionError):
    """This user or launch may not do this (e.g. approval without a practitioner)."""

    reason = Reason.NOT_ALLOWED


class JobNotOwnedError(WorkflowError, LookupError):
    """No such job for this session (job ids are not secrets: another session's job is not found either)."""

    reason = Reason.JOB_NOT_FOUND


class PortalFileError(WorkflowError, LookupError):
    """A portal file that is gone, missing, or damaged at the EHR (`damaged`: the EHR sent bad bytes)."""

    def __init__(self, message: str, *, damaged: bool = False) -> None:
        super().__init__(message)
        self.reason = Reason.FILE_DAMAGED if damaged else Reason.FILE_NOT_AVAILABLE


class ArtifactNotReadyError(WorkflowError, LookupError):
    """The image (or its preview) of a job is not there yet."""

    reason = Reason.FILE_NOT_AVAILABLE


class AboveReadingTargetError(WorkflowError, ValueError):
    """The caption reads above the plain-language target and no "approve anyway" reason was given."""

    reason = Reason.ABOVE_READING_TARGET


class TopicAlreadyMatchedError(WorkflowError, ValueError):
    """A topic was chosen for a condition that matched a topic of its own (by code or name): refused, so the
    handout never contradicts what the chart coded; only the generic fallback takes a chosen topic."""

    reason = Reason.TOPIC_ALREADY_MATCHED


class PortraitNotReviewedError(WorkflowError, PermissionError):
    """Reviewers are configured and no reviewer approved this portrait (never sent, waiting, or sent back)."""

    reason = Reason.PORTRAIT_NOT_REVIEWED

    def __init__(self, message: str, *, status: str) -> None:
        super().__init__(message)
        self.status = status  # not_sent | waiting | sent_back
