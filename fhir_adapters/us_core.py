"""US Core rules for what we write (beyond base R4 structure), and the clinician's organization.

The checks are the profiles' constraints written out in Python, FHIRPath-like, one rule per function:

    us-core-provenance        target 1..*, recorded 1..1, agent 1..* (type 1..1, who 1..1),
                              provenance-1: (who.resolve() is Practitioner or who.resolve() is Device)
                                            implies onBehalfOf.exists()
                              onBehalfOf: Reference(US Core Organization); at most one transmitter agent
    us-core-documentreference status, type, category 1..*, subject Reference(Patient), content 1..*,
                              us-core-6: content.attachment.url.exists() or content.attachment.data.exists(),
                              attachment.contentType; custodian Reference(Organization) (Must Support,
                              required by CareCanvas: someone must be answerable for the document)
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

from fhir_adapters.client import FhirClient
from fhir_adapters.errors import ForbiddenError, ResourceValidationError

PARTICIPANT_TYPE = "http://terminology.hl7.org/CodeSystem/provenance-participant-type"
_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
# provenance-1 names these agent types; an unresolvable reference (a urn:uuid in a transaction) counts too.
_NEEDS_ON_BEHALF_OF = frozenset({"Practitioner", "Device", None})

Resolver = Callable[[str], str | None]


def reference_type(reference: str) -> str | None:
    """`who.resolve() is X` for literal references: the type in "Type/id" (or an absolute URL), else None."""
    parts = reference.split("/")
    if len(parts) >= 2 and _ID.match(parts[-1]) and parts[-2][:1].isupper():
        return parts[-2]
    if len(parts) >= 4 and parts[-2] == "_history":
        return parts[-4]
    return None


def _ref(value: Any) -> str | None:
    if isinstance(value, Mapping) and isinstance(value.get("reference"), str) and value["reference"]:
        return str(value["reference"])
    return None


def provenance_problems(provenance: Mapping[str, Any], *, resolve: Resolver = reference_type) -> list[str]:
    """What breaks US Core Provenance (empty: conforms); each problem names its rule and path."""
    problems: list[str] = []
    targets = provenance.get("target") or []
    if not targets or not all(_ref(target) for target in targets):
        problems.append("Provenance.target: 1..* references required")
    if not provenance.get("recorded"):
        problems.append("Provenance.recorded: 1..1 required")
    agents = provenance.get("agent") or []
    if not agents:
        problems.append("Provenance.agent: 1..* required")
    transmitters = 0
    for index, agent in enumerate(agents):
        path = f"Provenance.agent[{index}]"
        codes = {
            c.get("code") for c in (agent.get("type") or {}).get("coding") or [] if isinstance(c, Mapping)
        }
        if not codes:
            problems.append(f"{path}.type: 1..1 required")
        transmitters += "transmitter" in codes
        who = _ref(agent.get("who"))
        if who is None:
            problems.append(f"{path}.who: 1..1 required")
            continue
        on_behalf_of = _ref(agent.get("onBehalfOf"))
        if resolve(who) in _NEEDS_ON_BEHALF_OF and on_behalf_of is None:
            problems.append(
                f"{path}: provenance-1 (who is a Practitioner or Device, so onBehalfOf is required)"
            )
        if on_behalf_of is not None and resolve(on_behalf_of) != "Organization":
            problems.append(f"{path}.onBehalfOf: must reference an Organization")
        if on_behalf_of is not None and on_behalf_of == who:
            problems.append(f"{path}: who and onBehalfOf must differ")
    if transmitters > 1:
        problems.append("Provenance.agent:ProvenanceTransmitter: at most one")
    return problems


def document_reference_problems(
    document: Mapping[str, Any], *, resolve: Resolver = reference_type
) -> list[str]:
    """What breaks US Core DocumentReference (and CareCanvas's custodian rule); empty: conforms."""
    problems: list[str] = []
    if not document.get("status"):
        problems.append("DocumentReference.status: 1..1 required")
    if not (document.get("type") or {}).get("coding"):
        problems.append("DocumentReference.type: 1..1 coded type required")
    if not document.get("category"):
        problems.append("DocumentReference.category: 1..* required")
    subject = _ref(document.get("subject"))
    if subject is None or resolve(subject) != "Patient":
        problems.append("DocumentReference.subject: 1..1 Reference(Patient) required")
    custodian = _ref(document.get("custodian"))
    if custodian is None or resolve(custodian) != "Organization":
        problems.append("DocumentReference.custodian: Reference(Organization) required")
    contents = document.get("content") or []
    if not contents:
        problems.append("DocumentReference.content: 1..* required")
    for index, content in enumerate(contents):
        attachment = content.get("attachment") if isinstance(content, Mapping) else None
        path = f"DocumentReference.content[{index}].attachment"
        if not isinstance(attachment, Mapping):
            problems.append(f"{path}: 1..1 required")
            continue
        if not (attachment.get("url") or attachment.get("data")):
            problems.append(f"{path}: us-core-6 (url or data SHALL be present)")
        if not attachment.get("contentType"):
            problems.append(f"{path}.contentType: required")
    return problems


def check_us_core(resource: Mapping[str, Any], *, resolve: Resolver = reference_type) -> None:
    """Raise ResourceValidationError when a resource claiming a US Core profile breaks its rules."""
    kind = resource.get("resourceType")
    checks = {"Provenance": provenance_problems, "DocumentReference": document_reference_problems}
    if kind not in checks:
        return
    problems = checks[kind](resource, resolve=resolve)
    if problems:
        raise ResourceValidationError(f"{kind} does not conform to US Core: " + "; ".join(problems[:3]))


async def practitioner_organization(client: FhirClient, practitioner_id: str) -> str | None:
    """The Organization id of the practitioner's (active) PractitionerRole; None where there is none."""
    try:
        roles = await client.search("PractitionerRole", {"practitioner": f"Practitioner/{practitioner_id}"})
    except ForbiddenError:
        return None  # the EHR did not grant PractitionerRole reads to this launch
    for role in sorted(roles, key=lambda r: r.get("active") is False):
        organization = _ref(role.get("organization"))
        if organization and resolve_id(organization, "Organization"):
            return resolve_id(organization, "Organization")
    return None


def resolve_id(reference: str, resource_type: str) -> str | None:
    """The id of a "Type/id" reference (relative or absolute) when it is of `resource_type`."""
    parts = reference.split("/")
    if len(parts) >= 2 and parts[-2] == resource_type and _ID.match(parts[-1]):
        return parts[-1]
    return None
