"""`carecanvas audit export` in a subprocess: the filters, three formats, the export audited, bad input."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from fhir.resources.R4B.bundle import Bundle

from service.audit import AuditLog
from service.audit.search import AuditQuery, search_audit
from service.settings import Settings
from service.stores import open_audit_log, open_database, open_keyring

# In the past: each export appends its own record (now), which the filters below must not pick up.
T0 = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
# (days after T0, action, outcome, actor, patient, ehr)
RECORDS = [
    (0, "fhir.read", "success", "Practitioner/prac-1", "pat-1", "sandbox"),
    (1, "fhir.read", "success", "Practitioner/prac-2", "pat-2", "sandbox"),
    (2, "approve", "denied", "Practitioner/prac-2", "Patient/pat-1", "other"),
    (3, "view", "success", "Practitioner/prac-1", "pat-3", "sandbox"),
]


async def _write(settings: Settings) -> None:
    keyring = open_keyring(settings)
    open_audit_log(settings, keyring=keyring)  # a first start also makes the checkpoint signing key
    engine, sessionmaker = await open_database(settings)
    try:
        for days, action, outcome, actor, patient, ehr in RECORDS:
            at = T0 + timedelta(days=days)
            # Same keyring (same digests), a clock that says when each record happened.
            audit = AuditLog(keyring, clock=lambda at=at: at)
            async with sessionmaker() as db, db.begin():
                await audit.append(
                    db,
                    action=action,
                    outcome=outcome,
                    actor=actor,
                    patient=patient,
                    ehr=ehr,
                    resource="Condition/cond-1",
                    request_id=f"req-{days}",
                )
    finally:
        await engine.dispose()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("audit-export")
    asyncio.run(_write(Settings(data_dir=path)))
    return path


def export(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CARECANVAS_DATA_DIR": str(data_dir), "HF_HUB_OFFLINE": "1"}
    env.pop("CARECANVAS_AUDIT_REPORT_TIMEZONE", None)
    return subprocess.run(
        [sys.executable, "-m", "service.cli", "audit", "export", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )


def exported_seqs(result: subprocess.CompletedProcess[str]) -> list[int]:
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert all(event["resourceType"] == "AuditEvent" for event in events)
    return [int(event["id"].removeprefix("carecanvas-audit-")) for event in events]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("--until", "2026-07-01"), [1, 2, 3, 4]),
        (("--patient", "Patient/pat-1"), [1, 3]),
        (("--patient", "pat-2"), [2]),
        (("--user", "Practitioner/prac-2"), [2, 3]),
        (("--action", "fhir.read"), [1, 2]),
        (("--outcome", "denied"), [3]),
        (("--ehr", "other"), [3]),
        (("--since", "2026-06-02", "--until", "2026-06-04"), [2, 3]),
        (("--since", "2026-06-02T12:00:00Z", "--until", "2026-06-30T00:00:00+02:00"), [2, 3, 4]),
        (("--until", "2026-06-02T12:00:00+00:00"), [1]),
        (("--user", "Practitioner/prac-1", "--patient", "pat-3", "--action", "view"), [4]),
        (("--patient", "Patient/pat-9"), []),
        (("--limit", "2"), [1, 2]),
    ],
)
def test_export_is_exactly_the_filtered_set(
    data_dir: Path, args: tuple[str, ...], expected: list[int]
) -> None:
    assert exported_seqs(export(data_dir, *args)) == expected


def test_limit_below_the_matches_says_so(data_dir: Path) -> None:
    result = export(data_dir, "--limit", "1", "--action", "fhir.read")
    assert exported_seqs(result) == [1]
    assert "exported 1 of 2 matching records" in result.stderr


def test_csv_rows_carry_seq_and_record_hash(data_dir: Path) -> None:
    result = export(data_dir, "--format", "csv", "--user", "Practitioner/prac-2")
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert [row["seq"] for row in rows] == ["2", "3"]
    assert all(len(row["hash"]) == 64 for row in rows)
    assert [row["patient"] for row in rows] == ["pat-2", "Patient/pat-1"]


def test_bundle_is_a_valid_fhir_bundle_of_the_filtered_set(data_dir: Path) -> None:
    result = export(data_dir, "--format", "bundle", "--ehr", "sandbox", "--outcome", "success")
    assert result.returncode == 0, result.stderr
    bundle = json.loads(result.stdout)
    Bundle.model_validate(bundle)
    assert [entry["resource"]["id"] for entry in bundle["entry"]] == [
        "carecanvas-audit-1",
        "carecanvas-audit-2",
        "carecanvas-audit-4",
    ]


def test_each_export_is_audited_with_its_filters(tmp_path: Path) -> None:
    asyncio.run(_write(Settings(data_dir=tmp_path)))
    assert exported_seqs(export(tmp_path, "--patient", "pat-1", "--format", "ndjson")) == [1, 3]

    async def exports() -> list:
        settings = Settings(data_dir=tmp_path)
        audit = open_audit_log(settings, keyring=open_keyring(settings, create_if_missing=False))
        engine, sessionmaker = await open_database(settings)
        try:
            async with sessionmaker() as db:
                page = await search_audit(db, audit, AuditQuery(action="audit.export"))
                by_patient = await search_audit(db, audit, AuditQuery(patient="pat-1"))
                verified = await audit.verify(db)
                return [page.entries, [e.seq for e in by_patient.entries], verified]
        finally:
            await engine.dispose()

    [record], patient_seqs, verified = asyncio.run(exports())
    assert record.actor == "cli"
    assert record.patient == "Patient/pat-1"
    assert record.detail["filters"] == {"patient": "Patient/pat-1"}
    assert record.detail["count"] == 2
    assert record.detail["format"] == "ndjson"
    # The export shows up in the patient's own history, and the chain still verifies.
    assert patient_seqs == [record.seq, 3, 1]
    assert verified.ok
    assert verified.count == 5


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--since", "2026-06-03", "--until", "2026-06-01"), "since must be earlier than until"),
        (("--since", "yesterday"), "--since 'yesterday' is not a date or time"),
        (("--action", "Fhir Read"), "action must be a lower-case name"),
        (("--outcome", "fine"), "outcome must be one of success, denied, failure, error"),
        (("--limit", "0"), "--limit must be between 1 and 1000000"),
        (("--patient", "Practitioner/prac-1"), "patient must be a Patient reference"),
    ],
)
def test_bad_input_is_a_clear_message_without_a_traceback(
    data_dir: Path, args: tuple[str, ...], message: str
) -> None:
    result = export(data_dir, *args)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
