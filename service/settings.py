"""Settings for one CareCanvas process, built per app from CARECANVAS_* variables and an optional file."""

from __future__ import annotations

import json
from datetime import time
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ClientAuth = Literal["public", "client_secret_basic", "private_key_jwt"]


class EhrSettings(BaseModel):
    """One registered EHR: the launch `iss` must equal `iss` exactly or the launch is refused."""

    name: str
    iss: str
    client_id: str
    client_auth: ClientAuth = "public"
    client_secret: str | None = None
    private_key_file: Path | None = None
    key_id: str | None = None
    signing_alg: Literal["RS384", "ES384"] = "RS384"
    scopes: tuple[str, ...] = (
        "launch",
        "openid",
        "fhirUser",
        "online_access",
        "patient/Patient.rs",
        "patient/Condition.rs",
        "patient/Encounter.rs",
        "patient/DocumentReference.cruds",
        "patient/Provenance.cs",
        "patient/Device.cs",
        "patient/Binary.cr",
        # Create: the story intake form is written back as a QuestionnaireResponse.
        "patient/QuestionnaireResponse.crs",
        # "Give to patient": a Communication records that the handout was handed over.
        "patient/Communication.c",
        # Where organization_id is not set, the clinician's organization (US Core custodian) comes from it.
        "user/PractitionerRole.rs",
        # The signed-in clinician's own record (fhirUser), for their name on the handout and the document.
        "user/Practitioner.r",
    )
    # Origins allowed to frame the app (CSP frame-ancestors) and to host the SMART endpoints.
    frame_origins: tuple[str, ...] = ()
    auth_origins: tuple[str, ...] = ()
    organization_id: str | None = None
    accept_images: bool | None = None
    max_inline_bytes: int = 5_000_000
    # The largest request body this EHR (or the proxy in front of it) takes; a 413 or a 500 "too large"
    # lowers it for the process. Larger write-backs send their attachments as Binaries first.
    max_request_bytes: int = Field(default=1_000_000, ge=10_000)
    # This EHR's own connection pool (SMART and FHIR alike): a slow EHR fills only its own pool, and a
    # request that waits longer than `pool_wait_seconds` for a connection fails instead of queueing forever.
    max_connections: int = Field(default=8, ge=1, le=100)
    pool_wait_seconds: float = Field(default=5.0, gt=0, le=60)
    # Paper the hospital prints handouts on: US Letter, or A4 outside North America.
    handout_page_size: Literal["letter", "a4"] = "letter"
    # The clinic as its handouts name it (optional): a missing or unusable value (a phone that is not a
    # number, a logo that is not a readable PNG under 1 MB) is left off the handout, never an error.
    clinic_name: str | None = None
    clinic_phone: str | None = None
    clinic_logo_file: Path | None = None
    # private_key_jwt key rotation: PEM files, oldest first. All are published at /.well-known/jwks.json;
    # the last one signs. Each key's `kid` is its RFC 7638 thumbprint; RSA signs RS384, EC P-384 ES384.
    private_key_files: tuple[Path, ...] = ()
    # SMART Backend Services (client_credentials + private_key_jwt, signed with private_key_files) for
    # system work such as `carecanvas audit push`; None = no backend registration with this EHR.
    backend_client_id: str | None = None
    backend_scopes: tuple[str, ...] = ("system/AuditEvent.c",)
    # Scopes for the patient portal's standalone launch (`/portal/launch?ehr=<name>`); empty = no portal.
    portal_scopes: tuple[str, ...] = (
        "launch/patient",
        "openid",
        "fhirUser",
        "offline_access",
        "patient/Patient.rs",
        "patient/DocumentReference.rs",
        "patient/Binary.r",
    )


class StaffOidcSettings(BaseModel):
    """The organisation's identity provider for staff sign-in (the compliance console), like an EHR's.

    `role_claim` names the id_token claim holding the user's roles or groups (a dotted path such as
    `realm_access.roles` reaches into nested claims); a user whose claim lacks `compliance_role` is refused.
    """

    name: str = "staff-idp"
    issuer: str
    client_id: str
    client_auth: Literal["public", "client_secret_basic"] = "public"
    client_secret: str | None = None
    scopes: tuple[str, ...] = ("openid", "profile", "email", "groups")
    role_claim: str = "groups"
    compliance_role: str = "carecanvas-compliance"
    # Portrait reviewers by staff sign-in: an IdP role (in `role_claim`) to the reviewer role it gives,
    # e.g. {"portrait-artists": "artist"}. Empty (the default): no staff user reviews portraits.
    reviewer_roles: dict[str, Literal["artist", "clinician"]] = Field(default_factory=dict)
    # Origins the provider's endpoints may live on besides the issuer's own.
    auth_origins: tuple[str, ...] = ()


class Settings(BaseSettings):
    """Everything a process needs; nothing is read at import time."""

    model_config = SettingsConfigDict(env_prefix="CARECANVAS_", extra="ignore")

    data_dir: Path = Path(".carecanvas")
    database_url: str | None = None
    # The owner role's URL, read only by `carecanvas migrate` (serve and worker use database_url:
    # the app role).
    migration_database_url: str | None = None
    kek_file: Path | None = None
    # A keyring file in a mounted Kubernetes Secret (read-only; reloaded when the Secret changes).
    kek_secret_file: Path | None = None
    # Ed25519 PEM that signs audit checkpoints, apart from the keyring (`carecanvas audit keygen` makes one;
    # an embedded install makes its own on its first start). Verifiers need only the public key file.
    audit_signing_key_file: Path | None = None
    audit_verify_key_file: Path | None = None
    audit_checkpoint_path: Path | None = None
    # Optional: every checkpoint is also POSTed as JSON here (https, or http to loopback); the file stays.
    audit_checkpoint_url: str | None = None
    public_url: str = "http://127.0.0.1:8000"
    # The demo's sandbox EHR page, linked from the landing page (set by `carecanvas demo` only).
    demo_ehr_url: str | None = None
    ehrs: list[EhrSettings] = Field(default_factory=list)
    ehrs_file: Path | None = None
    # Staff sign-in (OIDC) for the compliance console; None = the console is switched off.
    staff_oidc: StaffOidcSettings | None = None
    models: list[dict[str, Any]] = Field(default_factory=list)
    models_file: Path | None = None
    default_model: str = "carecanvas-tiny-test"
    embedded_worker: bool = True
    migrate_on_start: bool = False
    worker_metrics_port: int = 9100
    device: Literal["auto", "cuda", "mps", "cpu"] = "auto"
    # "none", "blank-image" (built in) or "python:package.module:factory"; flags images for the reviewer.
    safety_classifier: str = "none"
    log_level: str = "INFO"
    session_minutes: int = 60
    # Expired sessions and spent launch states are deleted this often (and at start); 0 = only by the CLI.
    session_sweep_seconds: float = Field(default=300.0, ge=0)
    # Unfinished (queued or running) jobs one session / one user may have; more is refused with a clear page.
    max_queued_jobs_per_session: int = Field(default=24, ge=1)
    max_queued_jobs_per_user: int = Field(default=48, ge=1)
    # Token buckets per client address (behind a proxy, uvicorn's FORWARDED_ALLOW_IPS decides the address):
    # sign-ins (/launch, /portal/launch, /compliance/login) and job-creating POSTs (pages and API).
    # A rate of 0 switches that limit off.
    launch_rate_per_minute: float = Field(default=60.0, ge=0)
    launch_burst: int = Field(default=60, ge=1)
    job_post_rate_per_minute: float = Field(default=240.0, ge=0)
    job_post_burst: int = Field(default=120, ge=1)
    # /readyz writes a probe row and a probe file at most this often; the answer is reused in between.
    readiness_cache_seconds: float = Field(default=2.0, ge=0)
    readiness_timeout_seconds: float = Field(default=5.0, gt=0)
    # How long an EHR's CapabilityStatement (and the EhrProfile built from it) is reused before it is read
    # again; 0 reads it on every request that needs it.
    capabilities_max_age_seconds: float = Field(default=3600.0, ge=0)
    worker_batch_size: int = 8
    # Low-cost progress previews (latents mapped to RGB, no VAE) stored for the progress page.
    worker_previews: bool = True
    worker_batch_wait_ms: int = 20
    worker_poll_seconds: float = 0.2
    # Progress rows are written once per batch per this interval (the in-process feed is every step).
    worker_progress_interval_seconds: float = Field(default=0.5, ge=0)
    # A latent preview after the first step, then every this many steps (each is a device-to-host copy).
    worker_preview_every_steps: int = Field(default=4, ge=1)
    # Threads that PNG-encode, check and encrypt finished images; 0 = one per core, less one.
    worker_encode_threads: int = Field(default=0, ge=0)
    # torch's intra-op threads when generating on CPU; 0 = one fewer than this process's CPUs (at least 1),
    # so the pipeline never waits for a core the web or storage is using (service.generation.cpu_threads).
    worker_torch_threads: int = Field(default=0, ge=0)
    job_lease_seconds: int = 60
    job_max_attempts: int = 3
    # Tiny CPU defaults; a registry entry overrides these per model.
    image_size: int = 64
    image_steps: int = 2
    # The most pixels CareCanvas decodes in any image (handout, previews); more is refused from the header.
    max_image_pixels: int = Field(default=40_000_000, ge=1, le=89_478_485)
    secure_cookies: bool | None = None  # None: decided from public_url (https → secure)
    site_name: str = "carecanvas"
    # Portrait reviewers: fhirUser references (`Practitioner/prac-3`) to their role, "artist" or "clinician".
    # A launch by one of them opens the reviewer's queue of portrait drafts across patients.
    portrait_reviewers: dict[str, Literal["artist", "clinician"]] = Field(default_factory=dict)
    # Compliance reports (service.audit.reports): the after-hours window and "per day" are local to this zone.
    audit_report_timezone: str = "UTC"
    audit_after_hours_start: time = time(20, 0)
    audit_after_hours_end: time = time(7, 0)
    audit_many_patients_per_day: int = Field(default=20, ge=1, le=100_000)

    @field_validator("public_url")
    @classmethod
    def _no_trailing_slash(cls, value: str) -> str:
        return value.rstrip("/")

    @field_validator("audit_report_timezone")
    @classmethod
    def _known_timezone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {value!r} (use an IANA name like 'Europe/Berlin')") from None
        return value

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite+aiosqlite:///{(self.data_dir / 'carecanvas.db').resolve()}"

    @property
    def resolved_migration_database_url(self) -> str:
        """The owner role's URL for migrations (and owner-only work); the app's URL when none is set."""
        return self.migration_database_url or self.resolved_database_url

    @property
    def resolved_kek_file(self) -> Path:
        return self.kek_file or self.data_dir / "keys.json"

    @property
    def resolved_audit_signing_key_file(self) -> Path:
        return self.audit_signing_key_file or self.data_dir / "audit-signing-key.pem"

    @property
    def resolved_checkpoint_path(self) -> Path:
        return self.audit_checkpoint_path or self.data_dir / "audit-checkpoints.jsonl"

    @property
    def tiny_model_dir(self) -> Path:
        return self.data_dir / "models" / "carecanvas-tiny-test"

    @property
    def cookies_secure(self) -> bool:
        if self.secure_cookies is not None:
            return self.secure_cookies
        return self.public_url.startswith("https://")

    def registered_ehrs(self) -> list[EhrSettings]:
        """Registrations from settings plus the optional JSON file (the Helm chart mounts one)."""
        ehrs = list(self.ehrs)
        if self.ehrs_file is not None:
            raw = json.loads(self.ehrs_file.read_text(encoding="utf-8"))
            ehrs.extend(EhrSettings.model_validate(item) for item in raw)
        return ehrs

    def model_entries(self) -> list[dict[str, Any]]:
        entries = list(self.models)
        if self.models_file is not None:
            entries.extend(json.loads(self.models_file.read_text(encoding="utf-8")))
        if not any(entry.get("name") == "carecanvas-tiny-test" for entry in entries):
            entries.append(
                {
                    "name": "carecanvas-tiny-test",
                    "version": "tiny-1",
                    "path": str(self.tiny_model_dir),
                    "pipeline_class": "StableDiffusionPipeline",
                    "default_width": self.image_size,
                    "default_height": self.image_size,
                    "default_steps": self.image_steps,
                    "default_guidance": 1.0,
                    "is_test_model": True,
                    "licence": "Random weights built offline by CareCanvas; images are noise.",
                }
            )
        return entries
