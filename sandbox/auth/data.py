"""The people in the sandbox data file (patients, practitioners, encounters) as the EHR page needs them."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Person:
    """A patient or practitioner as listed on the EHR page."""

    resource_type: str
    id: str
    name: str
    birth_date: str | None = None

    @property
    def reference(self) -> str:
        return f"{self.resource_type}/{self.id}"


@dataclass(frozen=True)
class Directory:
    """Patients, practitioners and each patient's encounters, read once from the data file."""

    patients: tuple[Person, ...]
    practitioners: tuple[Person, ...]
    encounters_by_patient: dict[str, tuple[str, ...]]

    def patient(self, patient_id: str) -> Person | None:
        return next((p for p in self.patients if p.id == patient_id), None)

    def practitioner(self, practitioner_id: str) -> Person | None:
        return next((p for p in self.practitioners if p.id == practitioner_id), None)

    def first_encounter(self, patient_id: str) -> str | None:
        encounters = self.encounters_by_patient.get(patient_id, ())
        return encounters[0] if encounters else None


def _display_name(resource: dict[str, Any]) -> str:
    names = resource.get("name") or []
    if not names:
        return resource.get("id", "unnamed")
    name = names[0]
    if name.get("text"):
        return str(name["text"])
    parts = [*name.get("prefix", []), *name.get("given", []), name.get("family", "")]
    return " ".join(part for part in parts if part) or resource.get("id", "unnamed")


def load_directory(data_file: Path) -> Directory:
    """Read a FHIR Bundle (type collection) and pick out the people and encounters."""
    try:
        bundle = json.loads(Path(data_file).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"sandbox data file {data_file} does not exist") from None
    if bundle.get("resourceType") != "Bundle":
        raise ValueError(f"sandbox data file {data_file} is not a FHIR Bundle")
    patients: list[Person] = []
    practitioners: list[Person] = []
    encounters: dict[str, list[str]] = {}
    for entry in bundle.get("entry", []):
        resource = entry.get("resource") or {}
        kind = resource.get("resourceType")
        if kind == "Patient":
            birth_date = resource.get("birthDate")
            patients.append(Person("Patient", resource["id"], _display_name(resource), birth_date))
        elif kind == "Practitioner":
            practitioners.append(Person("Practitioner", resource["id"], _display_name(resource)))
        elif kind == "Encounter":
            subject = (resource.get("subject") or {}).get("reference", "")
            if subject.startswith("Patient/"):
                encounters.setdefault(subject.removeprefix("Patient/"), []).append(resource["id"])
    return Directory(
        patients=tuple(patients),
        practitioners=tuple(practitioners),
        encounters_by_patient={key: tuple(value) for key, value in encounters.items()},
    )
