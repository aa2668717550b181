"""`carecanvas jobs list`: the queue as operators see it (status, attempts, crashes, reason), never a spec."""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any

from service.jobs import JobStatus, JobView


def add_jobs_parser(commands: Any) -> None:
    jobs = commands.add_parser("jobs", help="the job queue").add_subparsers(
        dest="jobs_command", required=True
    )
    listing = jobs.add_parser("list", help="newest jobs first, with attempts, crashes and the failure reason")
    which = listing.add_mutually_exclusive_group()
    which.add_argument("--quarantined", action="store_true", help="only jobs taken out of the queue for good")
    which.add_argument("--status", choices=[status.value for status in JobStatus])
    listing.add_argument("--limit", type=int, default=50)
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    listing.set_defaults(func=cmd_jobs_list)


def _row(job: JobView) -> dict[str, Any]:
    return {
        "id": job.id,
        "status": job.status.value,
        "attempts": job.attempts,
        "max_attempts": job.max_attempts,
        "crashes": job.crashes,
        "solo": job.solo,
        "priority": job.priority,
        "bucket": job.bucket,
        "updated_at": job.updated_at.isoformat(),
        "error": job.error,
    }


def cmd_jobs_list(args: argparse.Namespace) -> int:
    status = JobStatus.QUARANTINED if args.quarantined else (JobStatus(args.status) if args.status else None)

    from service.jobs.queue import list_jobs
    from service.settings import Settings
    from service.stores import open_database

    async def run() -> list[JobView]:
        engine, sessionmaker = await open_database(Settings())
        try:
            return await list_jobs(sessionmaker, status=status, limit=args.limit)
        finally:
            await engine.dispose()

    jobs = asyncio.run(run())
    if args.json:
        for job in jobs:
            print(json.dumps(_row(job)))
        return 0
    if not jobs:
        print("no jobs" if status is None else f"no {status.value} jobs")
        return 0
    print(f"{'job':36}  {'status':11}  {'attempts':8}  {'crashes':7}  {'updated (UTC)':19}  reason")
    for job in jobs:
        attempts = f"{job.attempts}/{job.max_attempts}"
        updated = job.updated_at.strftime("%Y-%m-%d %H:%M:%S")
        reason = job.error or ""
        print(f"{job.id:36}  {job.status.value:11}  {attempts:8}  {job.crashes:<7}  {updated:19}  {reason}")
    return 0
