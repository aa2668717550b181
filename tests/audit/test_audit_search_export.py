"""CSV and BALP export of a filtered search (SQLite and PostgreSQL): hashes, safe cells, the exact set."""

from __future__ import annotations

import csv
import io
import json
from datetime import UTC, datetime

import pytest
from fhir.resources.R4B.bundle import Bundle
from sqlalchemy import select

from service.audit import AuditLog
from service.audit.export import (
    csv_columns,
    entries_to_balp_bundle,
    entries_to_balp_ndjson,
    entries_to_csv,
    safe_cell,
)
from service.audit.search import AuditQuery, export_entries
from service.crypto import Keyring
from service.crypto.keyring import new_key_material
from service.db.models import AuditRecord

FHIR_BASES = {"sandbox": "http://127.0.0.1:9/fhir", "other": "https://other.example/fhir/R4"}


@pytest.fixture
def audit() -> AuditLog:
    return AuditLog(Keyring(new_key_material()))


@pytest.fixture
async def filled(audit, sessionmaker):
    rows = [
        ("Practitioner/prac-1", "pat-1", "sandbox", "Condition/cond-1", {"count": 2}),
        ('=HYPERLINK("http://evil")', "pat-2", "sandbox", "+SUM(A1:A9)", {"note": "@import"}),
        ("Practitioner/prac-2", "pat-1", "other", "-2+3", {}),
        ("Practitioner/prac-1", "pat-3", "sandbox", "Condition/cond-3", {}),
    ]
    for actor, patient, ehr, resource, detail in rows:
        async with sessionmaker() as db, db.begin():
            await audit.append(
                db,
                action="fhir.read",
                outcome="success",
                actor=actor,
                patient=patient,
                ehr=ehr,
                resource=resource,
                request_id="req-1",
                detail=detail,
            )
    return audit


def parse(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


async def test_csv_has_one_row_per_record_with_seq_and_stored_hash(filled, sessionmaker):
    async with sessionmaker() as db:
        entries = await export_entries(db, filled, AuditQuery(patient="pat-1"))
        stored = {row.seq: row.hash for row in (await db.execute(select(AuditRecord))).scalars()}
    rows = parse(entries_to_csv(entries))
    assert [row["seq"] for row in rows] == ["1", "3"]
    assert all(row["hash"] == stored[int(row["seq"])] for row in rows)
    assert rows[0]["patient"] == "pat-1"
    assert rows[0]["actor"] == "Practitioner/prac-1"
    assert rows[0]["recorded_at"].endswith("Z")
    assert json.loads(rows[0]["detail"]) == {"count": 2}
    assert list(rows[0])[:2] == ["seq", "recorded_at"]
    assert list(rows[0])[-1] == "hash"


async def test_csv_cells_that_a_spreadsheet_would_run_are_prefixed(filled, sessionmaker):
    async with sessionmaker() as db:
        entries = await export_entries(db, filled, AuditQuery())
    rows = parse(entries_to_csv(entries))
    assert rows[1]["actor"] == '\'=HYPERLINK("http://evil")'
    assert rows[1]["resource"] == "'+SUM(A1:A9)"
    assert rows[2]["resource"] == "'-2+3"
    # Safe cells are untouched; every cell of every row is either safe or prefixed.
    assert rows[0]["resource"] == "Condition/cond-1"
    for row in rows:
        assert not any(value.startswith(("=", "+", "-", "@", "\t", "\r")) for value in row.values())
    assert safe_cell("@cmd") == "'@cmd"
    assert safe_cell("\t=1") == "'\t=1"
    assert safe_cell(None) == ""
    assert safe_cell(datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)) == "2026-01-02T03:04:05.000000Z"


def test_csv_columns_cover_every_entry_field():
    from dataclasses import fields

    from service.audit import AuditEntry

    assert sorted(csv_columns()) == sorted(f.name for f in fields(AuditEntry))


async def test_balp_ndjson_is_exactly_the_filtered_set_with_each_records_own_ehr(filled, sessionmaker):
    async with sessionmaker() as db:
        entries = await export_entries(db, filled, AuditQuery(patient="Patient/pat-1"))
    lines = entries_to_balp_ndjson(entries, site="site-x", fhir_bases=FHIR_BASES).splitlines()
    events = [json.loads(line) for line in lines]
    assert [event["id"] for event in events] == ["carecanvas-audit-1", "carecanvas-audit-3"]
    patients = [
        entity["what"]["reference"]
        for event in events
        for entity in event["entity"]
        if entity["what"].get("reference", "").rsplit("/", 2)[-2:-1] == ["Patient"]
    ]
    # Record 3 belongs to the "other" EHR: its references use that EHR's base, not the first one's.
    assert patients == [
        "http://127.0.0.1:9/fhir/Patient/pat-1",
        "https://other.example/fhir/R4/Patient/pat-1",
    ]
    assert all(event["source"]["site"] == "site-x" for event in events)


async def test_balp_bundle_is_a_valid_collection_of_the_filtered_set(filled, sessionmaker):
    async with sessionmaker() as db:
        entries = await export_entries(db, filled, AuditQuery(actor="Practitioner/prac-1"))
    bundle = entries_to_balp_bundle(entries, site="site-x", fhir_bases=FHIR_BASES)
    Bundle.model_validate(bundle)
    assert bundle["type"] == "collection"
    assert [entry["resource"]["id"] for entry in bundle["entry"]] == [
        "carecanvas-audit-1",
        "carecanvas-audit-4",
    ]
    empty = entries_to_balp_bundle([], site="site-x")
    Bundle.model_validate(empty)
    assert "entry" not in empty
