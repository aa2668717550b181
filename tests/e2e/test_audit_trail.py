"""A full clinician session over real HTTP, then its exported BALP AuditEvents, step by step."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import httpx
from harness import CONDITION, RunningApp, csrf_from, launch_session, wait_for_job

from sandbox.run import SandboxEHR
from service.audit import AuditEntry
from service.audit_export import ExportFormat, render
from service.documents import DraftContent, load_document

EDITED_CAPTION = "Insulin works like a key that lets sugar into your cells."
URN_SYSTEM = "urn:ietf:rfc:3986"


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def head_seq(app: RunningApp) -> int:
    async def head() -> int:
        async with app.services.sessionmaker() as db:
            return (await app.services.audit.head(db))[0]

    return app.call(head())


def entries_after(app: RunningApp, seq: int) -> list[AuditEntry]:
    async def entries() -> list[AuditEntry]:
        async with app.services.sessionmaker() as db:
            return await app.services.audit.entries(db, after_seq=seq, limit=1000)

    return app.call(entries())


def draft(app: RunningApp, job_id: str) -> tuple[str, DraftContent]:
    async def load() -> tuple[str, DraftContent]:
        async with app.services.sessionmaker() as db:
            document = await load_document(db, keyring=app.services.keyring, job_id=job_id)
            assert document is not None
            return document.id, document.content

    return app.call(load())


def generate(client: httpx.Client, csrf: str, condition_id: str) -> str:
    form = {"condition_id": condition_id, "style": "flat_vector", "language": "en", "csrf_token": csrf}
    created = client.post("/illustrations", data=form)
    assert created.status_code == 303, created.text
    job_id = created.headers["location"].rsplit("/", 1)[1]
    assert wait_for_job(client, job_id)["status"] == "succeeded"
    return job_id


def approve(client: httpx.Client, job_id: str, csrf: str, caption: str, alt_text: str) -> None:
    saved = client.post(
        f"/review/{job_id}/approve", data={"caption": caption, "alt_text": alt_text, "csrf_token": csrf}
    )
    assert saved.status_code == 200, saved.text


def written_id(app: RunningApp, job_id: str) -> str:
    async def load() -> str:
        async with app.services.sessionmaker() as db:
            document = await load_document(db, keyring=app.services.keyring, job_id=job_id)
            assert document is not None
            assert document.fhir_document_id
            return document.fhir_document_id

    return app.call(load())


def drive_session(app: RunningApp, ehr: SandboxEHR) -> dict[str, Any]:
    """Launch, workspace, generate, view, edit caption, approve, new version, approve, withdraw."""
    with launch_session(app.url, ehr, practitioner="prac-1", encounter="enc-1") as client:
        workspace = client.get("/app")
        assert workspace.status_code == 200
        csrf = csrf_from(workspace.text)
        condition_id = CONDITION.findall(workspace.text)[0]
        first_job = generate(client, csrf, condition_id)
        assert client.get(f"/review/{first_job}").status_code == 200
        assert client.get(f"/artifacts/{first_job}/png").status_code == 200
        first_draft_id, first = draft(app, first_job)
        approve(client, first_job, csrf, EDITED_CAPTION, first.alt_text)
        started = client.post(f"/documents/{first_job}/regenerate", data={"csrf_token": csrf})
        assert started.status_code == 303, started.text
        second_job = started.headers["location"].rsplit("/", 1)[1]
        assert wait_for_job(client, second_job)["status"] == "succeeded"
        assert client.get(f"/review/{second_job}").status_code == 200
        second_draft_id, second = draft(app, second_job)
        approve(client, second_job, csrf, second.caption, second.alt_text)
        withdrawn = client.post(
            f"/documents/{second_job}/retract", data={"csrf_token": csrf, "reason": "content-error"}
        )
        assert withdrawn.status_code == 200, withdrawn.text
    return {
        "condition": f"Condition/{condition_id}",
        "first_job": first_job,
        "second_job": second_job,
        "first_draft": first_draft_id,
        "second_draft": second_draft_id,
        "first": first,
        "second": second,
        "first_document": written_id(app, first_job),
        "second_document": written_id(app, second_job),
    }


def targets(event: dict[str, Any]) -> list[str]:
    """The acted-on entities' references or identifiers, as exported."""
    found = []
    for entity in event.get("entity", []):
        if entity.get("description") != "target":
            continue
        what = entity["what"]
        found.append(what.get("reference") or what["identifier"]["value"])
    return found


def sources(event: dict[str, Any]) -> list[str]:
    return [
        entity["what"].get("reference") or entity["what"]["identifier"]["value"]
        for entity in event.get("entity", [])
        if entity.get("description") == "source"
    ]


def test_a_clinician_session_exports_truthful_audit_events(
    carecanvas: RunningApp, sandbox: SandboxEHR
) -> None:
    start = head_seq(carecanvas)
    facts = drive_session(carecanvas, sandbox)
    entries = entries_after(carecanvas, start)
    events = [
        json.loads(line)
        for line in render(entries, ExportFormat.NDJSON, carecanvas.services.settings).splitlines()
    ]
    by_action: dict[str, list[tuple[AuditEntry, dict[str, Any]]]] = {}
    for entry, event in zip(entries, events, strict=True):
        by_action.setdefault(entry.action, []).append((entry, event))
    base = sandbox.fhir_base.rstrip("/")
    condition = f"{base}/{facts['condition']}"

    # Every record names the same practitioner the same way, canonical (the launch's fhirUser is a URL).
    assert {entry.actor for entry in entries} == {"Practitioner/prac-1"}
    assert all(entry.role == "clinician" for entry in entries if entry.action != "launch")
    assert all(entry.request_id for entry in entries)
    assert all(entry.description for entry in entries)
    users = {agent["who"]["reference"] for event in events for agent in event["agent"] if agent["requestor"]}
    assert users == {f"{base}/Practitioner/prac-1"}

    # Launch: a Login with the launch's encounter in its detail.
    [(launch, launch_event)] = by_action["launch"]
    assert launch_event["subtype"][0]["code"] == "110122"
    assert launch.detail["encounter"] == "enc-1"

    # Workspace: reads of the patient and encounter by id, the conditions as a query.
    reads = [str(entry.resource) for entry, _ in by_action["fhir.read"]]
    assert sorted(reads) == ["Encounter/enc-1", "Patient/pat-1", "Practitioner/prac-1"]
    # The clinician's own record, read for their name, is not a touch of the patient's record.
    [own] = [
        (entry, event) for entry, event in by_action["fhir.read"] if entry.resource == "Practitioner/prac-1"
    ]
    assert own[0].patient is None
    assert own[1]["meta"]["profile"][0].endswith("IHE.BasicAudit.Read")  # not PatientRead
    by_action["fhir.read"] = [item for item in by_action["fhir.read"] if item[0] is not own[0]]
    read_entities = {
        e["what"].get("reference") for _, event in by_action["fhir.read"] for e in event["entity"]
    }
    assert {f"{base}/Patient/pat-1", f"{base}/Encounter/enc-1"} <= read_entities
    assert all(event["meta"]["profile"][0].endswith("PatientRead") for _, event in by_action["fhir.read"])
    [(_, conditions)] = by_action["conditions.read"]
    assert (conditions["action"], conditions["subtype"][0]["code"]) == ("E", "search")
    assert conditions["meta"]["profile"][0].endswith("PatientQuery")

    # Generation: an execute of OUR job, with the Condition as its source; twice (first and new version).
    generated = [event for _, event in by_action["generate"]]
    assert [targets(event) for event in generated] == [
        [f"urn:carecanvas:job:{facts['first_job']}"],
        [f"urn:carecanvas:job:{facts['second_job']}"],
    ]
    for event in generated:
        assert (event["action"], event["subtype"][0]["code"]) == ("E", "generate")
        assert "meta" not in event  # not a BALP PatientCreate: nothing was created in the EHR
        assert sources(event) == [condition]
        job_entity = next(e for e in event["entity"] if e.get("description") == "target")
        assert job_entity["what"]["identifier"]["system"] == URN_SYSTEM
    assert generated[0]["outcomeDesc"] == (
        f"Practitioner/prac-1 asked for an education picture about {facts['condition']}"
    )

    # Nothing ever creates or updates the Condition; no CareCanvas object is dressed up as an EHR URL.
    for event in events:
        if event["action"] in "CU":
            assert all("/Condition/" not in reference for reference in targets(event)), event
        for entity in event.get("entity", []):
            reference = entity["what"].get("reference", "")
            assert not any(word in reference for word in ("/Image", "/Preview", "DocumentDraft", "/Handout"))

    # Viewing: the draft and the image by their CareCanvas identifiers.
    viewed = [targets(event)[0] for _, event in by_action["view"]]
    assert f"urn:carecanvas:draft:{facts['first_draft']}" in viewed
    assert f"urn:carecanvas:image:{facts['first_job']}" in viewed
    assert f"urn:carecanvas:draft:{facts['second_draft']}" in viewed

    # The edited caption: an edit record, then approvals with the hashes of what was approved.
    [(edit, edit_event)] = by_action["draft.edit"]
    assert targets(edit_event) == [f"urn:carecanvas:draft:{facts['first_draft']}"]
    assert edit.detail["caption_edited"] is True
    [(first_approval, first_event), (second_approval, second_event)] = by_action["approve"]
    assert first_approval.detail["caption_sha256"] == sha256(EDITED_CAPTION)
    assert first_approval.detail["alt_text_sha256"] == sha256(facts["first"].alt_text)
    assert (first_approval.detail["edited"], first_approval.detail["alt_text_edited"]) == (True, False)
    assert second_approval.detail["caption_sha256"] == sha256(facts["second"].caption)
    # The new version started from the first one's edited caption, so it is approved with edited text.
    assert second_approval.detail["caption_sha256"] == sha256(EDITED_CAPTION)
    assert second_approval.detail["edited"] is True
    assert "with edited text" in (second_approval.description or "")
    for event in (first_event, second_event):
        assert (event["action"], event["subtype"][0]["code"]) == ("U", "approve")
        assert all("/Condition/" not in reference for reference in targets(event))
    approved = {d["type"]: d["valueString"] for d in targets_detail(first_event)}
    assert approved["caption_sha256"] == sha256(EDITED_CAPTION)
    assert approved["edited"] == "true"

    # Write-back: a create of each NEW DocumentReference; supersede: an update of the OLD one.
    written = [event for _, event in by_action["write_back"]]
    assert [targets(event) for event in written] == [
        [
            f"{base}/DocumentReference/{facts['first_document']}",
            f"urn:carecanvas:draft:{facts['first_draft']}",
        ],
        [
            f"{base}/DocumentReference/{facts['second_document']}",
            f"urn:carecanvas:draft:{facts['second_draft']}",
        ],
    ]
    assert facts["first_document"] != facts["second_document"]
    for event in written:
        assert (event["action"], event["subtype"][0]["code"]) == ("C", "create")
        assert event["meta"]["profile"][0].endswith("PatientCreate")
    [(_, superseded)] = by_action["supersede"]
    assert targets(superseded) == [f"{base}/DocumentReference/{facts['first_document']}"]
    assert (superseded["action"], superseded["subtype"][0]["code"]) == ("U", "update")

    # Withdraw: an update of the withdrawn DocumentReference.
    [(_, retracted)] = by_action["retract"]
    assert targets(retracted) == [f"{base}/DocumentReference/{facts['second_document']}"]
    assert (retracted["action"], retracted["subtype"][0]["code"]) == ("U", "update")

    # No free text in any description: neither caption ever appears there.
    for entry in entries:
        assert EDITED_CAPTION not in (entry.description or "")
        assert facts["second"].caption not in (entry.description or "")


def targets_detail(event: dict[str, Any]) -> list[dict[str, str]]:
    entity = next(e for e in event["entity"] if e.get("description") == "target")
    return entity.get("detail", [])
