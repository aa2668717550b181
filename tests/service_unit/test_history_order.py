"""The workspace's list of saved documents is newest first by the instant the EHR wrote, not by the minute it
shows: two documents saved in the same minute came back oldest first (the search's order)."""

from __future__ import annotations

from service.documents import history_from_search

SYSTEM = "urn:carecanvas:document"


def document(doc_id: str, date: str) -> dict:
    return {
        "resourceType": "DocumentReference",
        "id": doc_id,
        "status": "current",
        "date": date,
        "identifier": [{"system": SYSTEM, "value": f"id-{doc_id}"}],
    }


def test_two_documents_of_one_minute_are_listed_newest_first() -> None:
    found = [
        document("older", "2026-12-01T10:15:01.120000+00:00"),
        document("newer", "2026-12-01T10:15:40.900000+00:00"),
        document("yesterday", "2026-11-30T23:59:59Z"),
    ]
    entries = history_from_search(found, identifier_system=SYSTEM, local={})
    assert [entry.fhir_document_id for entry in entries] == ["newer", "older", "yesterday"]
    assert entries[0].time == "10:15"


def test_offsets_are_compared_as_instants_and_an_unreadable_date_goes_last() -> None:
    found = [
        document("bad", "not a date"),
        document("utc", "2026-12-01T10:00:00Z"),
        document("plus-two", "2026-12-01T11:30:00+02:00"),  # 09:30 UTC: earlier than "utc"
    ]
    entries = history_from_search(found, identifier_system=SYSTEM, local={})
    assert [entry.fhir_document_id for entry in entries] == ["utc", "plus-two", "bad"]
