"""Write an approved document set (Device, Binaries, DocumentReference, Provenance) exactly once."""

from __future__ import annotations

import base64
import copy
import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlencode

from fhir_adapters.client import FhirClient, WriteResult
from fhir_adapters.errors import (
    InvalidResponseError,
    PreconditionFailedError,
    RequestLimitError,
    TemporaryFhirError,
)
from fhir_adapters.us_core import check_us_core
from fhir_adapters.validate import validate_resource
from fhir_adapters.writeback import build_binary

Strategy = Literal["transaction", "single-requests", "already-written"]


@dataclass(frozen=True)
class AttachmentPolicy:
    """What the EHR accepts: images at all, and how large an attachment may be inline (else a Binary)."""

    accept_images: bool = True
    max_inline_bytes: int = 5_000_000


ACCEPTED_CONTENT_TYPE_EXTENSION = (
    "https://carecanvas.invalid/fhir/StructureDefinition/accepted-attachment-content-type"
)
MAX_INLINE_BYTES_EXTENSION = "https://carecanvas.invalid/fhir/StructureDefinition/max-inline-attachment-bytes"


def attachment_policy_from_capabilities(
    capability_statement: Mapping[str, Any], *, default: AttachmentPolicy
) -> AttachmentPolicy:
    """Narrow `default` (from the EHR registration) by hints a CapabilityStatement may carry.

    Real EHRs rarely say what attachments they accept, so the registration stays the source of truth;
    our sandbox (and any EHR that adopts the same extensions on its DocumentReference entry) can only
    make the policy stricter, never looser.
    """
    rest = capability_statement.get("rest") or []
    resources = rest[0].get("resource") or [] if rest and isinstance(rest[0], Mapping) else []
    entry = next(
        (r for r in resources if isinstance(r, Mapping) and r.get("type") == "DocumentReference"), None
    )
    if entry is None:
        return default
    accepted = []
    max_inline = default.max_inline_bytes
    for extension in entry.get("extension") or []:
        if not isinstance(extension, Mapping):
            continue
        if extension.get("url") == ACCEPTED_CONTENT_TYPE_EXTENSION and isinstance(
            extension.get("valueCode"), str
        ):
            accepted.append(extension["valueCode"])
        value = extension.get("valueInteger")
        if extension.get("url") == MAX_INLINE_BYTES_EXTENSION and isinstance(value, int) and value >= 0:
            max_inline = min(max_inline, value)
    images = default.accept_images
    if accepted:
        images = images and any(a in ("*/*", "image/*", "image/png") for a in accepted)
    return AttachmentPolicy(accept_images=images, max_inline_bytes=max_inline)


@dataclass(frozen=True)
class BinaryUpload:
    """A Binary to create before the DocumentReference; `content_index` names the attachment it holds."""

    content_index: int
    resource: dict[str, Any]
    placeholder_url: str


@dataclass(frozen=True)
class WrittenDocument:
    """Where the document landed."""

    document_id: str
    version_id: str | None
    created: bool
    strategy: Strategy
    device_id: str | None
    provenance_id: str | None


def apply_attachment_policy(
    document: Mapping[str, Any], *, policy: AttachmentPolicy, patient_id: str
) -> tuple[dict[str, Any], tuple[BinaryUpload, ...]]:
    """Drop image content the EHR refuses; move attachments above the inline limit into Binaries.

    The returned document points those attachments at `urn:uuid:` placeholders; `write_document_set`
    replaces them with the Binaries' real URLs (or lets the transaction do it).
    """
    if policy.max_inline_bytes < 0:
        raise ValueError("max_inline_bytes must be >= 0")
    result = copy.deepcopy(dict(document))
    content = [
        item
        for item in result.get("content") or []
        if policy.accept_images or not str(item["attachment"].get("contentType", "")).startswith("image/")
    ]
    if not content:
        raise ValueError("no content left after the attachment policy; the PDF must always be present")
    uploads = []
    for index, item in enumerate(content):
        attachment = item["attachment"]
        if "data" not in attachment:
            continue
        data = base64.b64decode(attachment["data"])
        if len(data) <= policy.max_inline_bytes:
            continue
        placeholder = f"urn:uuid:{uuid.uuid4()}"
        uploads.append(
            BinaryUpload(
                content_index=index,
                resource=build_binary(
                    content_type=attachment["contentType"], data=data, patient_id=patient_id
                ),
                placeholder_url=placeholder,
            )
        )
        del attachment["data"]
        attachment["url"] = placeholder
    result["content"] = content
    return result, tuple(uploads)


def body_bytes(resource: Mapping[str, Any]) -> int:
    """The size of `resource` as FhirClient sends it (compact JSON, UTF-8)."""
    return len(json.dumps(resource, separators=(",", ":")).encode("utf-8"))


def max_binary_data_bytes(limit: int, *, content_type: str = "image/png") -> int:
    """The most attachment bytes one Binary request under `limit` can carry (base64 takes 4 per 3)."""
    empty = body_bytes(
        {
            "resourceType": "Binary",
            "contentType": content_type,
            "securityContext": {"reference": "Patient/" + "x" * 64},
        }
    ) + len(',"data":""')
    return max(0, (limit - empty) // 4 * 3)


@dataclass(frozen=True)
class RequestPlan:
    """How one write fits the EHR's body limit: Binaries sent on their own first, the rest as before."""

    document: dict[str, Any]
    binaries: tuple[BinaryUpload, ...]  # inside the transaction (or in order, without one)
    separate: tuple[BinaryUpload, ...]  # each in its own request, before anything else


def fit_request_limit(
    document: Mapping[str, Any],
    binaries: Sequence[BinaryUpload],
    *,
    device: Mapping[str, Any],
    provenance: Mapping[str, Any],
    limit: int,
    transaction: bool,
    conditions: tuple[str, str] = ("", ""),
    ceiling: int | None = None,
) -> RequestPlan:
    """Move attachments (largest first) out of the transaction, or out of the DocumentReference, into
    Binaries of their own until every request is within `limit`; RequestLimitError if one cannot be.

    `limit` is what to aim for; `ceiling` (default: `limit`) what is known to be refused above, so one
    attachment between the two is still tried. Pure: nothing is sent. Without a transaction every Binary is
    its own request anyway. `conditions` are
    the transaction's (document, device) ifNoneExist queries, so its size is measured as it will be sent.
    """
    hard = limit if ceiling is None else max(limit, ceiling)
    result = copy.deepcopy(dict(document))
    inside = list(binaries)
    separate: list[BinaryUpload] = []
    patient_id = str((result.get("subject") or {}).get("reference", "")).removeprefix("Patient/")
    while True:
        size = (
            body_bytes(_transaction_bundle(result, device, provenance, inside, *conditions))
            if transaction
            else body_bytes(result)
        )
        if size <= limit:
            break
        movable = _largest_movable(result, inside if transaction else [])
        if movable is None:
            if size <= hard:
                break
            raise RequestLimitError(
                f"the document and its resources alone are {size} bytes, over the {limit}-byte limit",
                content_type=None,
                request_bytes=size,
                limit_bytes=limit,
                max_data_bytes=0,
            )
        if isinstance(movable, BinaryUpload):
            inside.remove(movable)
            separate.append(movable)
        else:
            separate.append(_inline_to_binary(result, movable, patient_id))
    for upload in [*separate, *([] if transaction else inside)]:
        size = body_bytes(upload.resource)
        if size > hard:
            content_type = str(upload.resource.get("contentType"))
            raise RequestLimitError(
                f"one {content_type} attachment alone is a {size}-byte request, over the {hard}-byte limit",
                content_type=content_type,
                request_bytes=size,
                limit_bytes=hard,
                max_data_bytes=max_binary_data_bytes(limit, content_type=content_type),
            )
    for what in (device, provenance):
        size = body_bytes(what)
        if size > hard:
            raise RequestLimitError(
                f"a {what.get('resourceType')} alone is {size} bytes, over the {hard}-byte limit",
                content_type=None,
                request_bytes=size,
                limit_bytes=hard,
                max_data_bytes=0,
            )
    return RequestPlan(document=result, binaries=tuple(inside), separate=tuple(separate))


def _largest_movable(
    document: Mapping[str, Any], inside: Sequence[BinaryUpload]
) -> BinaryUpload | int | None:
    """The biggest thing that can leave the request: a Binary inside it, or an inline attachment's index."""
    candidates: list[tuple[int, BinaryUpload | int]] = [
        (len(str(upload.resource.get("data", ""))), upload) for upload in inside
    ]
    for index, item in enumerate(document.get("content") or []):
        data = item["attachment"].get("data")
        if isinstance(data, str):
            candidates.append((len(data), index))
    if not candidates:
        return None
    return max(candidates, key=lambda candidate: candidate[0])[1]


def _inline_to_binary(document: dict[str, Any], index: int, patient_id: str) -> BinaryUpload:
    attachment = document["content"][index]["attachment"]
    placeholder = f"urn:uuid:{uuid.uuid4()}"
    upload = BinaryUpload(
        content_index=index,
        resource=build_binary(
            content_type=attachment["contentType"],
            data=base64.b64decode(attachment["data"]),
            patient_id=patient_id,
        ),
        placeholder_url=placeholder,
    )
    del attachment["data"]
    attachment["url"] = placeholder
    return upload


async def _upload_separately(
    client: FhirClient, document: Mapping[str, Any], uploads: Sequence[BinaryUpload]
) -> dict[str, Any]:
    """Create each Binary in its own request; the document then points at them by url."""
    result = copy.deepcopy(dict(document))
    for upload in uploads:
        binary = await client.create(upload.resource)
        if binary.id is None:
            raise InvalidResponseError("the created Binary has no id")
        result["content"][upload.content_index]["attachment"]["url"] = f"Binary/{binary.id}"
    return result


def supports_transactions(capability_statement: Mapping[str, Any]) -> bool:
    """Whether rest[0].interaction lists 'transaction'."""
    rest = capability_statement.get("rest") or []
    if not rest or not isinstance(rest[0], Mapping):
        return False
    return any(
        isinstance(i, Mapping) and i.get("code") == "transaction" for i in rest[0].get("interaction") or []
    )


def _identifier_query(system: str, value: str) -> str:
    return urlencode({"identifier": f"{system}|{value}"})


def _check_identifier(resource: Mapping[str, Any], system: str, value: str, what: str) -> None:
    for identifier in resource.get("identifier") or []:
        if identifier.get("system") == system and identifier.get("value") == value:
            return
    raise ValueError(f"{what} must carry the identifier it is conditionally created on")


def _first_identifier(resource: Mapping[str, Any], what: str) -> tuple[str, str]:
    for identifier in resource.get("identifier") or []:
        if identifier.get("system") and identifier.get("value"):
            return identifier["system"], identifier["value"]
    raise ValueError(f"{what} needs an identifier with system and value for conditional create")


def _with_references(provenance: Mapping[str, Any], *, document_ref: str, device_ref: str) -> dict[str, Any]:
    """Point the Provenance at the written document and at the model Device (its author agents)."""
    result = copy.deepcopy(dict(provenance))
    result["target"] = [{"reference": document_ref}]
    for agent in result.get("agent") or []:
        who = (agent.get("who") or {}).get("reference", "")
        if who.startswith(("Device/", "urn:uuid:")):
            agent["who"] = {"reference": device_ref}
    return result


def _transaction_bundle(
    document: Mapping[str, Any],
    device: Mapping[str, Any],
    provenance: Mapping[str, Any],
    binaries: Sequence[BinaryUpload],
    document_condition: str,
    device_condition: str,
) -> dict[str, Any]:
    device_url, document_url = f"urn:uuid:{uuid.uuid4()}", f"urn:uuid:{uuid.uuid4()}"
    entries: list[dict[str, Any]] = [
        {
            "fullUrl": device_url,
            "resource": dict(device),
            "request": {"method": "POST", "url": "Device", "ifNoneExist": device_condition},
        }
    ]
    for upload in binaries:
        # The server rewrites the placeholder in attachment.url to the Binary's id (FHIR R4 §3.1.0.11.2).
        entries.append(
            {
                "fullUrl": upload.placeholder_url,
                "resource": upload.resource,
                "request": {"method": "POST", "url": "Binary"},
            }
        )
    entries.append(
        {
            "fullUrl": document_url,
            "resource": dict(document),
            "request": {"method": "POST", "url": "DocumentReference", "ifNoneExist": document_condition},
        }
    )
    entries.append(
        {
            "fullUrl": f"urn:uuid:{uuid.uuid4()}",
            "resource": _with_references(provenance, document_ref=document_url, device_ref=device_url),
            "request": {"method": "POST", "url": "Provenance"},
        }
    )
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}


def _id_from_location(location: str | None, resource_type: str) -> tuple[str, str | None]:
    parts = (location or "").split("/")
    if resource_type not in parts:
        raise InvalidResponseError(f"transaction-response entry has no {resource_type} location")
    index = parts.index(resource_type)
    if index + 1 >= len(parts) or not parts[index + 1]:
        raise InvalidResponseError(f"transaction-response entry has no {resource_type} id")
    version = parts[index + 3] if len(parts) > index + 3 and parts[index + 2] == "_history" else None
    return parts[index + 1], version


async def _find_document(client: FhirClient, system: str, value: str) -> dict[str, Any] | None:
    found = await client.search("DocumentReference", {"identifier": f"{system}|{value}"})
    if len(found) > 1:
        raise PreconditionFailedError("several DocumentReferences carry the same identifier")
    return found[0] if found else None


async def _ensure_provenance(
    client: FhirClient, provenance: Mapping[str, Any], *, document_id: str, device_ref: str
) -> str | None:
    target = f"DocumentReference/{document_id}"
    existing = await client.search("Provenance", {"target": target})
    if existing:
        return existing[0].get("id")
    resource = _with_references(provenance, document_ref=target, device_ref=device_ref)
    validate_resource(resource)
    result = await client.create(resource, if_none_exist=f"target={target}")
    return result.id


async def write_document_set(
    client: FhirClient,
    *,
    document: Mapping[str, Any],
    device: Mapping[str, Any],
    provenance: Mapping[str, Any],
    identifier_system: str,
    identifier_value: str,
    binaries: Sequence[BinaryUpload] = (),
    max_request_bytes: int | None = None,
    request_ceiling_bytes: int | None = None,
) -> WrittenDocument:
    """Write the set once: a transaction where offered, else Device, Binaries, DocumentReference, Provenance.

    Safe to call again after any failure: the DocumentReference is looked up by its identifier first and
    created only conditionally, and the Provenance only when none targets that document. With
    `max_request_bytes`, attachments that would make a request larger go first as Binaries of their own
    (RequestLimitError, before anything is sent, when one of them alone is over `request_ceiling_bytes`,
    by default the same).
    """
    _check_identifier(document, identifier_system, identifier_value, "document")
    device_system, device_value = _first_identifier(device, "device")
    for upload in binaries:
        attachment = document["content"][upload.content_index]["attachment"]
        if attachment.get("url") != upload.placeholder_url:
            raise ValueError("each BinaryUpload must match an attachment url placeholder in the document")
    # Everything is validated before anything is sent: a half-written set is worse than none.
    for resource in (document, device, provenance, *(u.resource for u in binaries)):
        validate_resource(resource)
        check_us_core(resource)

    existing = await _find_document(client, identifier_system, identifier_value)
    if existing is not None:
        return await _finish_existing(client, existing, provenance=provenance, device=device)

    transactional = supports_transactions(await client.capabilities())
    if max_request_bytes is not None:
        plan = fit_request_limit(
            document,
            binaries,
            device=device,
            provenance=provenance,
            limit=max_request_bytes,
            ceiling=request_ceiling_bytes,
            transaction=transactional,
            conditions=(
                _identifier_query(identifier_system, identifier_value),
                _identifier_query(device_system, device_value),
            ),
        )
        # Binaries are not conditional: a retry after a failure below may leave an unreferenced one behind,
        # never a second document.
        document = await _upload_separately(client, plan.document, plan.separate)
        binaries = plan.binaries
        validate_resource(document)

    if transactional:
        try:
            return await _write_transaction(
                client,
                document=document,
                device=device,
                provenance=provenance,
                binaries=binaries,
                document_condition=_identifier_query(identifier_system, identifier_value),
                device_condition=_identifier_query(device_system, device_value),
            )
        except TemporaryFhirError:
            # The server may have committed before failing; if so, finish from what it stored.
            existing = await _find_document(client, identifier_system, identifier_value)
            if existing is None:
                raise
            return await _finish_existing(client, existing, provenance=provenance, device=device)

    device_result = await client.create(device, if_none_exist=_identifier_query(device_system, device_value))
    device_ref = f"Device/{device_result.id}"
    to_send = copy.deepcopy(dict(document))
    for upload in binaries:
        binary = await client.create(upload.resource)
        to_send["content"][upload.content_index]["attachment"]["url"] = f"Binary/{binary.id}"
    validate_resource(to_send)
    written: WriteResult = await client.create(
        to_send, if_none_exist=_identifier_query(identifier_system, identifier_value)
    )
    if written.id is None:
        raise InvalidResponseError("the created DocumentReference has no id")
    provenance_id = await _ensure_provenance(
        client, provenance, document_id=written.id, device_ref=device_ref
    )
    return WrittenDocument(
        document_id=written.id,
        version_id=written.version_id,
        created=written.created,
        strategy="single-requests",
        device_id=device_result.id,
        provenance_id=provenance_id,
    )


async def _finish_existing(
    client: FhirClient,
    existing: Mapping[str, Any],
    *,
    provenance: Mapping[str, Any],
    device: Mapping[str, Any],
) -> WrittenDocument:
    """The document is already there (an earlier attempt committed): make sure its Provenance is too."""
    document_id = existing.get("id")
    if not isinstance(document_id, str):
        raise InvalidResponseError("a stored DocumentReference has no id")
    device_system, device_value = _first_identifier(device, "device")
    device_result = await client.create(device, if_none_exist=_identifier_query(device_system, device_value))
    provenance_id = await _ensure_provenance(
        client, provenance, document_id=document_id, device_ref=f"Device/{device_result.id}"
    )
    meta = existing.get("meta") or {}
    return WrittenDocument(
        document_id=document_id,
        version_id=meta.get("versionId"),
        created=False,
        strategy="already-written",
        device_id=device_result.id,
        provenance_id=provenance_id,
    )


async def _write_transaction(
    client: FhirClient,
    *,
    document: Mapping[str, Any],
    device: Mapping[str, Any],
    provenance: Mapping[str, Any],
    binaries: Sequence[BinaryUpload],
    document_condition: str,
    device_condition: str,
) -> WrittenDocument:
    bundle = _transaction_bundle(document, device, provenance, binaries, document_condition, device_condition)
    response = await client.transaction(bundle)
    answers = [entry.get("response") or {} for entry in response["entry"]]
    device_id, _ = _id_from_location(answers[0].get("location"), "Device")
    document_answer = answers[len(binaries) + 1]
    document_id, version_id = _id_from_location(document_answer.get("location"), "DocumentReference")
    provenance_id, _ = _id_from_location(answers[-1].get("location"), "Provenance")
    return WrittenDocument(
        document_id=document_id,
        version_id=version_id,
        created=str(document_answer.get("status", "")).startswith("201"),
        strategy="transaction",
        device_id=device_id,
        provenance_id=provenance_id,
    )


async def mark_entered_in_error(client: FhirClient, document_id: str) -> WriteResult | None:
    """Retract a document: status entered-in-error, guarded by If-Match; None if it already was."""
    for _ in range(2):
        current = await client.read("DocumentReference", document_id)
        if current.get("status") == "entered-in-error":
            return None
        version = (current.get("meta") or {}).get("versionId")
        current["status"] = "entered-in-error"
        validate_resource(current)
        try:
            return await client.update(current, if_match=f'W/"{version}"' if version else None)
        except PreconditionFailedError:
            continue  # someone changed it between our read and write; read again and retry once
    raise PreconditionFailedError("the document kept changing while it was being retracted", status=412)
