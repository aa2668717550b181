"""Draft content is a typed model: old stored drafts load with defaults, new ones are written as the model."""

from __future__ import annotations

import hashlib
import json

import pytest
from pydantic import ValidationError
from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from service.crypto import Keyring, aad_for
from service.crypto.keyring import new_key_material
from service.db.models import Document
from service.documents import DraftContent, Replaces, SafetyCheck, create_draft, load_document, save_content
from service.generation.engine import ImageRequest, bucket_key
from service.generation.tiny import TINY_MODEL_NAME
from service.jobs import JobKind, JobQueue
from service.workflows.approve import ApprovedText

# A draft as the code before DraftContent stored it: a plain dict, no generated caption, replaces as a dict.
OLD_DRAFT = {
    "title": "How insulin helps",
    "caption": "Insulin is a key.",
    "alt_text": "A key and a cell.",
    "caption_grade": 3.1,
    "language": "en",
    "topic_id": "diabetes",
    "style": "flat_vector",
    "condition_id": "cond-1",
    "condition_text": "Diabetes",
    "patient_id": "pat-1",
    "encounter_id": "enc-1",
    "prompt": "a key",
    "negative_prompt": None,
    "model": TINY_MODEL_NAME,
    "seed": 7,
    "replaces": {"fhir_document_id": "doc-1", "job_id": "job-0"},
    "safety": {"checked": True, "flagged": False, "reason": None, "classifier": "blank-image"},
    "included_image": False,
    "write_notes": ["only the PDF"],
}


async def _job(sessionmaker: async_sessionmaker[AsyncSession], keyring: Keyring) -> str:
    queue = JobQueue(sessionmaker, keyring)
    bucket = bucket_key(ImageRequest("b", "p", None, 0, 64, 64, 2, 1.0), TINY_MODEL_NAME)
    spec = {"model": TINY_MODEL_NAME, "prompt": "p", "seed": 1, "width": 64, "height": 64}
    async with sessionmaker() as db, db.begin():
        return await queue.enqueue(db, kind="illustration", bucket=bucket, spec=spec, session_id_hash=None)


async def test_an_old_stored_draft_loads_typed_and_is_saved_back_as_the_model(
    sessionmaker: async_sessionmaker[AsyncSession],
) -> None:
    keyring = Keyring(new_key_material())
    job_id = await _job(sessionmaker, keyring)
    async with sessionmaker() as db, db.begin():
        document_id = await create_draft(
            db, keyring=keyring, job_id=job_id, ehr_name="sandbox", content=DraftContent(title="x")
        )
        old = keyring.encrypt(
            json.dumps(OLD_DRAFT).encode(), aad=aad_for("documents", document_id, "content")
        )
        await db.execute(update(Document).where(Document.id == document_id).values(content=old))
    async with sessionmaker() as db:
        document = await load_document(db, keyring=keyring, job_id=job_id)
        assert document is not None
        content = document.content
        assert content.kind is JobKind.ILLUSTRATION  # missing in old drafts: the default
        assert content.replaces == Replaces(fhir_document_id="doc-1", job_id="job-0")
        assert content.safety == SafetyCheck(checked=True, classifier="blank-image")
        assert content.write_notes == ("only the PDF",)
        assert content.source_reference == "Condition/cond-1"
        # No generated text stored: what the draft holds counts as generated.
        assert (content.original_caption, content.original_alt_text) == (
            "Insulin is a key.",
            "A key and a cell.",
        )
        await save_content(
            db, keyring=keyring, document=document, content=content.model_copy(update={"caption": "New."})
        )
        await db.commit()
    async with sessionmaker() as db:
        row = await db.get(Document, document_id)
        assert row is not None
        stored = row.content
        decoded = json.loads(keyring.decrypt(stored, aad=aad_for("documents", document_id, "content")))
    assert set(decoded) == set(DraftContent.model_fields)  # the whole model, never a partial dict
    assert decoded["caption"] == "New."


def test_draft_content_refuses_unknown_fields_and_wrong_types() -> None:
    with pytest.raises(ValidationError):
        DraftContent.model_validate({**OLD_DRAFT, "surprise": 1})
    with pytest.raises(ValidationError):
        DraftContent.model_validate({**OLD_DRAFT, "seed": "seven"})


def test_approved_text_tells_an_edit_from_the_generated_draft() -> None:
    generated = DraftContent.generated(caption="Generated caption.", alt_text="Generated alt.")
    assert (generated.generated_caption, generated.generated_alt_text) == (
        "Generated caption.",
        "Generated alt.",
    )
    unedited = ApprovedText.of(generated)
    assert not unedited.edited
    edited = ApprovedText.of(generated.model_copy(update={"caption": "Clinician's caption."}))
    assert (edited.caption_edited, edited.alt_text_edited, edited.edited) == (True, False, True)
    assert edited.caption_sha256 == hashlib.sha256(b"Clinician's caption.").hexdigest()
