"""Fixtures for the fhir_adapters tests: real HTTP servers on free loopback ports, stopped afterwards."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fhir_test_servers import ScriptedServer


@pytest.fixture
def server() -> Iterator[ScriptedServer]:
    scripted = ScriptedServer()
    try:
        yield scripted
    finally:
        scripted.close()


@pytest.fixture
def other_server() -> Iterator[ScriptedServer]:
    scripted = ScriptedServer()
    try:
        yield scripted
    finally:
        scripted.close()
