"""Audit entries as CSV (a row per record with its hash, spreadsheet-safe) or as BALP AuditEvents."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from enum import Enum
from typing import Any

from service.audit.balp import to_audit_event
from service.audit.log import AuditEntry

# Spreadsheets run a cell starting with one of these as a formula (OWASP "CSV injection").
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
# Known columns first, in this order; any field AuditEntry gains later follows them.
_LEADING = ("seq", "recorded_at", "action", "outcome", "actor", "patient", "ehr", "resource")
_TRAILING = ("detail", "hash")


def csv_columns() -> list[str]:
    names = [f.name for f in dataclasses.fields(AuditEntry)]
    leading = [name for name in _LEADING if name in names]
    trailing = [name for name in _TRAILING if name in names]
    middle = [name for name in names if name not in leading and name not in trailing]
    return [*leading, *middle, *trailing]


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_jsonable(item) for item in value]
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, datetime):
        return _time(value)
    return value


def _time(value: datetime) -> str:
    return value.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, datetime):
        return _time(value)
    if isinstance(value, Enum):
        return str(value.value)
    if isinstance(value, str | int | float | bool):
        return str(value)
    return json.dumps(_jsonable(value), sort_keys=True, separators=(",", ":"), default=str)


def safe_cell(value: Any) -> str:
    """The cell's text, with a leading ``'`` where a spreadsheet would otherwise run it as a formula."""
    text = _text(value)
    return "'" + text if text.startswith(_FORMULA_STARTS) else text


def entries_to_csv(entries: Iterable[AuditEntry]) -> str:
    """A header and one row per record, including its seq and record hash (RFC 4180, CRLF line ends)."""
    columns = csv_columns()
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(columns)
    for entry in entries:
        writer.writerow([safe_cell(getattr(entry, name)) for name in columns])
    return buffer.getvalue()


def _event(entry: AuditEntry, *, site: str, fhir_bases: Mapping[str, str]) -> dict[str, Any]:
    # Each record's references are relative to its own EHR, never to whichever EHR is registered first.
    fhir_base = fhir_bases.get(entry.ehr) if entry.ehr else None
    return to_audit_event(entry, site=site, fhir_base=fhir_base)


def entries_to_balp_ndjson(
    entries: Iterable[AuditEntry], *, site: str, fhir_bases: Mapping[str, str] | None = None
) -> str:
    """One BALP AuditEvent per line; ``fhir_bases`` maps EHR names to their FHIR base URLs."""
    bases = fhir_bases or {}
    return "".join(
        json.dumps(_event(entry, site=site, fhir_bases=bases), separators=(",", ":")) + "\n"
        for entry in entries
    )


def entries_to_balp_bundle(
    entries: Iterable[AuditEntry],
    *,
    site: str,
    fhir_bases: Mapping[str, str] | None = None,
    now: datetime | None = None,
) -> dict[str, Any]:
    """A FHIR R4 Bundle (type collection) of the BALP AuditEvents, in the given order."""
    bases = fhir_bases or {}
    events = [_event(entry, site=site, fhir_bases=bases) for entry in entries]
    bundle: dict[str, Any] = {
        "resourceType": "Bundle",
        "type": "collection",
        "timestamp": _time(now or datetime.now(UTC)),
    }
    if events:  # FHIR JSON has no empty arrays
        bundle["entry"] = [{"resource": event} for event in events]
    return bundle
