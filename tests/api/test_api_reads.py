"""GET /conditions and GET /documents each make only their own EHR read and their own audit record."""

from __future__ import annotations

from typing import Any

import pytest
from api_client import ApiSession, audit_count
from harness import RunningApp
from sqlalchemy import text

from sandbox.run import SandboxEHR

pytestmark = pytest.mark.slow


def _fhir_requests_during(sandbox: SandboxEHR, call: Any) -> tuple[Any, list[tuple[str, str]]]:
    before = len(sandbox.fhir.requests())
    result = call()
    return result, [(r["method"], r["path"].split("/fhir/", 1)[-1]) for r in sandbox.fhir.requests()[before:]]


def _last_actions(app: RunningApp, count: int) -> list[tuple[str, str | None]]:
    async def read() -> list[tuple[str, str | None]]:
        async with app.services.sessionmaker() as db:
            rows = await db.execute(
                text("SELECT action, resource_type FROM audit_records ORDER BY seq DESC LIMIT :n"),
                {"n": count},
            )
            return [(row[0], row[1]) for row in rows]

    actions: list[tuple[str, str | None]] = app.call(read())
    return actions


def test_condition_list_reads_only_conditions(
    carecanvas: RunningApp, sandbox: SandboxEHR, clinician: ApiSession
) -> None:
    audits = audit_count(carecanvas)
    answer, requests = _fhir_requests_during(sandbox, lambda: clinician.get("/conditions"))
    assert answer.status_code == 200, answer.text
    assert {c["id"] for c in answer.json()["conditions"]} >= {"cond-1-diabetes", "cond-1-hypertension"}
    assert requests == [("GET", "Condition")]  # no Encounter read, no DocumentReference search
    assert audit_count(carecanvas) == audits + 1
    assert _last_actions(carecanvas, 1) == [("conditions.read", "Condition")]


def test_document_list_reads_only_documents(
    carecanvas: RunningApp, sandbox: SandboxEHR, clinician: ApiSession
) -> None:
    audits = audit_count(carecanvas)
    answer, requests = _fhir_requests_during(sandbox, lambda: clinician.get("/documents"))
    assert answer.status_code == 200, answer.text
    assert answer.json()["unavailable"] is False
    assert requests == [("GET", "DocumentReference")]  # no Condition search, no Encounter read
    assert audit_count(carecanvas) == audits + 1
    assert _last_actions(carecanvas, 1) == [("fhir.search", "DocumentReference")]
