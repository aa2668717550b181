"""`carecanvas audit verify` and `audit export` on what an embedded install wrote to its data directory."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path

import pytest

from service.app import build_services
from service.audit import AuditAction
from service.cli import main
from service.settings import Settings


async def _write_records(settings: Settings, count: int) -> None:
    services = await build_services(settings)
    try:
        for index in range(count):
            async with services.sessionmaker() as db:
                await services.audit.append(
                    db,
                    action=AuditAction.FHIR_READ,
                    outcome="success",
                    actor="Practitioner/prac-1",
                    patient="pat-1",
                    ehr="sandbox",
                    resource="Condition",
                    request_id=f"req-{index}",
                    detail={"count": index},
                )
                await db.commit()
        async with services.sessionmaker() as db:
            await services.audit.checkpoint(db)
    finally:
        await services.http.aclose()
        await services.engine.dispose()


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("CARECANVAS_DATA_DIR", str(tmp_path))
    asyncio.run(_write_records(Settings(data_dir=tmp_path), 5))
    return tmp_path


def test_verify_passes_on_an_untouched_chain(data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["audit", "verify"]) == 0
    assert "audit chain OK: 5 records" in capsys.readouterr().out


def test_verify_names_the_first_tampered_record(data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Someone with the database file drops the guard trigger and rewrites a record's action.
    with sqlite3.connect(data_dir / "carecanvas.db") as connection:
        connection.execute("DROP TRIGGER audit_records_no_update")
        connection.execute("UPDATE audit_records SET action = 'login' WHERE seq = 3")
    assert main(["audit", "verify"]) == 1
    assert "BROKEN at record 3" in capsys.readouterr().err


def test_verify_detects_a_deleted_tail_through_the_signed_checkpoint(
    data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with sqlite3.connect(data_dir / "carecanvas.db") as connection:
        connection.execute("DROP TRIGGER audit_records_no_delete")
        connection.execute("DELETE FROM audit_records WHERE seq >= 4")
    assert main(["audit", "verify"]) == 1
    assert "BROKEN" in capsys.readouterr().err


def test_export_writes_balp_audit_events_and_audits_itself(
    data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["audit", "export"]) == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert len(events) == 5
    assert all(event["resourceType"] == "AuditEvent" for event in events)
    # The export itself is an audited touch of patient data.
    assert main(["audit", "verify"]) == 0
    assert "6 records" in capsys.readouterr().out
