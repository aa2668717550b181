"""Refused writes are classified once in fhir_adapters, from the OperationOutcome before the words."""

from __future__ import annotations

import pytest

from fhir_adapters import FatalFhirError, WriteRefusal, write_refusal


def refused(status: int, diagnostics: str = "", expression: list[str] | None = None) -> FatalFhirError:
    issue: dict[str, object] = {"severity": "error", "code": "not-supported", "diagnostics": diagnostics}
    if expression is not None:
        issue["expression"] = expression
    outcome = {"resourceType": "OperationOutcome", "issue": [issue]}
    return FatalFhirError("refused", status=status, operation_outcome=outcome, diagnostics=diagnostics)


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (refused(413, "Request Entity Too Large"), WriteRefusal.TOO_LARGE),
        (refused(415), WriteRefusal.ATTACHMENT_TYPE),
        # The issue's expression says which field, whatever language the text is in.
        (
            refused(400, "Format non accepté", ["DocumentReference.content[1].attachment.contentType"]),
            WriteRefusal.ATTACHMENT_TYPE,
        ),
        (refused(422, "attachment content-type image/png is not accepted"), WriteRefusal.ATTACHMENT_TYPE),
        (refused(400, "subject is required", ["DocumentReference.subject"]), WriteRefusal.OTHER),
        (refused(409, "content-type image/png conflicts"), WriteRefusal.OTHER),
        (FatalFhirError("refused", status=400), WriteRefusal.OTHER),
    ],
)
def test_refusals_are_classified(error: FatalFhirError, expected: WriteRefusal) -> None:
    assert write_refusal(error) is expected
