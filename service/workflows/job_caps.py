"""Caps on unfinished (queued or running) jobs per session and per user, checked where a job is queued.

Checked in the transaction that queues, which is rolled back on the refusal, so a request that would
pass the cap queues nothing at all (a portrait's variants come all together or not).
Two requests of one session racing each other may both pass: the cap is exact up to that overlap.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from sqlalchemy import false, func, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from service.db.models import Job
from service.jobs import JobStatus

UNFINISHED = (JobStatus.QUEUED.value, JobStatus.RUNNING.value)


class TooManyJobsError(RuntimeError):
    """This session (or this user, over all their sessions) already has as many unfinished jobs as allowed.

    Not a WorkflowError on purpose: it passes through `workflow_errors` untouched and the faces' handler
    (service.web.errors) answers 429 with code `too_many_jobs`; the request's transaction, holding the
    jobs flushed so far, is rolled back when its database session closes.
    """

    @property
    def message(self) -> str:
        return str(self)


@dataclass(frozen=True)
class JobOwner:
    """Who a job is queued for: the session (or bearer caller) and, where known, the user's keyed digest."""

    session_id_hash: str
    owner_key: str | None
    per_session: int
    per_user: int


async def unfinished_jobs(
    db: AsyncSession, *, session_id_hash: str | None = None, owner_key: str | None = None
) -> int:
    query = select(func.count()).select_from(Job).where(Job.status.in_(UNFINISHED))
    if session_id_hash is not None:
        query = query.where(Job.session_id_hash == session_id_hash)
    if owner_key is not None:
        query = query.where(Job.owner_key == owner_key)
    return int((await db.execute(query)).scalar_one())


async def check_room(db: AsyncSession, owner: JobOwner) -> None:
    """Raise TooManyJobsError unless one more job fits under both caps (jobs flushed so far count).

    One statement for both counts: it is the queuing transaction's first, holding SQLite's writer lock.
    """
    mine = Job.session_id_hash == owner.session_id_hash
    users = Job.owner_key == owner.owner_key if owner.owner_key is not None else false()
    query = select(func.count().filter(mine), func.count().filter(users)).where(
        Job.status.in_(UNFINISHED), or_(mine, users)
    )
    in_session, for_user = (await db.execute(query)).one()
    if in_session >= owner.per_session:
        raise TooManyJobsError(_message(owner.per_session, everywhere=False))
    if owner.owner_key is not None and for_user >= owner.per_user:
        raise TooManyJobsError(_message(owner.per_user, everywhere=True))


@dataclass
class Rooms:
    """Unfinished jobs per session and per user for a group of owners, counted once, then admitted in turn."""

    per_session: Counter[str] = field(default_factory=Counter)
    per_user: Counter[str] = field(default_factory=Counter)

    def admit(self, owner: JobOwner) -> TooManyJobsError | None:
        """Count one more job for `owner`, or the refusal `check_room` would raise (nothing counted)."""
        if self.per_session[owner.session_id_hash] >= owner.per_session:
            return TooManyJobsError(_message(owner.per_session, everywhere=False))
        if owner.owner_key is not None and self.per_user[owner.owner_key] >= owner.per_user:
            return TooManyJobsError(_message(owner.per_user, everywhere=True))
        self.per_session[owner.session_id_hash] += 1
        if owner.owner_key is not None:
            self.per_user[owner.owner_key] += 1
        return None


async def count_rooms(db: AsyncSession, owners: Sequence[JobOwner]) -> Rooms:
    """One statement for every owner's unfinished jobs (by session and by user), for `Rooms.admit`."""
    sessions = sorted({owner.session_id_hash for owner in owners})
    users = sorted({owner.owner_key for owner in owners if owner.owner_key is not None})
    mine = Job.session_id_hash.in_(sessions)
    theirs = Job.owner_key.in_(users) if users else false()
    query = (
        select(Job.session_id_hash, Job.owner_key, func.count())
        .where(Job.status.in_(UNFINISHED), or_(mine, theirs))
        .group_by(Job.session_id_hash, Job.owner_key)
    )
    rooms = Rooms()
    for session_id_hash, owner_key, count in (await db.execute(query)).all():
        if session_id_hash is not None:
            rooms.per_session[session_id_hash] += count
        if owner_key is not None:
            rooms.per_user[owner_key] += count
    return rooms


def _message(cap: int, *, everywhere: bool) -> str:
    where = " in all your open CareCanvas windows" if everywhere else ""
    return (
        f"You already have {cap} pictures waiting to be made{where}. "
        "Please wait for some of them to finish, then try again. Nothing new was added."
    )
