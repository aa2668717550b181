// OperationOutcome helpers: every error leaves the server as an OperationOutcome with issue.diagnostics.
import { getStatus, OperationOutcomeError } from '@medplum/core';

// Medplum derives the HTTP status from OperationOutcome.id; these ids are the ones its getStatus() knows.
const OUTCOME_ID_BY_STATUS = {
  401: 'unauthorized',
  403: 'forbidden',
  404: 'not-found',
  409: 'conflict',
  412: 'precondition-failed',
  413: 'content-too-large',
  415: 'unsupported-media-type',
  422: 'business-rule',
};

const ISSUE_CODE_BY_STATUS = {
  400: 'invalid',
  401: 'login',
  403: 'forbidden',
  404: 'not-found',
  405: 'not-supported',
  409: 'conflict',
  412: 'duplicate',
  413: 'too-costly',
  415: 'not-supported',
  501: 'not-supported',
  503: 'transient',
};

/** Builds an error OperationOutcome whose status getStatus() maps back to `status`. */
export function errorOutcome(status, diagnostics, { issueCode } = {}) {
  const outcome = {
    resourceType: 'OperationOutcome',
    issue: [
      {
        severity: 'error',
        code: issueCode ?? ISSUE_CODE_BY_STATUS[status] ?? (status >= 500 ? 'exception' : 'processing'),
        details: { text: diagnostics },
        diagnostics,
      },
    ],
  };
  if (OUTCOME_ID_BY_STATUS[status]) {
    outcome.id = OUTCOME_ID_BY_STATUS[status];
  }
  return outcome;
}

/** An error that the HTTP layer answers with `status` and an OperationOutcome. */
export class HttpError extends Error {
  constructor(status, diagnostics, { headers = {}, issueCode } = {}) {
    super(diagnostics);
    this.status = status;
    this.headers = headers;
    this.outcome = errorOutcome(status, diagnostics, { issueCode });
  }
}

/** Throws from inside the repository so that Medplum's router keeps the status (it reads outcome.id). */
export function repositoryError(status, diagnostics, options) {
  return new OperationOutcomeError(errorOutcome(status, diagnostics, options));
}

/** Copies details.text into diagnostics so clients find the reason where the brief promises it. */
export function withDiagnostics(outcome) {
  for (const issue of outcome.issue ?? []) {
    if (!issue.diagnostics && issue.details?.text) {
      issue.diagnostics = issue.details.text;
    }
  }
  return outcome;
}

export function statusOf(outcome) {
  return getStatus(outcome);
}
