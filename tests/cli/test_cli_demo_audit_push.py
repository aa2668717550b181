"""`carecanvas audit push --ehr sandbox` from a second terminal while `carecanvas demo` runs (it used to say
"no EHR named 'sandbox'": the demo's registration lived only in the demo's process)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from service.demo_ehr import DEMO_EHRS_FILE, with_demo_backend, with_demo_ehrs, write_demo_ehrs
from service.settings import EhrSettings, Settings
from service.stores import open_audit_log, open_database, open_keyring


async def _append_sandbox_records(data_dir: Path, count: int) -> None:
    settings = Settings(data_dir=data_dir)
    audit = open_audit_log(settings, keyring=open_keyring(settings))
    engine, sessionmaker = await open_database(settings)
    try:
        for index in range(count):
            async with sessionmaker() as db, db.begin():
                await audit.append(
                    db,
                    action="fhir.read",
                    outcome="success",
                    actor="Practitioner/prac-1",
                    patient="pat-1",
                    ehr="sandbox",
                    resource="Condition/cond-1",
                    request_id=f"req-{index}",
                )
    finally:
        await engine.dispose()


def _cli(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CARECANVAS_DATA_DIR": str(data_dir), "HF_HUB_OFFLINE": "1"}
    for name in ("CARECANVAS_EHRS", "CARECANVAS_EHRS_FILE"):
        env.pop(name, None)
    return subprocess.run(
        [sys.executable, "-m", "service.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
        check=False,
    )


@pytest.mark.slow
def test_audit_push_reaches_the_running_demos_sandbox(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    env = {**os.environ, "CARECANVAS_DATA_DIR": str(data_dir), "HF_HUB_OFFLINE": "1"}
    demo = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "demo", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,
    )
    output: list[str] = []
    try:
        assert demo.stdout is not None
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            line = demo.stdout.readline()
            if not line:
                break
            output.append(line)
            if "worker started" in line:
                break
        assert (data_dir / DEMO_EHRS_FILE).exists(), "".join(output)
        asyncio.run(_append_sandbox_records(data_dir, 2))

        first = _cli(data_dir, "audit", "push", "--ehr", "sandbox")
        again = _cli(data_dir, "audit", "push", "--ehr", "sandbox")
    finally:
        os.killpg(demo.pid, signal.SIGINT)
        try:
            demo.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(demo.pid, signal.SIGKILL)
            raise
    assert first.returncode == 0, first.stderr
    assert "pushed 2 AuditEvents to EHR 'sandbox'" in first.stdout
    assert again.returncode == 0, again.stderr
    assert "pushed 0 AuditEvents" in again.stdout
    # The registration names the key file, never key material.
    registration = (data_dir / DEMO_EHRS_FILE).read_text(encoding="utf-8")
    assert "PRIVATE KEY" not in registration
    assert (data_dir / "demo-backend-key.pem").stat().st_mode & 0o077 == 0


def test_the_demos_registration_is_used_only_where_nothing_configures_ehrs(tmp_path: Path) -> None:
    registration = EhrSettings(name="sandbox", iss="http://127.0.0.1:1/fhir", client_id="c")
    (tmp_path / DEMO_EHRS_FILE).write_text(json.dumps([registration.model_dump(mode="json")]))

    plain = with_demo_ehrs(Settings(data_dir=tmp_path))
    assert [ehr.name for ehr in plain.registered_ehrs()] == ["sandbox"]

    configured = Settings(data_dir=tmp_path, ehrs=[registration.model_copy(update={"name": "hospital"})])
    assert [ehr.name for ehr in with_demo_ehrs(configured).registered_ehrs()] == ["hospital"]

    (tmp_path / DEMO_EHRS_FILE).unlink()
    assert with_demo_ehrs(Settings(data_dir=tmp_path)).registered_ehrs() == []


def test_push_without_the_demo_still_names_the_missing_ehr(tmp_path: Path) -> None:
    asyncio.run(_append_sandbox_records(tmp_path, 1))
    result = _cli(tmp_path, "audit", "push", "--ehr", "sandbox")
    assert result.returncode == 1
    assert "no EHR named 'sandbox'" in result.stderr
    assert "Traceback" not in result.stderr


def test_push_after_the_demo_stopped_is_a_clear_failure(tmp_path: Path) -> None:
    asyncio.run(_append_sandbox_records(tmp_path, 1))
    # What a stopped demo leaves behind: its registration, pointing at a sandbox that is gone.
    settings, _ = with_demo_backend(
        Settings(
            data_dir=tmp_path,
            ehrs=[EhrSettings(name="sandbox", iss="http://127.0.0.1:9/fhir", client_id="carecanvas-demo")],
        )
    )
    write_demo_ehrs(settings)
    result = _cli(tmp_path, "audit", "push", "--ehr", "sandbox")
    assert result.returncode == 1
    assert "audit push failed: backend-services token from EHR 'sandbox' failed" in result.stderr
    assert "Traceback" not in result.stderr
