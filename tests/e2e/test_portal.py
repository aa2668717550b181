"""The patient portal: standalone launch (`launch/patient`), the patient's approved pictures, audited."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from harness import (
    AXE,
    CONDITION,
    RunningApp,
    csrf_from,
    launch_chromium,
    launch_session,
    new_page,
    no_sideways_scroll,
    serious_violations,
    wait_for_job,
)
from playwright.sync_api import expect, sync_playwright
from sqlalchemy import func, select

from sandbox.run import SandboxEHR
from service.db.models import AuditRecord

ALT_TEXT = "Drawing for the portal test."
CAPTION = "A picture about your health for the portal."
DOCUMENT_ID = re.compile(r"/portal/documents/([A-Za-z0-9\-.]+)/png")


@contextlib.contextmanager
def portal_session(app_url: str, sandbox: SandboxEHR, *, patient: str) -> Iterator[httpx.Client]:
    """Standalone launch over HTTP: /portal/launch → authorize (patient picked) → /callback → /portal."""
    with httpx.Client(base_url=app_url, follow_redirects=False, timeout=30) as client:
        started = client.get("/portal/launch", params={"ehr": "sandbox"})
        assert started.status_code == 302, started.text
        authorize_url = httpx.URL(started.headers["location"])
        assert "launch/patient" in authorize_url.params["scope"].split()
        assert "launch" not in authorize_url.params  # standalone: no EHR launch id
        # What the sandbox's patient picker form submits when the patient chooses themself.
        picked = httpx.get(
            authorize_url.copy_add_param("selected_patient", patient), follow_redirects=False, timeout=30
        )
        assert picked.status_code in (302, 303), picked.text
        callback = httpx.URL(picked.headers["location"])
        finished = client.get(callback.path + "?" + callback.query.decode())
        assert finished.status_code == 303, finished.text
        assert finished.headers["location"] == "/portal"
        yield client


def portal_views(app: RunningApp) -> int:
    async def count() -> int:
        async with app.services.sessionmaker() as db:
            query = select(func.count()).select_from(AuditRecord).where(AuditRecord.action == "portal.view")
            return int((await db.execute(query)).scalar_one())

    return app.call(count())  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def approved_document(sandbox: SandboxEHR, carecanvas: RunningApp) -> str:
    """A clinician makes and approves a picture for pat-1; returns the FHIR DocumentReference id."""
    with launch_session(carecanvas.url, sandbox, patient="pat-1") as client:
        workspace = client.get("/app")
        csrf = csrf_from(workspace.text)
        created = client.post(
            "/illustrations",
            data={
                "condition_id": CONDITION.findall(workspace.text)[0],
                "style": "flat_vector",
                "language": "en",
                "csrf_token": csrf,
            },
        )
        job_id = created.headers["location"].rsplit("/", 1)[1]
        assert wait_for_job(client, job_id)["status"] == "succeeded"
        approved = client.post(
            f"/review/{job_id}/approve", data={"caption": CAPTION, "alt_text": ALT_TEXT, "csrf_token": csrf}
        )
        assert approved.status_code == 200, approved.text
        match = re.search(r"<code>([A-Za-z0-9\-.]+)</code>", approved.text)
        assert match, "the approved page names the document"
        return match.group(1)


def test_portal_shows_the_patients_approved_pictures(
    sandbox: SandboxEHR, carecanvas: RunningApp, approved_document: str
) -> None:
    views_before = portal_views(carecanvas)
    with portal_session(carecanvas.url, sandbox, patient="pat-1") as client:
        page = client.get("/portal")
        assert page.status_code == 200
        assert approved_document in DOCUMENT_ID.findall(page.text)
        assert f'alt="{ALT_TEXT}"' in page.text
        # Maria Rivera prefers Spanish (Patient.communication): the page speaks it; the picture is English.
        assert '<html lang="es" dir="ltr">' in page.text
        assert "Idioma: English" in page.text
        assert "Imágenes de su equipo de salud" in page.text
        assert re.search(r'data-testid="portal-patient-name">Maria [^<]*Rivera<', page.text)
        assert 'data-testid="portal-sign-out">Cerrar sesión<' in page.text
        assert f'data-testid="portal-caption">{CAPTION}<' in page.text  # the caption the clinician approved
        assert '<link rel="stylesheet" href="/style.css">' in page.text
        image = client.get(f"/portal/documents/{approved_document}/png")
        assert image.status_code == 200
        assert image.headers["content-type"] == "image/png"
        assert image.content.startswith(b"\x89PNG")
        handout = client.get(f"/portal/documents/{approved_document}/pdf")
        assert handout.status_code == 200
        assert handout.headers["content-type"] == "application/pdf"
        assert handout.content.startswith(b"%PDF")
        # Saved on the patient's phone, the file says what it is (not carecanvas-handout.pdf for all).
        disposition = handout.headers["content-disposition"]
        assert re.fullmatch(r'inline; filename="handout-[a-z0-9-]+-\d{4}-\d\d-\d\d\.pdf"', disposition)
        assert "--smart-color-background" in client.get("/style.css").text
    assert portal_views(carecanvas) == views_before + 3  # the list, the picture, the handout


def test_portal_speaks_english_to_a_patient_whose_language_it_lacks_and_arabic_right_to_left() -> None:
    from service.workflows.portal_text import portal_language, portal_words

    def patient(*codes: str) -> dict[str, object]:
        return {"communication": [{"language": {"coding": [{"code": code}]}} for code in codes]}

    assert portal_words(patient("de")).lang == "en"  # German is not offered: English, not an error
    assert portal_words(patient("de", "vi")).lang == "vi"  # the first language it has
    arabic = portal_words(patient("ar-SA"))
    assert (arabic.lang, arabic.direction) == ("ar", "rtl")
    assert (portal_language("zh-CN"), portal_language("zh-Hant-TW"), portal_language("fil")) == (
        "zh-Hans",
        None,
        "tl",
    )
    assert portal_words(None).lang == "en"


def test_another_patient_sees_none_of_it(
    sandbox: SandboxEHR, carecanvas: RunningApp, approved_document: str
) -> None:
    views_before = portal_views(carecanvas)
    with portal_session(carecanvas.url, sandbox, patient="pat-2") as client:
        page = client.get("/portal")
        assert page.status_code == 200
        assert approved_document not in page.text
        for kind in ("png", "pdf"):
            refused = client.get(f"/portal/documents/{approved_document}/{kind}")
            assert refused.status_code == 403
            assert not refused.content.startswith((b"\x89PNG", b"%PDF"))
    assert portal_views(carecanvas) == views_before + 3  # the (empty) list and the two refused attempts


def test_portal_and_clinician_sessions_stay_apart(sandbox: SandboxEHR, carecanvas: RunningApp) -> None:
    with portal_session(carecanvas.url, sandbox, patient="pat-1") as patient:
        assert patient.get("/app").status_code == 403
        csrf_less = patient.post("/illustrations", data={"condition_id": "cond-1-diabetes"})
        assert csrf_less.status_code in (403, 422)
    with launch_session(carecanvas.url, sandbox) as clinician:
        assert clinician.get("/portal").status_code == 403


def test_portal_launch_refuses_unknown_ehrs_and_missing_sessions(carecanvas: RunningApp) -> None:
    unknown = httpx.get(f"{carecanvas.url}/portal/launch", params={"ehr": "not-registered"}, timeout=30)
    assert unknown.status_code == 404
    # Written for a patient: no EHR jargon, no pointer at the project's docs.
    assert "ask your care team" in unknown.text
    assert "docs/" not in unknown.text
    # Without ?ehr= the one EHR with a portal is used: the patient goes straight to its sign-in.
    only_one = httpx.get(f"{carecanvas.url}/portal/launch", timeout=30)
    assert only_one.status_code == 302
    assert "/authorize?" in only_one.headers["location"]
    anonymous = httpx.get(f"{carecanvas.url}/portal", timeout=30)
    assert anonymous.status_code == 401
    assert "location" not in anonymous.headers
    assert "open them from your patient portal" in anonymous.text
    assert "chart in your EHR" not in anonymous.text
    unknown_kind = httpx.get(f"{carecanvas.url}/portal/documents/doc-1/exe", timeout=30)
    assert unknown_kind.status_code == 401  # no session: nothing is looked at


def test_portal_files_need_a_valid_document_id_and_kind(sandbox: SandboxEHR, carecanvas: RunningApp) -> None:
    with portal_session(carecanvas.url, sandbox, patient="pat-1") as client:
        assert client.get("/portal/documents/doc-1/exe").status_code == 404
        assert client.get("/portal/documents/not%20an%20id/png").status_code == 404
        assert client.get("/portal/documents/does-not-exist/png").status_code == 404


@pytest.mark.browser
@pytest.mark.parametrize(("width", "height"), [(390, 844), (1280, 800)])
def test_a_patient_reads_the_portal_on_a_phone_and_a_desktop(
    sandbox: SandboxEHR, carecanvas: RunningApp, approved_document: str, width: int, height: int
) -> None:
    assert AXE.exists(), "axe-core is missing: run scripts/bootstrap"
    with sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        try:
            # bypass_csp only so axe-core can be injected; the pages themselves run under the real CSP.
            page = new_page(browser, width=width, height=height)
            page.goto(f"{carecanvas.url}/portal/launch")  # no ?ehr=: the one portal there is
            page.get_by_role("button", name=re.compile("Maria")).click()  # the sandbox's sign-in picker
            page.wait_for_url(f"{carecanvas.url}/portal")
            card = page.locator(f'[data-testid="portal-document"]:has(img[src*="{approved_document}"])')
            image = card.locator("img")
            expect(image).to_be_visible()
            image_box, card_box = image.bounding_box(), card.bounding_box()
            assert image_box is not None
            assert card_box is not None
            assert image_box["x"] >= card_box["x"] - 0.5  # the picture fits its card
            assert image_box["x"] + image_box["width"] <= card_box["x"] + card_box["width"] + 0.5
            assert no_sideways_scroll(page)
            # No stray bullet and no list indent: the first card starts where its list does (at 1280 px
            # the grid has columns, so the approved card may sit in another one when others came first).
            assert card.evaluate("e => getComputedStyle(e).listStyleType") == "none"
            list_box = page.locator("ul.portal-documents").bounding_box()
            first_box = page.locator('[data-testid="portal-document"]').first.bounding_box()
            assert list_box is not None
            assert first_box is not None
            assert abs(first_box["x"] - list_box["x"]) <= 0.5
            for target in (card.get_by_test_id("portal-handout"), page.get_by_test_id("portal-sign-out")):
                box = target.bounding_box()
                assert box is not None
                assert box["height"] >= 44
                assert box["width"] >= 44
            assert serious_violations(page) == []
            shots = Path(__file__).resolve().parents[2] / "docs" / "screenshots"
            shots.mkdir(exist_ok=True)
            name = "portal-phone.png" if width == 390 else "portal-desktop.png"
            page.screenshot(path=str(shots / name), full_page=False)
            page.get_by_test_id("portal-sign-out").click()
            expect(page.get_by_test_id("signed-out")).to_be_visible()
            assert serious_violations(page) == []
        finally:
            browser.close()
