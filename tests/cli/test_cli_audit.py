"""`carecanvas audit verify` and `audit export` on what an embedded install wrote to its data directory."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path

import pytest

from service.audit import AuditAction
from service.audit.signing_key import SigningKeyError
from service.cli import main
from service.services import build_services
from service.settings import Settings
from service.stores import open_audit_signing_key


async def _write_records(settings: Settings, count: int, *, checkpoint: bool = True) -> None:
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
        if checkpoint:
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


def _checkpoints(data_dir: Path) -> Path:
    return data_dir / "audit-checkpoints.jsonl"


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ('{"seq":"four","head_hash":"' + "a" * 64 + '","time":"t","signature":""}', "seq must be"),
        ('{"seq": 4, "time": "t"}', "missing field(s): head_hash, signature"),
        ("[1,2]", "not a JSON object (a list)"),
    ],
)
def test_verify_reports_each_malformed_checkpoint_line_without_a_traceback(
    data_dir: Path, capsys: pytest.CaptureFixture[str], line: str, reason: str
) -> None:
    with _checkpoints(data_dir).open("a") as handle:
        handle.write(line + "\n")
    assert main(["audit", "verify"]) == 1
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out
    assert "audit chain BROKEN: 1 bad checkpoint" in captured.err
    assert f"checkpoint BROKEN line 2: {reason}" in captured.err
    assert "anchoring: 5 records, all anchored" in captured.err


def test_verify_reports_a_torn_last_line(data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with _checkpoints(data_dir).open("a") as handle:
        handle.write('{"seq": 6, "head_hash": "ab')
    assert main(["audit", "verify"]) == 1
    assert "checkpoint BROKEN line 2: torn last line" in capsys.readouterr().err


def test_verify_states_how_much_is_not_yet_anchored(
    data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    asyncio.run(_write_records(Settings(data_dir=data_dir), 2, checkpoint=False))
    assert main(["audit", "verify"]) == 0
    assert "audit chain OK: 7 records, last 2 not yet anchored (last signed checkpoint at record 5)" in (
        capsys.readouterr().out
    )


def test_verify_without_any_checkpoint_says_nothing_anchors_the_chain(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CARECANVAS_DATA_DIR", str(tmp_path))
    asyncio.run(_write_records(Settings(data_dir=tmp_path), 3, checkpoint=False))
    assert main(["audit", "verify"]) == 2
    err = capsys.readouterr().err
    assert "audit chain NOT ANCHORED: 3 records, none anchored" in err
    assert "would go unnoticed" in err


def test_an_auditor_verifies_with_the_public_key_alone(
    data_dir: Path, capsys: pytest.CaptureFixture[str], tmp_path_factory: pytest.TempPathFactory
) -> None:
    assert main(["audit", "public-key"]) == 0
    public = tmp_path_factory.mktemp("auditor") / "audit-public.pem"
    public.write_text(capsys.readouterr().out)
    assert "PUBLIC KEY" in public.read_text()
    # Neither the keyring nor the private signing key is needed (nor touched).
    (data_dir / "keys.json").unlink()
    (data_dir / "audit-signing-key.pem").unlink()
    assert main(["audit", "verify", "--public-key", str(public)]) == 0
    assert "audit chain OK: 5 records, all anchored" in capsys.readouterr().out
    assert not (data_dir / "keys.json").exists()
    assert not (data_dir / "audit-signing-key.pem").exists()
    # Without any key the checkpoints cannot be checked: that is BROKEN, not OK.
    assert main(["audit", "verify"]) == 1
    assert "no verification key is configured" in capsys.readouterr().err


def test_checkpoints_signed_with_another_key_are_rejected(
    data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # An attacker with the database and the keyring (not the signing key file) cuts the tail and re-anchors.
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from service.audit import sign_checkpoint

    with sqlite3.connect(data_dir / "carecanvas.db") as connection:
        connection.execute("DROP TRIGGER audit_records_no_delete")
        connection.execute("DELETE FROM audit_records WHERE seq >= 4")
        (head,) = connection.execute("SELECT hash FROM audit_records WHERE seq = 3").fetchone()
    forged = sign_checkpoint(
        Ed25519PrivateKey.generate(), seq=3, head_hash=head, time="2026-12-01T00:00:00.000000Z"
    )
    with _checkpoints(data_dir).open("a") as handle:
        handle.write(forged.to_json() + "\n")
    assert main(["audit", "verify"]) == 1
    err = capsys.readouterr().err
    assert "checkpoint BROKEN line 2: checkpoint at seq 3 has an invalid signature" in err
    assert "records were deleted from the tail" in err


def test_a_missing_signing_key_beside_existing_data_is_a_hard_error(
    data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = data_dir / "audit-signing-key.pem"
    assert key.stat().st_mode & 0o077 == 0  # made on the first start, readable by its owner only
    key.unlink()
    assert main(["audit", "export"]) == 2
    assert "audit signing key file" in capsys.readouterr().err
    assert not key.exists()
    with pytest.raises(SigningKeyError, match="already holds data"):
        asyncio.run(_write_records(Settings(data_dir=data_dir), 1))


def test_keygen_makes_a_key_once_and_prints_its_public_half(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    key = tmp_path / "secrets" / "signing.pem"
    monkeypatch.setenv("CARECANVAS_AUDIT_SIGNING_KEY_FILE", str(key))
    public = tmp_path / "public.pem"
    assert main(["audit", "keygen", "--public-out", str(public)]) == 0
    printed = capsys.readouterr().out
    assert printed == public.read_text()
    assert key.stat().st_mode & 0o777 == 0o600
    assert main(["audit", "keygen"]) == 1
    assert "refusing to overwrite" in capsys.readouterr().err
    assert main(["audit", "public-key"]) == 0
    assert capsys.readouterr().out == printed
    # A configured key file is never made by a start: a missing one is an error with what to do.
    key.unlink()
    with pytest.raises(SigningKeyError, match="carecanvas audit keygen"):
        open_audit_signing_key(Settings(data_dir=tmp_path, audit_signing_key_file=key))


def test_verify_without_a_database_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CARECANVAS_DATA_DIR", str(tmp_path))
    assert main(["audit", "verify"]) == 2
    assert "no database at" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
