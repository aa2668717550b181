"""The sandbox EHR page in headless Chromium: pick a patient, launch, the app appears in an iframe."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from playwright.sync_api import sync_playwright

from sandbox.auth.config import AuthServerConfig
from sandbox.auth.oauth import SmartAuthorizationServer
from sandbox.auth_server import create_auth_app
from sandbox.run import UvicornThread, bind_socket

pytestmark = pytest.mark.browser

FHIR_BASE = "http://127.0.0.1:8766/fhir"
CHROMIUM_ARGS = [
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
    "--no-first-run",
]
BUNDLE = {
    "resourceType": "Bundle",
    "type": "collection",
    "entry": [
        {"resource": {"resourceType": "Patient", "id": "pat-1", "birthDate": "1960-01-01",
                      "name": [{"given": ["Ines"], "family": "Ortiz-Test"}]}},
        {"resource": {"resourceType": "Patient", "id": "pat-2", "birthDate": "1999-09-09",
                      "name": [{"given": ["Omar"], "family": "Haddad-Test"}]}},
        {"resource": {"resourceType": "Practitioner", "id": "prac-1",
                      "name": [{"given": ["Lena"], "family": "Berg"}]}},
        {"resource": {"resourceType": "Practitioner", "id": "prac-2",
                      "name": [{"given": ["Kofi"], "family": "Mensah"}]}},
        {"resource": {"resourceType": "Encounter", "id": "enc-2", "status": "in-progress",
                      "subject": {"reference": "Patient/pat-2"}}},
    ],
}  # fmt: skip


@pytest.fixture(scope="module")
def ehr(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, SmartAuthorizationServer]]:
    data_file = tmp_path_factory.mktemp("ehr-browser") / "bundle.json"
    data_file.write_text(json.dumps(BUNDLE), encoding="utf-8")
    sock = bind_socket()
    issuer = f"http://127.0.0.1:{sock.getsockname()[1]}"
    try:
        # The "app" is a real page on this server, so the iframe loads something without another process.
        config = AuthServerConfig(
            issuer=issuer,
            fhir_base=FHIR_BASE,
            data_file=data_file,
            app_launch_url=f"{issuer}/smart-style.json",
        )
        app = create_auth_app(config)
        thread = UvicornThread(app, sock)
        thread.start()
    except BaseException:
        sock.close()
        raise
    yield issuer, app.state.server
    thread.stop()


def test_pick_patient_and_launch_shows_app_iframe(ehr: tuple[str, SmartAuthorizationServer]) -> None:
    issuer, server = ehr
    args = [*CHROMIUM_ARGS, *(["--no-sandbox"] if os.geteuid() == 0 else [])]
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=args)
        try:
            page = browser.new_page()
            page.goto(f"{issuer}/ehr")
            assert page.title() == "Sandbox EHR"
            page.get_by_label("Omar Haddad-Test").check()
            page.get_by_label("Kofi Mensah").check()
            page.get_by_role("button", name="Launch CareCanvas").click()
            frame = page.get_by_title("CareCanvas")
            frame.wait_for()
            src = frame.get_attribute("src")
            assert src is not None
            query = parse_qs(urlsplit(src).query)
            assert src.startswith(f"{issuer}/smart-style.json?")
            assert query["iss"] == [FHIR_BASE]
            launch = server.store.get_launch(query["launch"][0])
            assert launch is not None
            assert (launch.patient, launch.encounter, launch.fhir_user) == (
                "pat-2",
                "enc-2",
                "Practitioner/prac-2",
            )
            # The iframe really loaded the app URL.
            app_frame = next(f for f in page.frames if f.url.startswith(f"{issuer}/smart-style.json"))
            assert "color_background" in app_frame.content()
            # The choice stays selected after the launch (the form re-renders with it).
            assert page.get_by_label("Omar Haddad-Test").is_checked()
        finally:
            browser.close()


def test_launch_without_choice_is_blocked_by_the_form(ehr: tuple[str, SmartAuthorizationServer]) -> None:
    issuer, _server = ehr
    args = [*CHROMIUM_ARGS, *(["--no-sandbox"] if os.geteuid() == 0 else [])]
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=args)
        try:
            page = browser.new_page()
            page.goto(f"{issuer}/ehr")
            page.get_by_role("button", name="Launch CareCanvas").click()
            # `required` radios keep the browser on the page: no iframe, no navigation.
            assert page.url == f"{issuer}/ehr"
            assert page.get_by_title("CareCanvas").count() == 0
        finally:
            browser.close()


def test_page_file_is_plain_html_without_scripts() -> None:
    template = (Path(__file__).resolve().parents[2] / "sandbox" / "templates" / "ehr.html").read_text()
    assert "<script" not in template
