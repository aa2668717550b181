"""The API's OpenAPI document (security schemes, links between operations) and an offline docs page."""

from __future__ import annotations

import html
from typing import Any

from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute

from service.api.routes import API_BASE, router
from service.api.schemas import ErrorOut
from service.generation.prompts import Depiction, load_prompt_library
from service.services import TEMPLATES_DIR
from service.settings import Settings
from service.web.choices import LANGUAGES
from service.web.context import CSRF_HEADER
from service.web.security import UNSAFE_METHODS, cookie_name

TITLE = "CareCanvas API"
VERSION = "1.0.0"
DESCRIPTION = (
    "Patient-education illustrations and therapeutic portraits for the launched patient.\n\n"
    "Authenticate either with the SMART session cookie CareCanvas sets at launch (unsafe methods also send "
    "the session's CSRF token as `X-CSRF-Token`), or with `Authorization: Bearer <the EHR's access token>` "
    "(name the EHR with `X-EHR: <registration name>` unless only one is registered). Errors are JSON "
    '`{"code", "title", "detail"}` with a stable `code`, or a FHIR OperationOutcome when the request '
    "accepts `application/fhir+json`."
)

# Which operation's answer feeds which next operation (OpenAPI links, used by stateful testing tools).
_JOB_LINKS = {
    "GetJob": "get_job",
    "GetDraft": "get_draft",
    "EditDraft": "edit_draft",
    "Approve": "approve",
}
_LINKED_CREATES = {("/illustrations", "post"), ("/documents/{job_id}/regenerate", "post")}


def api_routes() -> list[APIRoute]:
    return [route for route in router.routes if isinstance(route, APIRoute)]


def _security_schemes(settings: Settings) -> dict[str, Any]:
    return {
        "sessionCookie": {
            "type": "apiKey",
            "in": "cookie",
            "name": cookie_name(settings),
            "description": "The CareCanvas session from a SMART launch.",
        },
        "csrfHeader": {
            "type": "apiKey",
            "in": "header",
            "name": CSRF_HEADER,
            "description": "The session's CSRF token; required with the cookie on POST, PATCH, PUT, DELETE.",
        },
        "ehrBearer": {
            "type": "http",
            "scheme": "bearer",
            "description": "An access token from the EHR (checked by introspection); header X-EHR names it.",
        },
    }


def _links(path: str) -> dict[str, Any]:
    return {
        name: {"operationId": operation, "parameters": {"job_id": "$response.body#/job_id"}}
        for name, operation in _JOB_LINKS.items()
    }


_ERROR_CONTENT = {
    "application/json": {"schema": {"$ref": "#/components/schemas/ErrorOut"}},
    "application/fhir+json": {"schema": {"$ref": "#/components/schemas/OperationOutcome"}},
}
_OPERATION_OUTCOME = {
    "type": "object",
    "required": ["resourceType", "issue"],
    "properties": {"resourceType": {"const": "OperationOutcome"}, "issue": {"type": "array"}},
}


def _error_bodies(operation: dict[str, Any]) -> None:
    # Errors are JSON whatever the operation's success type is (a PNG, an event stream).
    for status, response in operation.get("responses", {}).items():
        if str(status)[0] in "45":
            response["content"] = _ERROR_CONTENT


def _choices(schemas: dict[str, Any]) -> None:
    """The styles and languages on offer, as enums (read from the prompt library, not copied)."""
    library = load_prompt_library(TEMPLATES_DIR / "prompts")
    styles = [preset.name for preset in library.styles]
    # Portraits have a style set of their own.
    portrait_styles = [preset.name for preset in library.portrait_styles]
    for name in ("IllustrationRequest", "PortraitRequest", "RegenerateRequest"):
        properties = schemas[name]["properties"]
        offered = portrait_styles if name == "PortraitRequest" else styles
        for field, values in (("style", offered), ("language", list(LANGUAGES))):
            target = properties[field]
            # Optional fields are `anyOf: [string, null]`: the enum goes on the string branch.
            branch = next((b for b in target.get("anyOf", []) if b.get("type") == "string"), target)
            branch["enum"] = values
    portrait = schemas["PortraitRequest"]["properties"]
    for field, allowed in Depiction.ALLOWED.items():
        portrait[field]["enum"] = list(allowed)


def build_openapi(settings: Settings) -> dict[str, Any]:
    document = get_openapi(
        title=TITLE, version=VERSION, description=DESCRIPTION, routes=api_routes(), openapi_version="3.1.0"
    )
    components = document.setdefault("components", {})
    components["securitySchemes"] = _security_schemes(settings)
    schemas = components.setdefault("schemas", {})
    schemas["ErrorOut"] = ErrorOut.model_json_schema()
    schemas["OperationOutcome"] = _OPERATION_OUTCOME
    _choices(schemas)
    for path, operations in document.get("paths", {}).items():
        for method, operation in operations.items():
            safe = method.upper() not in UNSAFE_METHODS
            cookie: dict[str, list[str]] = (
                {"sessionCookie": []} if safe else {"sessionCookie": [], "csrfHeader": []}
            )
            operation["security"] = [cookie, {"ehrBearer": []}]
            _error_bodies(operation)
            if (path.removeprefix(API_BASE), method) in _LINKED_CREATES:
                operation["responses"]["201"]["links"] = _links(path)
    return document


def docs_page(document: dict[str, Any]) -> str:
    """A plain page listing the operations: no scripts, no CDN (the CSP allows neither)."""
    rows = []
    for path, operations in document.get("paths", {}).items():
        for method, operation in operations.items():
            rows.append(
                "<tr><td><code>{}</code></td><td><code>{}</code></td><td>{}</td></tr>".format(
                    html.escape(method.upper()),
                    html.escape(path),
                    html.escape(str(operation.get("summary") or operation.get("description") or "")),
                )
            )
    description = "".join(f"<p>{html.escape(part)}</p>" for part in DESCRIPTION.split("\n\n"))
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f"<title>{TITLE}</title>"
        '<link rel="stylesheet" href="/static/app.css"></head><body><main>'
        f"<h1>{TITLE} {VERSION}</h1>{description}"
        f'<p>Machine-readable: <a href="{API_BASE}/openapi.json">{API_BASE}/openapi.json</a></p>'
        "<table><thead><tr><th>Method</th><th>Path</th><th>What it does</th></tr></thead><tbody>"
        + "".join(rows)
        + "</tbody></table></main></body></html>"
    )
