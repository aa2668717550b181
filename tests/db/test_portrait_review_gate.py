"""The reviewer's approval gates a portrait's write-back (issue 13), on SQLite and PostgreSQL alike."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from service.crypto import Keyring, LocalKeyFileProvider, aad_for
from service.db.models import Job, PortraitReview
from service.jobs import JobKind
from service.settings import Settings, StaffOidcSettings
from service.workflows.errors import PortraitNotReviewedError, Reason
from service.workflows.reviewer import (
    ReviewStatus,
    approving_reviewer,
    contained_reviewer,
    provenance_agent,
    require_review,
    reviewers_configured,
    words_locked,
)

STAFF_ROSA = "urn:carecanvas:staff:staff-rosa"
OFF = Settings()
ON_BY_LIST = Settings(portrait_reviewers={"Practitioner/prac-3": "artist"})
ON_BY_STAFF = Settings(
    staff_oidc=StaffOidcSettings(
        issuer="https://idp.example", client_id="cc", reviewer_roles={"portrait-artists": "artist"}
    )
)


@pytest.fixture
def keyring(tmp_path: Path) -> Keyring:
    return Keyring.from_provider(LocalKeyFileProvider.generate(tmp_path / "keys.json"))


async def _job(db: AsyncSession) -> str:
    job_id = str(uuid.uuid4())
    db.add(Job(id=job_id, kind="portrait", bucket="test", spec=b"sealed"))
    await db.flush()
    return job_id


async def _review(
    db: AsyncSession,
    keyring: Keyring,
    job_id: str,
    status: ReviewStatus,
    *,
    decided_by: str | None = None,
    display: str | None = None,
) -> None:
    details = json.dumps({"patient_id": "pat-1", "patient_name": "Maria", "decided_display": display})
    db.add(
        PortraitReview(
            job_id=job_id,
            ehr_name="sandbox",
            status=status.value,
            details=keyring.encrypt(details.encode(), aad=aad_for("portrait_reviews", job_id, "details")),
            requested_by="Practitioner/prac-1",
            decided_by=decided_by,
            decided_role="artist" if decided_by else None,
        )
    )
    await db.commit()


def test_reviewers_are_configured_by_the_list_or_by_staff_roles() -> None:
    assert not reviewers_configured(OFF)
    assert reviewers_configured(ON_BY_LIST)
    assert reviewers_configured(ON_BY_STAFF)
    # Staff sign-in without reviewer roles (the default) gates nothing.
    staff_only = Settings(staff_oidc=StaffOidcSettings(issuer="https://idp.example", client_id="cc"))
    assert not reviewers_configured(staff_only)


@pytest.mark.parametrize("settings", [ON_BY_LIST, ON_BY_STAFF], ids=["list", "staff-roles"])
async def test_an_unreviewed_portrait_is_refused_until_a_reviewer_approves(
    sessionmaker: async_sessionmaker[AsyncSession], keyring: Keyring, settings: Settings
) -> None:
    async with sessionmaker() as db:
        never_sent = await _job(db)
        waiting = await _job(db)
        sent_back = await _job(db)
        approved = await _job(db)
        await db.commit()
        await _review(db, keyring, waiting, ReviewStatus.WAITING)
        await _review(db, keyring, sent_back, ReviewStatus.SENT_BACK, decided_by="Practitioner/prac-3")
        await _review(db, keyring, approved, ReviewStatus.APPROVED, decided_by="Practitioner/prac-3")
        for job_id, status in ((never_sent, "not_sent"), (waiting, "waiting"), (sent_back, "sent_back")):
            with pytest.raises(PortraitNotReviewedError) as refused:
                await require_review(db, settings, job_id)
            assert refused.value.reason is Reason.PORTRAIT_NOT_REVIEWED
            assert refused.value.status == status
        await require_review(db, settings, approved)  # approved: free to write back


async def test_without_reviewers_nothing_is_gated(
    sessionmaker: async_sessionmaker[AsyncSession], keyring: Keyring
) -> None:
    async with sessionmaker() as db:
        never_sent = await _job(db)
        sent_back = await _job(db)
        await db.commit()
        await _review(db, keyring, sent_back, ReviewStatus.SENT_BACK, decided_by="Practitioner/prac-3")
        await require_review(db, OFF, never_sent)
        await require_review(db, OFF, sent_back)


async def test_a_staff_reviewer_is_named_in_the_provenance_by_identifier_and_name(
    sessionmaker: async_sessionmaker[AsyncSession], keyring: Keyring
) -> None:
    async with sessionmaker() as db:
        job_id = await _job(db)
        await db.commit()
        await _review(
            db, keyring, job_id, ReviewStatus.APPROVED, decided_by=STAFF_ROSA, display="Rosa Alvarez-Test"
        )
        reviewer = await approving_reviewer(db, job_id, keyring=keyring)
    assert reviewer is not None
    assert reviewer.is_staff
    assert reviewer.display == "Rosa Alvarez-Test"
    agent = provenance_agent(reviewer, None)
    assert agent["who"] == {"reference": "#staff-reviewer", "display": "Rosa Alvarez-Test"}
    assert contained_reviewer(reviewer) == {
        "resourceType": "Practitioner",
        "id": "staff-reviewer",
        "identifier": [{"system": "urn:carecanvas:staff", "value": "staff-rosa"}],
        "name": [{"text": "Rosa Alvarez-Test"}],
    }
    assert agent["role"] == [{"text": "portrait reviewer (artist)"}]


async def test_only_a_portrait_a_reviewer_approved_keeps_its_words(
    sessionmaker: async_sessionmaker[AsyncSession], keyring: Keyring
) -> None:
    async with sessionmaker() as db:
        never_sent, waiting, sent_back, approved = [await _job(db) for _ in range(4)]
        await db.commit()
        await _review(db, keyring, waiting, ReviewStatus.WAITING)
        await _review(db, keyring, sent_back, ReviewStatus.SENT_BACK, decided_by="Practitioner/prac-3")
        await _review(db, keyring, approved, ReviewStatus.APPROVED, decided_by="Practitioner/prac-3")
        assert await words_locked(db, approved, JobKind.PORTRAIT)
        for job_id in (never_sent, waiting, sent_back):
            assert not await words_locked(db, job_id, JobKind.PORTRAIT)
        assert not await words_locked(db, approved, JobKind.ILLUSTRATION)  # education pictures: never
