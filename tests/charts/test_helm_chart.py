"""Lints and renders charts/carecanvas with Helm's Go SDK; validates manifests against Kubernetes schemas."""

from __future__ import annotations

import base64
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
CHART_DIR = REPO_ROOT / "charts" / "carecanvas"
CRD_SCHEMA_DIR = Path(__file__).parent / "crd_schemas"
RELEASE = "cc"
NAMESPACE = "carecanvas"
# The chart declares kubeVersion >=1.29; check the oldest supported and the newest schemas shipped.
KUBERNETES_VERSIONS = ("1.29", kubernetes_validate.utils.latest_version())
CRD_SCHEMA_FILES = {
    ("keda.sh/v1alpha1", "ScaledObject"): "scaledobject-keda-v1alpha1.json",
    ("keda.sh/v1alpha1", "TriggerAuthentication"): "triggerauthentication-keda-v1alpha1.json",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor-monitoring-v1.json",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "prometheusrule-monitoring-v1.json",
}

# Distinctive stand-ins for every kind of secret the chart accepts, so a leak is unmistakable.
SECRET_MARKERS = {
    "database password": "pw-7f3a9c1e-not-for-configmaps",
    "migration database password": "owner-pw-4c2e9d70-not-for-configmaps",
    "kek keyring": "kek-5b2d8e44-not-for-configmaps",
    "audit signing key": "ed25519-9c0ffee1-not-for-configmaps",
    "ehr private key": "rsa-31d4c0de-not-for-configmaps",
    "ehr client secret": "cs-8badf00d-not-for-configmaps",
    "keda connection": "keda-6e1f2a3b-not-for-configmaps",
}


def load_values(name: str) -> dict[str, Any]:
    return yaml.safe_load((CHART_DIR / "ci" / name).read_text(encoding="utf-8"))


def merged(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    result = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(result.get(key), dict):
            result[key] = merged(result[key], value)
        else:
            result[key] = value
    return result


@pytest.fixture(scope="module")
def chart() -> Iterator[helm.Chart]:
    helm.disable_logging()
    with helm.Chart.load(CHART_DIR) as loaded:
        yield loaded


def render(chart: helm.Chart, values: dict[str, Any]) -> list[dict[str, Any]]:
    """Every object an install would create (hooks included), NOTES.txt left out."""
    manifests = chart.render(values=values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    objects: list[dict[str, Any]] = []
    for template, text in sorted(manifests.items()):
        if template.endswith("NOTES.txt"):
            continue
        objects.extend(document for document in yaml.safe_load_all(text) if document)
    return objects


def find(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    matches = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind}/{name}, found {len(matches)}"
    return matches[0]


def validate_object(document: dict[str, Any]) -> None:
    crd_schema = CRD_SCHEMA_FILES.get((document["apiVersion"], document["kind"]))
    if crd_schema is not None:
        schema = json.loads((CRD_SCHEMA_DIR / crd_schema).read_text(encoding="utf-8"))
        jsonschema.Draft7Validator(schema).validate(document)
        return
    for version in KUBERNETES_VERSIONS:
        # strict: additional (misspelt) properties anywhere in the object are errors.
        kubernetes_validate.validate(document, version, strict=True)


def pod_specs(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    specs: dict[str, dict[str, Any]] = {}
    for o in objects:
        if o["kind"] in ("Deployment", "Job"):
            specs[f"{o['kind']}/{o['metadata']['name']}"] = o["spec"]["template"]["spec"]
        elif o["kind"] == "CronJob":
            specs[f"CronJob/{o['metadata']['name']}"] = o["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return specs


def secret_values_full() -> dict[str, Any]:
    values = load_values("full-values.yaml")
    values["secrets"] = merged(
        values["secrets"],
        {
            "databaseUrl": "postgresql+psycopg://carecanvas:"
            f"{SECRET_MARKERS['database password']}@db.hospital.example:5432/carecanvas",
            "migrationDatabaseUrl": "postgresql+psycopg://carecanvas_owner:"
            f"{SECRET_MARKERS['migration database password']}@db.hospital.example:5432/carecanvas",
            "kekKeyring": json.dumps({"primary": "k2", "keys": {"k2": SECRET_MARKERS["kek keyring"]}}),
            "auditSigningKey": "-----BEGIN PRIVATE KEY-----\n" + SECRET_MARKERS["audit signing key"],
            "ehrPrivateKeys": {
                "epic-prod": f"-----BEGIN PRIVATE KEY-----\n{SECRET_MARKERS['ehr private key']}"
            },
            "ehrClientSecrets": {"legacy": SECRET_MARKERS["ehr client secret"]},
        },
    )
    values["keda"] = merged(
        values["keda"],
        {"connection": f"postgresql://keda:{SECRET_MARKERS['keda connection']}@db.hospital.example/cc"},
    )
    return values


# --- lint -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("values_file", [None, "existing-secrets-values.yaml", "full-values.yaml"])
def test_lint_passes_strictly(values_file: str | None) -> None:
    values = load_values(values_file) if values_file else None
    report = helm.lint(CHART_DIR, values, strict=True, namespace=NAMESPACE, kube_version="v1.29.0")
    assert report["total_charts_linted"] == 1
    assert report["errors"] == []
    # Severity 2 is a warning, 3 an error; only the "icon is recommended" info may remain.
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


def test_lint_reports_values_the_schema_rejects() -> None:
    report = helm.lint(CHART_DIR, {"api": {"replicas": "two"}}, strict=True)
    assert any("/api/replicas" in error for error in report["errors"]), report


# --- render and validate --------------------------------------------------------------------------


def test_default_render_validates(chart: helm.Chart) -> None:
    objects = render(chart, load_values("existing-secrets-values.yaml"))
    for document in objects:
        validate_object(document)
    kinds = sorted({o["kind"] for o in objects})
    assert kinds == [
        "ConfigMap",
        "Deployment",
        "HorizontalPodAutoscaler",
        "Job",
        "NetworkPolicy",
        "PersistentVolumeClaim",
        "PodDisruptionBudget",
        "Service",
        "ServiceAccount",
    ]
    # Existing Secrets are referenced, not created.
    api = find(objects, "Deployment", f"{RELEASE}-carecanvas-api")["spec"]["template"]["spec"]
    assert {"secretRef": {"name": "carecanvas-env"}} in api["containers"][0]["envFrom"]
    files_volume = next(v for v in api["volumes"] if v["name"] == "secret-files")
    assert files_volume["secret"]["secretName"] == "carecanvas-files"


def test_render_with_keda_servicemonitor_and_ingress_validates(chart: helm.Chart) -> None:
    objects = render(chart, load_values("full-values.yaml"))
    for document in objects:
        validate_object(document)
    fullname = f"{RELEASE}-carecanvas"

    scaled = find(objects, "ScaledObject", f"{fullname}-worker")
    assert scaled["spec"]["scaleTargetRef"]["name"] == f"{fullname}-worker"
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "postgresql"
    assert trigger["metadata"]["query"] == "SELECT count(*) FROM jobs WHERE status='queued'"
    assert trigger["metadata"]["targetQueryValue"] == "8"
    auth = find(objects, "TriggerAuthentication", trigger["authenticationRef"]["name"])
    assert auth["spec"]["secretTargetRef"] == [
        {"parameter": "connection", "name": f"{fullname}-keda", "key": "connection"}
    ]
    # KEDA's pgx driver cannot read SQLAlchemy's "+psycopg" URLs: the chart strips the driver suffix.
    keda_secret = find(objects, "Secret", f"{fullname}-keda")
    connection = base64.b64decode(keda_secret["data"]["connection"]).decode()
    assert connection.startswith("postgresql://carecanvas:")
    assert "+psycopg" not in connection

    # KEDA owns the worker's replica count; the HPA owns the API's.
    assert "replicas" not in find(objects, "Deployment", f"{fullname}-worker")["spec"]
    assert "replicas" not in find(objects, "Deployment", f"{fullname}-api")["spec"]

    monitors = {o["metadata"]["name"]: o for o in objects if o["kind"] == "ServiceMonitor"}
    assert set(monitors) == {f"{fullname}-api", f"{fullname}-worker"}
    assert monitors[f"{fullname}-api"]["spec"]["endpoints"][0]["port"] == "http"
    assert monitors[f"{fullname}-worker"]["spec"]["endpoints"][0]["port"] == "metrics"
    assert monitors[f"{fullname}-api"]["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    worker_metrics = find(objects, "Service", f"{fullname}-worker-metrics")
    assert worker_metrics["spec"]["ports"][0]["port"] == 9100

    ingress = find(objects, "Ingress", fullname)
    assert ingress["spec"]["tls"] == [
        {"hosts": ["carecanvas.hospital.example"], "secretName": "carecanvas-tls"}
    ]
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": f"{fullname}-api", "port": {"name": "http"}}

    cronjob = find(objects, "CronJob", f"{fullname}-audit-verify")
    container = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] + container["args"] == ["carecanvas", "audit", "verify"]


def test_crd_schemas_reject_a_malformed_scaled_object(chart: helm.Chart) -> None:
    objects = render(chart, load_values("full-values.yaml"))
    scaled = find(objects, "ScaledObject", f"{RELEASE}-carecanvas-worker")
    # KEDA requires string trigger metadata; an integer target must not pass.
    scaled["spec"]["triggers"][0]["metadata"]["targetQueryValue"] = 8
    with pytest.raises(jsonschema.ValidationError):
        validate_object(scaled)


def test_kubernetes_validation_catches_a_misspelt_field(chart: helm.Chart) -> None:
    objects = render(chart, load_values("existing-secrets-values.yaml"))
    deployment = find(objects, "Deployment", f"{RELEASE}-carecanvas-worker")
    deployment["spec"]["template"]["spec"]["nodeSelecter"] = {"gpu": "true"}
    with pytest.raises(kubernetes_validate.utils.ValidationError):
        validate_object(deployment)


# --- workers --------------------------------------------------------------------------------------


def test_worker_requests_one_gpu_and_runs_on_gpu_nodes(chart: helm.Chart) -> None:
    objects = render(chart, load_values("existing-secrets-values.yaml"))
    worker = find(objects, "Deployment", f"{RELEASE}-carecanvas-worker")["spec"]["template"]["spec"]
    (container,) = worker["containers"]
    assert container["command"] + container["args"] == ["carecanvas", "worker"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert container["resources"]["requests"]["nvidia.com/gpu"] == "1"
    assert worker["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in worker["tolerations"]
    # Model loading may take many minutes: the startup probe must allow at least ten.
    startup = container["startupProbe"]
    assert startup["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600
    assert {"name": "metrics", "containerPort": 9100, "protocol": "TCP"} in container["ports"]
    models_mount = next(m for m in container["volumeMounts"] if m["name"] == "models")
    assert models_mount == {"name": "models", "mountPath": "/models", "readOnly": True}
    models_volume = next(v for v in worker["volumes"] if v["name"] == "models")
    assert models_volume["persistentVolumeClaim"]["readOnly"] is True
    # The API never gets a GPU.
    api = find(objects, "Deployment", f"{RELEASE}-carecanvas-api")["spec"]["template"]["spec"]
    assert "nvidia.com/gpu" not in json.dumps(api["containers"][0]["resources"])


def test_worker_gpu_count_follows_values(chart: helm.Chart) -> None:
    values = merged(load_values("existing-secrets-values.yaml"), {"worker": {"gpusPerWorker": 2}})
    worker = find(render(chart, values), "Deployment", f"{RELEASE}-carecanvas-worker")
    resources = worker["spec"]["template"]["spec"]["containers"][0]["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == "2"
    assert resources["requests"]["nvidia.com/gpu"] == "2"


def test_api_runs_serve_with_health_and_readiness_probes(chart: helm.Chart) -> None:
    objects = render(chart, load_values("existing-secrets-values.yaml"))
    (container,) = find(objects, "Deployment", f"{RELEASE}-carecanvas-api")["spec"]["template"]["spec"][
        "containers"
    ]
    assert container["command"] + container["args"] == [
        "carecanvas",
        "serve",
        "--host",
        "0.0.0.0",
        "--port",
        "8000",
    ]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    hpa = find(objects, "HorizontalPodAutoscaler", f"{RELEASE}-carecanvas-api")
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 10)
    pdb = find(objects, "PodDisruptionBudget", f"{RELEASE}-carecanvas-api")
    assert pdb["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] == "api"


def test_configuration_reaches_every_process_through_env_from(chart: helm.Chart) -> None:
    objects = render(chart, load_values("full-values.yaml"))
    env = find(objects, "ConfigMap", f"{RELEASE}-carecanvas-env")["data"]
    assert env["CARECANVAS_EMBEDDED_WORKER"] == "false"
    assert env["HF_HUB_OFFLINE"] == "1"
    assert env["CARECANVAS_PUBLIC_URL"] == "https://carecanvas.hospital.example"
    assert env["CARECANVAS_KEK_SECRET_FILE"] == "/etc/carecanvas/secrets/kek-keyring.json"
    assert "CARECANVAS_KEK_FILE" not in env  # the mounted Secret is read-only: never the editable key file
    assert env["CARECANVAS_EHRS_FILE"] == "/etc/carecanvas/config/ehrs.json"
    assert (
        env["CARECANVAS_AUDIT_CHECKPOINT_PATH"] == "/var/lib/carecanvas/audit-checkpoints/checkpoints.jsonl"
    )
    # The checkpoint signing key file the service reads, inside the files Secret's mount.
    assert env["CARECANVAS_AUDIT_SIGNING_KEY_FILE"] == "/etc/carecanvas/secrets/audit-signing-key.pem"
    assert "CARECANVAS_AUDIT_CHECKPOINT_URL" not in env
    with_url = merged(
        load_values("full-values.yaml"),
        {"audit": {"checkpoints": {"url": "https://logs.hospital.example/cp"}}},
    )
    env = find(render(chart, with_url), "ConfigMap", f"{RELEASE}-carecanvas-env")["data"]
    assert env["CARECANVAS_AUDIT_CHECKPOINT_URL"] == "https://logs.hospital.example/cp"
    assert env["CARECANVAS_WORKER_BATCH_SIZE"] == "8"
    for name, spec in pod_specs(objects).items():
        if name.startswith("Job/"):
            continue  # the hook Job runs before these objects exist; it has its own env
        assert spec["containers"][0]["envFrom"] == [
            {"configMapRef": {"name": f"{RELEASE}-carecanvas-env"}},
            {"secretRef": {"name": f"{RELEASE}-carecanvas-env"}},
        ], name


def test_rendered_files_are_read_by_the_service_settings(
    chart: helm.Chart, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The chart's env, ConfigMap files and Secrets, placed where they'd be mounted, load into Settings."""
    from service.settings import Settings

    objects = render(chart, secret_values_full())
    mounts = {
        "/etc/carecanvas/config": find(objects, "ConfigMap", f"{RELEASE}-carecanvas-files")["data"],
        "/etc/carecanvas/secrets": {
            key: base64.b64decode(value).decode()
            for key, value in find(objects, "Secret", f"{RELEASE}-carecanvas-files")["data"].items()
        },
    }
    for mount, files in mounts.items():
        directory = tmp_path / mount.lstrip("/")
        directory.mkdir(parents=True)
        for name, content in files.items():
            (directory / name).write_text(content, encoding="utf-8")

    def relocated(value: str) -> str:
        return str(tmp_path / value.lstrip("/")) if value.startswith("/etc/carecanvas/") else value

    for key in [k for k in os.environ if k.startswith("CARECANVAS_")]:
        monkeypatch.delenv(key)
    for key, value in find(objects, "ConfigMap", f"{RELEASE}-carecanvas-env")["data"].items():
        monkeypatch.setenv(key, relocated(value))
    for key, value in find(objects, "Secret", f"{RELEASE}-carecanvas-env")["data"].items():
        monkeypatch.setenv(key, base64.b64decode(value).decode())

    settings = Settings()
    assert settings.embedded_worker is False
    assert settings.resolved_database_url.startswith("postgresql+psycopg://carecanvas:")
    assert settings.kek_secret_file is not None
    assert SECRET_MARKERS["kek keyring"] in settings.kek_secret_file.read_text(encoding="utf-8")
    ehrs = {ehr.name: ehr for ehr in settings.registered_ehrs()}
    assert set(ehrs) == {"epic-prod", "portal", "legacy"}
    assert ehrs["legacy"].client_secret == SECRET_MARKERS["ehr client secret"]
    epic_key = ehrs["epic-prod"].private_key_file
    assert epic_key is not None
    assert SECRET_MARKERS["ehr private key"] in Path(relocated(str(epic_key))).read_text(encoding="utf-8")
    assert ehrs["portal"].client_auth == "public"
    assert next(m["name"] for m in settings.model_entries()) == "sdxl-turbo"


# --- secrets --------------------------------------------------------------------------------------


def test_no_secret_value_appears_in_a_config_map(chart: helm.Chart) -> None:
    objects = render(chart, secret_values_full())
    config_text = json.dumps([o for o in objects if o["kind"] == "ConfigMap"])
    secret_text = "\n".join(
        base64.b64decode(value).decode()
        for o in objects
        if o["kind"] == "Secret"
        for value in o["data"].values()
    )
    for label, marker in SECRET_MARKERS.items():
        assert marker not in config_text, f"{label} leaked into a ConfigMap"
        # ...and each one did reach a Secret, so the check above is not vacuous.
        assert marker in secret_text, f"{label} is missing from the Secrets"
    # Nor in plain env values or annotations of any workload.
    workload_text = json.dumps([o for o in objects if o["kind"] != "Secret"])
    for label, marker in SECRET_MARKERS.items():
        assert marker not in workload_text, f"{label} appears outside a Secret"


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({}, "secrets.databaseUrl is required"),
        (
            {"secrets": {"existingEnvSecret": "env", "auditSigningKey": "a"}},
            "secrets.kekKeyring is required",
        ),
        (
            # The service refuses to start without its checkpoint signing key: so does the chart.
            {"secrets": {"existingEnvSecret": "env", "kekKeyring": "k"}},
            "secrets.auditSigningKey is required",
        ),
        (
            {"secrets": {"databaseUrl": "sqlite+aiosqlite:///x.db", "existingFilesSecret": "f"}},
            None,  # rejected by the schema before any template runs
        ),
        (
            {
                "secrets": {"existingEnvSecret": "env", "kekKeyring": "k", "auditSigningKey": "a"},
                "ehrs": [
                    {
                        "name": "epic",
                        "iss": "https://e/fhir",
                        "client_id": "c",
                        "client_auth": "private_key_jwt",
                    }
                ],
            },
            'EHR "epic" uses private_key_jwt',
        ),
        (
            {
                "secrets": {"existingEnvSecret": "env", "existingFilesSecret": "f"},
                "ehrs": [
                    {
                        "name": "old",
                        "iss": "https://o/fhir",
                        "client_id": "c",
                        "client_auth": "client_secret_basic",
                    }
                ],
            },
            'EHR "old" uses client_secret_basic: with secrets.existingEnvSecret',
        ),
        (
            {
                "secrets": {
                    "existingEnvSecret": "env",
                    "existingFilesSecret": "f",
                    "existingMigrationSecret": "m",
                },
                "keda": {"enabled": True},
            },
            "keda.enabled with secrets.existingEnvSecret",
        ),
        (
            {
                "secrets": {
                    "existingEnvSecret": "env",
                    "existingFilesSecret": "f",
                    "existingMigrationSecret": "m",
                },
                "models": {"volume": {"create": False}},
            },
            "workers need a models volume",
        ),
        (
            {"secrets": {"existingEnvSecret": "env", "existingFilesSecret": "f"}},
            "secrets.migrationDatabaseUrl is required (the owner role's",
        ),
        (
            {
                "secrets": {
                    "databaseUrl": "postgresql+psycopg://carecanvas:pw@db/cc",
                    "migrationDatabaseUrl": "postgresql+psycopg://carecanvas:pw@db/cc",
                    "existingFilesSecret": "f",
                }
            },
            "secrets.migrationDatabaseUrl must be the owner role's URL, not secrets.databaseUrl",
        ),
        (
            {
                "secrets": {
                    "existingEnvSecret": "env",
                    "existingFilesSecret": "f",
                    "existingMigrationSecret": "env",
                }
            },
            "secrets.existingMigrationSecret must not be secrets.existingEnvSecret",
        ),
    ],
)
def test_incomplete_values_fail_with_a_message_that_names_the_fix(
    chart: helm.Chart, values: dict[str, Any], message: str | None
) -> None:
    with pytest.raises((helm.HelmRenderError, helm.HelmValuesError)) as raised:
        chart.render(values=values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    if message is None:
        assert "/secrets/databaseUrl" in str(raised.value)
    else:
        assert message in str(raised.value)


# --- schema ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "pointer"),
    [
        ({"api": {"replicas": "two"}}, "/api/replicas"),
        ({"worker": {"gpusPerWorkr": 1}}, "/worker"),
        ({"kedda": {"enabled": True}}, "additional properties 'kedda'"),
        ({"keda": {"maxReplicas": 0}}, "/keda/maxReplicas"),
        ({"config": {"publicUrl": "http://carecanvas.example.org"}}, "/config/publicUrl"),
        ({"config": {"device": "gpu"}}, "/config/device"),
        (
            {"config": {"extraEnv": {"CARECANVAS_DATABASE_URL": "postgresql://u:p@h/d"}}},
            "CARECANVAS_DATABASE_URL",
        ),
        (
            {"ehrs": [{"name": "e", "iss": "https://e/fhir", "client_id": "c", "client_secret": "s"}]},
            "'client_secret' not allowed",
        ),
        ({"ehrs": [{"name": "e", "iss": "http://e/fhir", "client_id": "c"}]}, "/ehrs/0/iss"),
        ({"containerSecurityContext": {"allowPrivilegeEscalation": True}}, "/containerSecurityContext"),
        ({"podSecurityContext": {"runAsNonRoot": False}}, "/podSecurityContext/runAsNonRoot"),
        ({"ingress": {"enabled": True, "hosts": []}}, "/ingress/hosts"),
        ({"networkPolicy": {"ehrCidrs": ["ehr.example.org"]}}, "/networkPolicy/ehrCidrs/0"),
        ({"migrations": {"appRole": 'app"; DROP TABLE jobs'}}, "/migrations/appRole"),
        ({"secrets": {"migrationDatabaseUrl": "sqlite:///x.db"}}, "/secrets/migrationDatabaseUrl"),
        (
            {"config": {"extraEnv": {"CARECANVAS_MIGRATION_DATABASE_URL": "postgresql://o:p@h/d"}}},
            "CARECANVAS_MIGRATION_DATABASE_URL",
        ),
    ],
)
def test_values_schema_rejects_bad_values(chart: helm.Chart, override: dict[str, Any], pointer: str) -> None:
    values = merged(load_values("existing-secrets-values.yaml"), override)
    with pytest.raises(helm.HelmValuesError) as raised:
        chart.validate_schema(values)
    assert pointer in str(raised.value)
    # An install would refuse the same values before rendering anything.
    with pytest.raises(helm.HelmValuesError):
        chart.render(values=values, name=RELEASE, namespace=NAMESPACE, is_install=True)


def test_values_schema_accepts_the_shipped_examples(chart: helm.Chart) -> None:
    for name in ("existing-secrets-values.yaml", "full-values.yaml"):
        chart.validate_schema(load_values(name))


# --- hardening ------------------------------------------------------------------------------------


def test_security_context_defaults_are_hardened(chart: helm.Chart) -> None:
    objects = render(chart, load_values("full-values.yaml"))
    specs = pod_specs(objects)
    assert set(specs) == {
        f"Deployment/{RELEASE}-carecanvas-api",
        f"Deployment/{RELEASE}-carecanvas-worker",
        f"Job/{RELEASE}-carecanvas-migrations",
        f"CronJob/{RELEASE}-carecanvas-audit-verify",
    }
    for name, spec in specs.items():
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, name
        assert spec["automountServiceAccountToken"] is False, name
        for container in spec["containers"]:
            context = container["securityContext"]
            assert context["runAsNonRoot"] is True, name
            assert context["readOnlyRootFilesystem"] is True, name
            assert context["allowPrivilegeEscalation"] is False, name
            assert context["privileged"] is False, name
            assert context["capabilities"] == {"drop": ["ALL"]}, name
            assert context["seccompProfile"] == {"type": "RuntimeDefault"}, name
            # A read-only root needs writable scratch space mounted explicitly.
            assert "/tmp" in {m["mountPath"] for m in container["volumeMounts"]}, name  # noqa: S108
            assert container["resources"]["limits"]["memory"], name
    service_account = find(objects, "ServiceAccount", f"{RELEASE}-carecanvas")
    assert service_account["automountServiceAccountToken"] is False


def test_migrations_run_as_a_pre_install_and_pre_upgrade_hook(chart: helm.Chart) -> None:
    objects = render(chart, load_values("full-values.yaml"))
    job = find(objects, "Job", f"{RELEASE}-carecanvas-migrations")
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "pre-install,pre-upgrade"
    container = job["spec"]["template"]["spec"]["containers"][0]
    # As the owner role, granting the app role (the user of secrets.databaseUrl) only what it needs.
    assert container["command"] + container["args"] == ["carecanvas", "migrate", "--app-role", "carecanvas"]
    assert "CARECANVAS_DATABASE_URL" not in {e["name"] for e in container["env"]}
    (database_env,) = [e for e in container["env"] if e["name"] == "CARECANVAS_MIGRATION_DATABASE_URL"]
    secret_name = database_env["valueFrom"]["secretKeyRef"]["name"]
    # The Job's Secret is itself an earlier hook: the release's own Secrets do not exist yet on install.
    hook_secret = find(objects, "Secret", secret_name)
    assert hook_secret["metadata"]["annotations"]["helm.sh/hook"] == "pre-install,pre-upgrade"
    assert int(hook_secret["metadata"]["annotations"]["helm.sh/hook-weight"]) < int(
        job["metadata"]["annotations"]["helm.sh/hook-weight"]
    )
    assert "hook-failed" in hook_secret["metadata"]["annotations"]["helm.sh/hook-delete-policy"]
    policy = find(objects, "NetworkPolicy", f"{RELEASE}-carecanvas-migrations")
    assert policy["metadata"]["annotations"]["helm.sh/hook"] == "pre-install,pre-upgrade"


def test_migrations_use_the_existing_secret_when_named(chart: helm.Chart) -> None:
    objects = render(chart, load_values("existing-secrets-values.yaml"))
    job = find(objects, "Job", f"{RELEASE}-carecanvas-migrations")
    env = job["spec"]["template"]["spec"]["containers"][0]["env"]
    assert env[0]["valueFrom"]["secretKeyRef"] == {
        "name": "carecanvas-migrations",
        "key": "CARECANVAS_MIGRATION_DATABASE_URL",
    }
    assert [o for o in objects if o["kind"] == "Secret"] == []


def test_the_owner_url_reaches_only_the_migrations_job(
    chart: helm.Chart, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The app's pods get the app role's URL; the owner's URL is only in the hook Secret the Job reads."""
    from service.settings import Settings

    objects = render(chart, secret_values_full())
    owner_password = SECRET_MARKERS["migration database password"]
    holders = [
        o["metadata"]["name"]
        for o in objects
        if o["kind"] == "Secret"
        and any(owner_password in base64.b64decode(v).decode() for v in o["data"].values())
    ]
    assert holders == [f"{RELEASE}-carecanvas-migrations"]
    hook_secret = find(objects, "Secret", f"{RELEASE}-carecanvas-migrations")
    assert set(hook_secret["data"]) == {"CARECANVAS_MIGRATION_DATABASE_URL"}
    # What the Job's env gives `carecanvas migrate`: the owner's URL.
    for key in [k for k in os.environ if k.startswith("CARECANVAS_")]:
        monkeypatch.delenv(key)
    owner_url = base64.b64decode(hook_secret["data"]["CARECANVAS_MIGRATION_DATABASE_URL"]).decode()
    monkeypatch.setenv("CARECANVAS_MIGRATION_DATABASE_URL", owner_url)
    assert Settings().resolved_migration_database_url.startswith("postgresql+psycopg://carecanvas_owner:")
    for name, spec in pod_specs(objects).items():
        if name.startswith("Job/"):
            continue
        assert f"{RELEASE}-carecanvas-migrations" not in json.dumps(spec), name
    job = find(objects, "Job", f"{RELEASE}-carecanvas-migrations")
    args = job["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args == ["migrate", "--app-role", "carecanvas"]
    objects = render(chart, merged(secret_values_full(), {"migrations": {"appRole": "cc_app"}}))
    job = find(objects, "Job", f"{RELEASE}-carecanvas-migrations")
    assert job["spec"]["template"]["spec"]["containers"][0]["args"][-1] == "cc_app"


def test_network_policies_limit_traffic(chart: helm.Chart) -> None:
    objects = render(chart, load_values("full-values.yaml"))
    fullname = f"{RELEASE}-carecanvas"

    api = find(objects, "NetworkPolicy", f"{fullname}-api")["spec"]
    assert api["policyTypes"] == ["Ingress", "Egress"]
    (ingress_rule,) = api["ingress"]
    peers = ingress_rule["from"]
    assert peers[0]["namespaceSelector"] == {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}}
    # The only other peer is Prometheus, present because serviceMonitor is enabled in these values.
    assert peers[1]["namespaceSelector"] == {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}
    assert ingress_rule["ports"] == [{"protocol": "TCP", "port": 8000}]
    egress_ports = {(p["protocol"], p["port"]) for rule in api["egress"] for p in rule["ports"]}
    assert egress_ports == {("UDP", 53), ("TCP", 53), ("TCP", 5432), ("TCP", 443)}
    ehr_rule = next(rule for rule in api["egress"] if rule["ports"] == [{"protocol": "TCP", "port": 443}])
    assert ehr_rule["to"] == [{"ipBlock": {"cidr": "203.0.113.0/24"}}]
    database_rule = next(
        rule for rule in api["egress"] if rule["ports"] == [{"protocol": "TCP", "port": 5432}]
    )
    assert database_rule["to"] == [{"ipBlock": {"cidr": "10.20.0.0/24"}}]

    worker = find(objects, "NetworkPolicy", f"{fullname}-worker")["spec"]
    worker_ports = {(p["protocol"], p["port"]) for rule in worker["egress"] for p in rule["ports"]}
    assert ("TCP", 443) not in worker_ports, "workers never call the EHR"
    assert worker["ingress"][0]["ports"] == [{"protocol": "TCP", "port": 9100}]


def test_network_policy_without_monitoring_admits_only_the_ingress_controller(chart: helm.Chart) -> None:
    objects = render(chart, load_values("existing-secrets-values.yaml"))
    api = find(objects, "NetworkPolicy", f"{RELEASE}-carecanvas-api")["spec"]
    (ingress_rule,) = api["ingress"]
    assert len(ingress_rule["from"]) == 1
    assert ingress_rule["from"][0]["podSelector"] == {
        "matchLabels": {"app.kubernetes.io/name": "ingress-nginx"}
    }
    worker = find(objects, "NetworkPolicy", f"{RELEASE}-carecanvas-worker")["spec"]
    assert worker["ingress"] == []


def test_standard_labels_on_every_object(chart: helm.Chart) -> None:
    for document in render(chart, load_values("full-values.yaml")):
        labels = document["metadata"]["labels"]
        name = f"{document['kind']}/{document['metadata']['name']}"
        assert labels["app.kubernetes.io/name"] == "carecanvas", name
        assert labels["app.kubernetes.io/instance"] == RELEASE, name
        assert labels["app.kubernetes.io/managed-by"] == "Helm", name
        assert labels["helm.sh/chart"] == "carecanvas-0.1.0", name
        assert document["metadata"]["namespace"] == NAMESPACE, name


def test_audit_checkpoints_go_to_a_shared_volume_that_outlives_the_release(chart: helm.Chart) -> None:
    objects = render(chart, load_values("existing-secrets-values.yaml"))
    claim = find(objects, "PersistentVolumeClaim", f"{RELEASE}-carecanvas-audit-checkpoints")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    assert claim["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    for component in ("api", "worker"):
        spec = find(objects, "Deployment", f"{RELEASE}-carecanvas-{component}")["spec"]["template"]["spec"]
        volume = next(v for v in spec["volumes"] if v["name"] == "audit-checkpoints")
        assert volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"], component


def test_ephemeral_audit_checkpoints_are_mounted_and_warned_about(chart: helm.Chart) -> None:
    values = merged(
        load_values("existing-secrets-values.yaml"),
        {"audit": {"checkpoints": {"persistence": {"enabled": False}}}},
    )
    manifests = chart.render(values=values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    notes = next(text for template, text in manifests.items() if template.endswith("NOTES.txt"))
    assert "truncation of the audit log cannot be detected" in notes
    objects = render(chart, values)
    assert [
        o for o in objects if o["kind"] == "PersistentVolumeClaim" and "audit" in o["metadata"]["name"]
    ] == []
    api = find(objects, "Deployment", f"{RELEASE}-carecanvas-api")
    for document in objects:
        validate_object(document)
    # The service creates the checkpoint directory; on a read-only root it must still be a mount.
    volume = next(v for v in api["spec"]["template"]["spec"]["volumes"] if v["name"] == "audit-checkpoints")
    assert "emptyDir" in volume


# --- alerts ---------------------------------------------------------------------------------------

ALERTS = {
    "CareCanvasQueueStalled": "queue-stalled",
    "CareCanvasJobsQuarantined": "jobs-quarantined",
    "CareCanvasWriteBackFailing": "write-back-failing",
    "CareCanvasEhrErrors": "ehr-errors",
    "CareCanvasAuditCheckpointStale": "audit-checkpoint-stale",
    "CareCanvasNotReady": "not-ready",
    "CareCanvasMetricsDatabaseDown": "metrics-database-down",
}


def exported_metric_names() -> set[str]:
    """Every series name CareCanvas exports (service.metrics: process registry and database gauges)."""
    from prometheus_client import REGISTRY

    from service import metrics

    snapshot = metrics.DatabaseSnapshot(buckets=[metrics.BucketQueue("b", 1, 1.0, 0)])
    collectors = [*REGISTRY.collect(), *metrics.SnapshotCollector(snapshot).collect()]
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    names = {f"{family.name}{suffix}" for family in collectors for suffix in suffixes.get(family.type, ("",))}
    names.add("carecanvas_metrics_database_up")
    return names


def _rules(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    rule = find(objects, "PrometheusRule", f"{RELEASE}-carecanvas")
    return {r["alert"]: r for group in rule["spec"]["groups"] for r in group["rules"]}


def test_prometheus_rule_alerts_on_metrics_the_service_exports(chart: helm.Chart) -> None:
    objects = render(chart, load_values("full-values.yaml"))
    rule = find(objects, "PrometheusRule", f"{RELEASE}-carecanvas")
    validate_object(rule)
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    alerts = _rules(objects)
    assert set(alerts) == set(ALERTS)
    exported = exported_metric_names()
    operations = (REPO_ROOT / "docs" / "operations.md").read_text(encoding="utf-8")
    anchors = {_anchor(line) for line in operations.splitlines() if line.startswith("#")}
    for name, alert in alerts.items():
        used = set(re.findall(r"\bcarecanvas_[a-z_]+\b", alert["expr"]))
        assert used, name
        assert used <= exported, f"{name} uses {sorted(used - exported)}, which the service does not export"
        assert alert["labels"]["severity"] in {"warning", "critical"}
        # Each alert links to its runbook, and that section exists in docs/operations.md.
        runbook = alert["annotations"]["runbook_url"]
        assert runbook == f"https://docs.hospital.example/carecanvas/operations#{ALERTS[name]}"
        assert ALERTS[name] in anchors, f"docs/operations.md has no section #{ALERTS[name]}"
    # Helm did not eat Prometheus's own template syntax.
    assert "{{ $labels.bucket }}" in alerts["CareCanvasQueueStalled"]["annotations"]["description"]
    assert alerts["CareCanvasQueueStalled"]["expr"].endswith("> 900")


def test_prometheus_rule_thresholds_follow_values_and_it_is_off_by_default(chart: helm.Chart) -> None:
    assert [
        o for o in render(chart, load_values("existing-secrets-values.yaml")) if o["kind"] == "PrometheusRule"
    ] == []
    values = merged(
        load_values("full-values.yaml"),
        {"prometheusRule": {"queueOldestAgeSeconds": 120, "writeBackFailures": 1, "notReadyFor": "2m"}},
    )
    alerts = _rules(render(chart, values))
    assert alerts["CareCanvasQueueStalled"]["expr"].endswith("> 120")
    assert alerts["CareCanvasWriteBackFailing"]["expr"].endswith(">= 1")
    assert alerts["CareCanvasNotReady"]["for"] == "2m"
    report = helm.lint(CHART_DIR, {"prometheusRule": {"writeBackFailures": 0}}, strict=True)
    assert any("writeBackFailures" in error for error in report["errors"]), report


def _anchor(heading: str) -> str:
    """GitHub's anchor for a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    text = heading.lstrip("#").strip().lower()
    return re.sub(r"[^a-z0-9 -]", "", text).replace(" ", "-")
