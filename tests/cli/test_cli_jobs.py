"""`carecanvas jobs list [--quarantined] [--json]`: attempts, crashes and reasons for operators, no spec."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest
from sqlalchemy import select, update

from service.cli import main
from service.crypto import Keyring
from service.crypto.keyring import new_key_material
from service.db.models import Job
from service.jobs import JobQueue
from service.settings import Settings
from service.stores import open_database


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for key in list(os.environ):
        if key.startswith("CARECANVAS_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("CARECANVAS_DATA_DIR", str(tmp_path / "data"))
    return tmp_path / "data"


async def one_good_one_poison() -> list[str]:
    """A running job and one quarantined at claim because its spec cannot be decrypted."""
    engine, sessionmaker = await open_database(Settings())
    try:
        queue = JobQueue(sessionmaker, Keyring(new_key_material()))
        ids = []
        for seed in range(2):
            async with sessionmaker() as db, db.begin():
                spec = {"prompt": "Maria's knee", "seed": seed}
                ids.append(
                    await queue.enqueue(db, kind="illustration", bucket="b", spec=spec, session_id_hash=None)
                )
        async with sessionmaker() as db, db.begin():
            stolen = (await db.execute(select(Job.spec).where(Job.id == ids[0]))).scalar_one()
            await db.execute(update(Job).where(Job.id == ids[1]).values(spec=stolen))
        assert [job.id for job in await queue.claim_batch(worker_id="w", max_jobs=8)] == [ids[0]]
    finally:
        await engine.dispose()
    return ids


def test_jobs_list_shows_the_quarantined_job_and_why(data_dir, capsys) -> None:
    ids = asyncio.run(one_good_one_poison())

    assert main(["jobs", "list", "--quarantined"]) == 0
    out = capsys.readouterr().out
    assert ids[1] in out
    assert ids[0] not in out
    assert "spec unreadable: DecryptionError" in out
    assert "1/3" in out
    assert main(["jobs", "list", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {row["id"]: row["status"] for row in rows} == {ids[0]: "running", ids[1]: "quarantined"}
    assert all("Maria" not in json.dumps(row) for row in rows)  # the spec is never shown
    assert main(["jobs", "list", "--status", "succeeded"]) == 0
    assert "no succeeded jobs" in capsys.readouterr().out
