"""`carecanvas audit export`: the console's filters on the command line, CSV or BALP out, itself audited."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import sys
from enum import StrEnum
from zoneinfo import ZoneInfo

from service.audit import AuditAction, AuditEntry
from service.audit.search import (
    MAX_EXPORT,
    AuditQuery,
    AuditQueryError,
    audit_access,
    entries_to_balp_bundle,
    entries_to_balp_ndjson,
    entries_to_csv,
    export_entries,
    parse_time,
    search_audit,
)
from service.crypto import KeyringError
from service.settings import Settings
from service.stores import open_audit_log, open_database, open_keyring

CLI_ACTOR = "cli"


class ExportFormat(StrEnum):
    NDJSON = "ndjson"
    BUNDLE = "bundle"
    CSV = "csv"


def _os_user() -> str | None:
    try:
        return getpass.getuser()
    except (OSError, KeyError):  # a container user with no passwd entry
        return None


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--patient", help="a patient reference, e.g. Patient/pat-1 (matched by keyed digest)")
    parser.add_argument("--user", help="the acting user's reference, e.g. Practitioner/prac-2")
    parser.add_argument("--action", help="an audit action, e.g. fhir.read")
    parser.add_argument("--outcome", help="success, denied, failure or error")
    parser.add_argument("--ehr", help="the EHR registration's name")
    parser.add_argument(
        "--since", help="from this date/time on (ISO 8601; without an offset: the report time zone)"
    )
    parser.add_argument("--until", help="before this date/time (exclusive; same forms as --since)")
    parser.add_argument(
        "--format", choices=[f.value for f in ExportFormat], default=ExportFormat.NDJSON.value
    )
    parser.add_argument(
        "--limit", type=int, default=10_000, help=f"at most this many records (1..{MAX_EXPORT}), oldest first"
    )


def query_from_args(args: argparse.Namespace, settings: Settings) -> AuditQuery:
    zone = ZoneInfo(settings.audit_report_timezone)
    return AuditQuery(
        patient=args.patient,
        actor=args.user,
        action=args.action,
        outcome=args.outcome,
        ehr=args.ehr,
        since=None if args.since is None else parse_time("--since", args.since, zone),
        until=None if args.until is None else parse_time("--until", args.until, zone),
        limit=1,  # export_entries ignores paging; the page here only counts the matches
    )


def render(entries: list[AuditEntry], export_format: ExportFormat, settings: Settings) -> str:
    fhir_bases = {ehr.name: ehr.iss for ehr in settings.registered_ehrs()}
    if export_format is ExportFormat.CSV:
        return entries_to_csv(entries)
    if export_format is ExportFormat.BUNDLE:
        bundle = entries_to_balp_bundle(entries, site=settings.site_name, fhir_bases=fhir_bases)
        return json.dumps(bundle, separators=(",", ":")) + "\n"
    return entries_to_balp_ndjson(entries, site=settings.site_name, fhir_bases=fhir_bases)


async def run_export(settings: Settings, args: argparse.Namespace) -> int:
    export_format = ExportFormat(args.format)
    query = query_from_args(args, settings)
    if not 0 < args.limit <= MAX_EXPORT:
        raise AuditQueryError(f"--limit must be between 1 and {MAX_EXPORT}")
    keyring = open_keyring(settings, create_if_missing=False)  # before the database: no keys, no export
    engine, sessionmaker = await open_database(settings)
    try:
        audit = open_audit_log(settings, keyring=keyring)
        async with sessionmaker() as db:
            entries = await export_entries(db, audit, query, max_records=args.limit)
            matching = (await search_audit(db, audit, query)).total
            # Written before anything is shown: if the export cannot be audited, nothing is exported.
            await audit_access(
                db,
                audit,
                action=AuditAction.AUDIT_EXPORT,
                actor=CLI_ACTOR,
                query=query,
                count=len(entries),
                detail={"format": export_format.value, "os_user": _os_user()},
            )
            await db.commit()
    finally:
        await engine.dispose()
    sys.stdout.write(render(entries, export_format, settings))
    if len(entries) == args.limit and matching > len(entries):
        print(
            f"exported {len(entries)} of {matching} matching records (oldest first); "
            "raise --limit for the rest",
            file=sys.stderr,
        )
    return 0


def cmd_audit_export(args: argparse.Namespace, settings: Settings) -> int:
    try:
        return asyncio.run(run_export(settings, args))
    except (AuditQueryError, KeyringError) as error:
        print(f"audit export: {error}", file=sys.stderr)
        return 2
