"""schemathesis over /api/v1 (from_asgi, a real launched session): every operation, positive and negative
data, then the stateful phase along the OpenAPI links (create job → job / draft / edit / approve)."""

from __future__ import annotations

from typing import Any

import pytest
import schemathesis
from api_client import ApiSession
from hypothesis import HealthCheck, given, settings
from schemathesis import Case, GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    ignored_auth,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
    use_after_free,
)

from service.app import create_app
from service.settings import Settings
from service.web.security import UNSAFE_METHODS, cookie_name

pytestmark = pytest.mark.slow

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    negative_data_rejection,
    ignored_auth,
    use_after_free,
]
# Small on purpose: the whole file runs in well under a minute on two cores.
SETTINGS = settings(
    max_examples=6,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)


@pytest.fixture(scope="module")
def schema_app(api_settings: Settings, carecanvas: Any) -> Any:
    """A second app on the same data directory (so the launched session is valid there), reached over
    ASGI in-process; the running server's embedded worker finishes the jobs it queues."""
    return create_app(api_settings.model_copy(update={"embedded_worker": False}))


def load_schema(app: Any, clinician: ApiSession, api_settings: Settings, modes: list[GenerationMode]) -> Any:
    schema = schemathesis.openapi.from_asgi("/api/v1/openapi.json", app)
    schema.config.generation.update(modes=modes, with_security_parameters=False)
    schema.config.phases.stateful.generation.update(modes=modes, with_security_parameters=False)
    # Condition ids are data, not schema: point generation at the launched patient's own conditions so
    # that creates succeed and the stateful phase can follow their links.
    # All of them: schemathesis also reuses ids it saw in earlier answers (GET /conditions).
    conditions = [item["id"] for item in clinician.get("/conditions").json()["conditions"]]
    request = schema.raw_schema["components"]["schemas"]["IllustrationRequest"]
    request["properties"]["condition_id"]["enum"] = conditions
    name = cookie_name(api_settings)
    credentials = (clinician.client.cookies[name], clinician.csrf)

    @schema.auth()
    class SessionAuth:
        """The app's own front end: the session cookie, plus the CSRF header on unsafe methods."""

        def get(self, case: Case, ctx: Any) -> tuple[str, str]:
            return credentials

        def set(self, case: Case, data: tuple[str, str], ctx: Any) -> None:
            cookie, csrf = data
            case.cookies = {**(case.cookies or {}), name: cookie}
            if case.method.upper() in UNSAFE_METHODS:
                case.headers = {**(case.headers or {}), "X-CSRF-Token": csrf}

    return schema


def test_every_operation_conforms(schema_app: Any, clinician: ApiSession, api_settings: Settings) -> None:
    api_schema = load_schema(
        schema_app, clinician, api_settings, [GenerationMode.POSITIVE, GenerationMode.NEGATIVE]
    )
    # Each operation in both modes, one Hypothesis run each (schemathesis' pytest integration reads a
    # pytest-internal node attribute that pytest 9 no longer has, so the runs are driven here).
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 13
    for operation in operations:
        raw = operation.definition.raw
        # Negative data needs something to break: an operation without parameters or body has none.
        negatable = bool(raw.get("parameters") or raw.get("requestBody"))
        modes = (
            (GenerationMode.POSITIVE, GenerationMode.NEGATIVE) if negatable else (GenerationMode.POSITIVE,)
        )
        for mode in modes:

            @given(case=operation.as_strategy(generation_mode=mode, auth_storage=api_schema.auth))
            @SETTINGS
            def run(case: Case) -> None:
                case.call_and_validate(checks=CHECKS)

            run()


def test_stateful_links(schema_app: Any, clinician: ApiSession, api_settings: Settings) -> None:
    seen: list[tuple[str, int]] = []
    # Negative data had its own phase above; here each step must be a valid request, so that a create
    # succeeds and its links lead somewhere (a negated step could only end the chain).
    api_schema = load_schema(schema_app, clinician, api_settings, [GenerationMode.POSITIVE])

    class Workflow(api_schema.as_state_machine()):  # type: ignore[misc]
        def validate_response(self, response: Any, case: Case, **kwargs: Any) -> None:
            kwargs.pop("additional_checks", None)
            seen.append((case.operation.definition.raw["operationId"], response.status_code))
            case.validate_response(response, checks=CHECKS, transport_kwargs=kwargs)

    Workflow.run(
        settings=settings(
            max_examples=4,
            stateful_step_count=5,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
    )
    # The links were followed: a job was created and then read through them.
    assert ("create_illustration", 201) in seen
    assert {operation for operation, status in seen if status in (200, 409)} & {
        "get_job",
        "get_draft",
        "edit_draft",
        "approve",
    }
