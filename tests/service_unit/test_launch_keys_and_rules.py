"""Our private_key_jwt keys and client assertions, fhirUser roles, EHR style values, the cross-site check."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from joserfc import jwk, jwt
from joserfc.errors import JoseError
from starlette.requests import Request

from fhir_adapters import SmartConfiguration
from fhir_adapters.smart import client_assertion
from service.ehrs import EhrRegistry, load_signing_key
from service.settings import EhrSettings, Settings
from service.web.routes_launch import _readable_oauth_error
from service.web.security import cross_site_reason
from service.workflows.launch import (
    LaunchUserError,
    role_for,
    safe_style,
    style_css,
    style_fetch_allowed,
)

TOKEN_ENDPOINT = "https://auth.ehr.example/token"


def pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


@pytest.fixture(scope="module")
def key_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("keys")
    keys = {
        "rsa": rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "ec384": ec.generate_private_key(ec.SECP384R1()),
        "ec256": ec.generate_private_key(ec.SECP256R1()),
        "rsa1024": rsa.generate_private_key(public_exponent=65537, key_size=1024),  # noqa: S505 - refused
    }
    files = {name: folder / f"{name}.pem" for name in keys}
    for name, key in keys.items():
        files[name].write_bytes(pem(key))
    files["public"] = folder / "public.pem"
    files["public"].write_bytes(
        keys["rsa"]
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    files["garbage"] = folder / "garbage.pem"
    files["garbage"].write_text("-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n")
    files["missing"] = folder / "missing.pem"
    return files


def registry(key_files: dict[str, Path], *names: str) -> tuple[EhrRegistry, EhrSettings]:
    ehr = EhrSettings(
        name="ehr",
        iss="https://fhir.ehr.example/r4",
        client_id="carecanvas-client",
        client_auth="private_key_jwt",
        private_key_files=tuple(key_files[name] for name in names),
    )
    return EhrRegistry([ehr], redirect_uri="https://carecanvas.example/callback"), ehr


def config() -> SmartConfiguration:
    return SmartConfiguration(
        fhir_base="https://fhir.ehr.example/r4",
        issuer="https://auth.ehr.example",
        authorization_endpoint="https://auth.ehr.example/authorize",
        token_endpoint=TOKEN_ENDPOINT,
        jwks_uri="https://auth.ehr.example/jwks",
        capabilities=(),
        code_challenge_methods_supported=("S256",),
    )


# ---- keys --------------------------------------------------------------------------------------------


def test_rsa_and_ec_p384_keys_load_with_their_algorithm_and_thumbprint_kid(
    key_files: dict[str, Path],
) -> None:
    rsa_key = load_signing_key(key_files["rsa"])
    ec_key = load_signing_key(key_files["ec384"])
    assert (rsa_key.alg, ec_key.alg) == ("RS384", "ES384")
    assert rsa_key.kid == jwk.import_key(key_files["rsa"].read_text(), "RSA").thumbprint()
    assert rsa_key.kid != ec_key.kid
    assert "d" not in rsa_key.public_jwk
    assert "d" not in ec_key.public_jwk
    assert "PRIVATE" not in repr(rsa_key)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("ec256", "P-384"),
        ("rsa1024", "2048"),
        ("public", "private key"),
        ("garbage", "private key"),
        ("missing", "cannot be read"),
    ],
)
def test_unusable_key_files_are_refused_with_a_clear_reason(
    key_files: dict[str, Path], name: str, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        load_signing_key(key_files[name])


def test_private_key_jwt_without_keys_stops_the_app_at_start() -> None:
    ehr = EhrSettings(
        name="ehr", iss="https://fhir.ehr.example/r4", client_id="c", client_auth="private_key_jwt"
    )
    with pytest.raises(ValueError, match="needs private_key_files"):
        EhrRegistry([ehr], redirect_uri="https://carecanvas.example/callback")


def test_legacy_single_key_file_keeps_its_key_id_and_must_fit_signing_alg(key_files: dict[str, Path]) -> None:
    ehr = EhrSettings(
        name="ehr",
        iss="https://fhir.ehr.example/r4",
        client_id="c",
        client_auth="private_key_jwt",
        private_key_file=key_files["rsa"],
        key_id="our-key-2025",
    )
    registration = EhrRegistry([ehr], redirect_uri="https://x.example/callback").registration(ehr)
    assert registration.key_id == "our-key-2025"
    mismatched = ehr.model_copy(update={"private_key_file": key_files["ec384"]})
    with pytest.raises(ValueError, match="does not fit"):
        EhrRegistry([mismatched], redirect_uri="https://x.example/callback")


def test_rotation_publishes_every_key_and_the_newest_signs(key_files: dict[str, Path]) -> None:
    ehrs, ehr = registry(key_files, "rsa", "ec384")
    published = ehrs.public_jwks()["keys"]
    old, new = load_signing_key(key_files["rsa"]), load_signing_key(key_files["ec384"])
    assert [key["kid"] for key in published] == [old.kid, new.kid]
    registration = ehrs.registration(ehr)
    assert (registration.key_id, registration.signing_alg) == (new.kid, "ES384")
    reversed_ehrs, reversed_ehr = registry(key_files, "ec384", "rsa")
    assert reversed_ehrs.registration(reversed_ehr).signing_alg == "RS384"


def test_the_same_key_in_two_registrations_is_published_once(key_files: dict[str, Path]) -> None:
    first = EhrSettings(
        name="a", iss="https://a.example/fhir", client_id="a", client_auth="private_key_jwt",
        private_key_files=(key_files["rsa"],),
    )  # fmt: skip
    second = first.model_copy(update={"name": "b", "iss": "https://b.example/fhir"})
    ehrs = EhrRegistry([first, second], redirect_uri="https://x.example/callback")
    assert len(ehrs.public_jwks()["keys"]) == 1


@pytest.mark.parametrize("newest", ["rsa", "ec384"])
def test_client_assertion_claims_and_signature_check_against_our_jwks(
    key_files: dict[str, Path], newest: str
) -> None:
    ehrs, ehr = registry(key_files, "ec384" if newest == "rsa" else "rsa", newest)
    registration = ehrs.registration(ehr)
    before = int(time.time())
    first = client_assertion(registration=registration, audience=TOKEN_ENDPOINT)
    second = client_assertion(registration=registration, audience=TOKEN_ENDPOINT)
    published = jwk.KeySet.import_key_set(ehrs.public_jwks())  # type: ignore[arg-type]
    decoded = jwt.decode(first, published, algorithms=[registration.signing_alg])
    assert decoded.header["alg"] == registration.signing_alg
    assert decoded.header["kid"] == load_signing_key(key_files[newest]).kid
    claims = decoded.claims
    assert claims["iss"] == claims["sub"] == "carecanvas-client"
    assert claims["aud"] == TOKEN_ENDPOINT
    assert before <= claims["iat"] <= int(time.time())
    assert 0 < claims["exp"] - claims["iat"] <= 300
    assert claims["jti"]
    assert claims["jti"] != jwt.decode(second, published, algorithms=[registration.signing_alg]).claims["jti"]
    stranger = jwk.import_key(pem(ec.generate_private_key(ec.SECP384R1())), "EC")
    stranger_rsa = jwk.import_key(pem(rsa.generate_private_key(public_exponent=65537, key_size=2048)), "RSA")
    other = jwk.KeySet([stranger, stranger_rsa])
    with pytest.raises(JoseError):
        jwt.decode(first, other, algorithms=[registration.signing_alg])


# ---- roles -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "fhir_user", "patient", "role"),
    [
        ("ehr", "https://fhir.example/r4/Practitioner/prac-1", "pat-1", "clinician"),
        ("ehr", "PractitionerRole/role-1", "pat-1", "clinician"),
        ("portal", "https://fhir.example/r4/Patient/pat-1", "pat-1", "patient"),
        ("portal", "RelatedPerson/rp-1", "pat-1", "related-person"),
    ],
)
def test_fhir_user_maps_to_a_role(kind: str, fhir_user: str, patient: str, role: str) -> None:
    assert role_for(kind=kind, fhir_user=fhir_user, patient=patient) == role  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kind", "fhir_user", "patient", "message"),
    [
        ("ehr", None, "pat-1", "did not say who signed in"),
        ("ehr", "Device/dev-1", "pat-1", "did not say who signed in"),
        ("ehr", "Patient/pat-1", "pat-1", "for clinicians"),
        ("portal", "Practitioner/prac-1", "pat-1", "for patients"),
        ("portal", "Patient/pat-1", None, "which patient"),
        ("portal", "Patient/pat-2", "pat-1", "not the patient"),
    ],
)
def test_fhir_users_that_do_not_fit_the_launch_are_refused(
    kind: str, fhir_user: str | None, patient: str | None, message: str
) -> None:
    with pytest.raises(LaunchUserError, match=message):
        role_for(kind=kind, fhir_user=fhir_user, patient=patient)  # type: ignore[arg-type]


# ---- EHR style ------------------------------------------------------------------------------------------


def test_hostile_style_values_are_dropped_and_safe_ones_kept() -> None:
    style = safe_style(
        {
            "color_background": "#f5f7fa",
            "color_text": "red; } body { background: url(https://evil.example/x) }",
            "color_highlight": "rgba(11, 92, 173, 0.5)",
            "dim_font_size": "16px",
            "dim_border_radius": "expression(alert(1))",
            "font_family_body": 'system-ui, -apple-system, "Segoe UI", sans-serif',
            "font_family_heading": "x</style><script>alert(1)</script>",
            "color_unknown": "#000",
        }
    )
    assert style == {
        "color_background": "#f5f7fa",
        "color_highlight": "rgba(11, 92, 173, 0.5)",
        "dim_font_size": "16px",
        "font_family_body": 'system-ui, -apple-system, "Segoe UI", sans-serif',
    }
    assert safe_style(["not", "a", "dict"]) == {}
    css = style_css({**style, "color_text": "red;}"})
    assert "--smart-color-background: #f5f7fa;" in css
    assert "red" not in css
    assert "--smart" not in style_css({})


def test_style_is_fetched_only_from_the_ehrs_own_origins(key_files: dict[str, Path]) -> None:
    ehrs, ehr = registry(key_files, "rsa")
    registration = ehrs.registration(ehr)
    allowed = {
        "https://fhir.ehr.example/style.json": True,
        "https://auth.ehr.example/smart-style.json": True,
        "https://evil.example/style.json": False,
        "http://fhir.ehr.example/style.json": False,  # downgrade
        "https://fhir.ehr.example@evil.example/style.json": False,
        "http://169.254.169.254/latest/meta-data": False,
        "file:///etc/passwd": False,
    }
    for url, expected in allowed.items():
        assert style_fetch_allowed(url, registration=registration, config=config()) is expected, url


# ---- cross-site requests and shown OAuth errors ------------------------------------------------------------


def request(method: str, headers: dict[str, str]) -> Request:
    raw = [(name.lower().encode(), value.encode()) for name, value in headers.items()]
    return Request({"type": "http", "method": method, "headers": raw, "path": "/", "query_string": b""})


@pytest.mark.parametrize(
    ("method", "headers", "reason"),
    [
        ("POST", {"Origin": "https://carecanvas.example"}, None),
        ("POST", {"Origin": "https://CareCanvas.example", "Sec-Fetch-Site": "same-origin"}, None),
        ("POST", {}, None),  # not a browser: the CSRF token still has to match
        ("POST", {"Origin": "https://carecanvas.example.evil.test"}, "origin"),
        ("POST", {"Origin": "http://carecanvas.example"}, "origin"),
        ("POST", {"Origin": "null"}, "origin"),  # a sandboxed frame or an old browser
        ("POST", {"Origin": "null", "Sec-Fetch-Site": "same-origin"}, None),  # our page, no-referrer policy
        ("POST", {"Origin": "null", "Sec-Fetch-Site": "none"}, "origin"),
        ("POST", {"Origin": "https://evil.example", "Sec-Fetch-Site": "same-origin"}, "origin"),
        ("POST", {"Sec-Fetch-Site": "cross-site", "Origin": "https://carecanvas.example"}, "sec-fetch-site"),
        ("DELETE", {"Sec-Fetch-Site": "same-site"}, "sec-fetch-site"),
        ("GET", {"Origin": "https://evil.example", "Sec-Fetch-Site": "cross-site"}, None),
    ],
)
def test_cross_site_reason(method: str, headers: dict[str, str], reason: str | None) -> None:
    settings = Settings(public_url="https://carecanvas.example")
    assert cross_site_reason(request(method, headers), settings) == reason


def test_oauth_errors_are_shown_short_and_clean() -> None:
    assert _readable_oauth_error("access_denied", "User said no") == "User said no (access_denied)"
    assert _readable_oauth_error("<script>", None) == "an unknown error"
    shown = _readable_oauth_error("invalid_scope", "bad\u202escope\x00" + "x" * 1000)
    assert "\u202e" not in shown
    assert "\x00" not in shown
    assert len(shown) < 400
