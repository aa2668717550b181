"""The sandbox FHIR server keeps its resources in a state file across restarts (the demo's data dir)."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from sandbox.run import SandboxEHR

pytestmark = pytest.mark.slow

NOTE = {
    "resourceType": "Basic",
    "code": {"text": "kept across restarts"},
    "subject": {"reference": "Patient/pat-1"},
}


def _write(ehr: SandboxEHR) -> str:
    created = httpx.post(
        f"{ehr.fhir_base}/Basic",
        json=NOTE,
        headers={"Authorization": f"Bearer {ehr.mint_token()}", "Content-Type": "application/fhir+json"},
        timeout=30,
    )
    assert created.status_code == 201, created.text
    return str(created.json()["id"])


def _read(ehr: SandboxEHR, path: str) -> httpx.Response:
    return httpx.get(
        f"{ehr.fhir_base}/{path}", headers={"Authorization": f"Bearer {ehr.mint_token()}"}, timeout=30
    )


def test_resources_survive_a_restart_with_a_state_file_and_not_without(tmp_path: Path) -> None:
    state = tmp_path / "sandbox-fhir.json"
    with SandboxEHR(fhir_state_file=state) as ehr:
        assert state.exists()  # the seed is written at first start
        note_id = _write(ehr)
        saved = json.loads(state.read_text(encoding="utf-8"))
        assert saved["type"] == "collection"
        assert {"Basic", "Patient"} <= {entry["resource"]["resourceType"] for entry in saved["entry"]}
    assert not list(tmp_path.glob("*.partial"))  # written by rename, never left half done
    with SandboxEHR(fhir_state_file=state) as ehr:
        kept = _read(ehr, f"Basic/{note_id}")
        assert kept.status_code == 200
        assert kept.json()["code"]["text"] == "kept across restarts"
        assert _read(ehr, "Patient/pat-1").status_code == 200  # the seed data is there too
        ehr.fhir.reset()  # an explicit reset goes back to the seed, and the file follows
        assert _read(ehr, f"Basic/{note_id}").status_code == 404
    with SandboxEHR(fhir_state_file=state) as ehr:
        assert _read(ehr, f"Basic/{note_id}").status_code == 404
    with SandboxEHR() as ehr:  # no state file: every start is the seed
        assert _read(ehr, f"Basic/{note_id}").status_code == 404
