"""The Dockerfile (no container runtime here): hadolint, and the properties the chart relies on."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import helm_python as helm
import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
CHART_DIR = REPO_ROOT / "charts" / "carecanvas"
DOCKERFILE = REPO_ROOT / "Dockerfile"
HADOLINT = Path(sys.executable).parent / "hadolint"


def instructions(stage: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of one build stage, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text(encoding="utf-8"))
    found: list[tuple[str, str]] = []
    current: str | None = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, rest = line.partition(" ")
        if keyword.upper() == "FROM":
            current = rest.split(" AS ")[-1].strip()
        if current == stage:
            found.append((keyword.upper(), rest.strip()))
    return found


def runtime_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for keyword, rest in instructions("runtime"):
        if keyword == "ENV":
            env.update(dict(re.findall(r"(\w+)=(\S+)", rest)))
    return env


def chart_values() -> dict[str, Any]:
    return yaml.safe_load((CHART_DIR / "values.yaml").read_text(encoding="utf-8"))


def test_hadolint_passes() -> None:
    result = subprocess.run(
        [str(HADOLINT), "--no-color", str(DOCKERFILE)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_would_catch_a_root_image(tmp_path: Path) -> None:
    """The linter is really looking: the same file ending as root fails."""
    bad = tmp_path / "Dockerfile"
    bad.write_text(DOCKERFILE.read_text(encoding="utf-8") + "USER root\n", encoding="utf-8")
    result = subprocess.run(
        [str(HADOLINT), "--no-color", str(bad)], capture_output=True, text=True, check=False
    )
    assert result.returncode != 0
    assert "DL3002" in result.stdout


def test_runs_as_the_charts_non_root_user_with_the_charts_command() -> None:
    values = chart_values()
    runtime = instructions("runtime")
    users = [rest for keyword, rest in runtime if keyword == "USER"]
    uid = values["podSecurityContext"]["runAsUser"]
    gid = values["podSecurityContext"]["runAsGroup"]
    assert users == [f"{uid}:{gid}"]  # numeric, so runAsNonRoot can verify it
    entrypoint = next(rest for keyword, rest in runtime if keyword == "ENTRYPOINT")
    assert entrypoint == '["carecanvas"]'  # the chart's `command: [carecanvas]`
    exposed = {int(port) for keyword, rest in runtime if keyword == "EXPOSE" for port in rest.split()}
    assert exposed == {values["api"]["port"], values["worker"]["metricsPort"]}


def test_writes_only_where_the_chart_mounts_volumes() -> None:
    """Read-only root: HOME, caches and the data dir all lie on the chart's writable mounts."""
    env = runtime_env()
    writable = ("/tmp", "/var/lib/carecanvas/data")  # noqa: S108 - the chart's emptyDir for /tmp
    for name in ("HOME", "XDG_CACHE_HOME", "HF_HOME", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
        assert env[name].startswith(writable), name
    assert env["CARECANVAS_DATA_DIR"] == "/var/lib/carecanvas/data"
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert env["HF_HUB_OFFLINE"] == "1"
    helpers = (CHART_DIR / "templates" / "_helpers.tpl").read_text(encoding="utf-8")
    assert '"carecanvas.dataDir" -}}/var/lib/carecanvas/data' in helpers
    assert "mountPath: /tmp" in helpers


def test_torch_comes_from_the_variants_index_at_the_pinned_version() -> None:
    build = " ".join(rest for _, rest in instructions("build"))
    assert "ARG TORCH_VARIANT=cpu" in DOCKERFILE.read_text(encoding="utf-8")
    assert "download.pytorch.org/whl/${TORCH_VARIANT}" in build
    pinned = re.search(r'"(torch==[^"]+)"', (REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert pinned is not None
    extracted = subprocess.run(
        ["sed", "-n", r's/^ *"\(torch==[^"]*\)",*$/\1/p', str(REPO_ROOT / "pyproject.toml")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert extracted == pinned.group(1)  # the Dockerfile's sed finds the same pin


def test_build_context_leaves_out_local_state_and_keys() -> None:
    ignore = (REPO_ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
    included = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    # Everything is excluded first, then only the source folders the image needs come back ...
    assert ignore.index("**") < min(ignore.index(line) for line in ignore if line.startswith("!"))
    assert included == {"pyproject.toml", "README.md", "service", "fhir_adapters", "sandbox", "templates"}
    for pattern in ("**/*.pem", "**/keys.json", "**/*.db", "**/.carecanvas", "**/node_modules"):
        assert pattern in ignore  # ... and keys or databases never come back in


@pytest.fixture(scope="module")
def chart() -> Any:
    helm.disable_logging()
    with helm.Chart.load(CHART_DIR) as loaded:
        yield loaded


def _images(chart: Any, values: dict[str, Any]) -> dict[str, str]:
    manifests = chart.render(values=values, name="cc", namespace="carecanvas", is_install=True)
    images: dict[str, str] = {}
    for template, text in manifests.items():
        if template.endswith("NOTES.txt"):
            continue
        for document in yaml.safe_load_all(text):
            if document and document["kind"] in ("Deployment", "Job"):
                spec = document["spec"]["template"]["spec"]
                images[document["metadata"]["name"]] = spec["containers"][0]["image"]
    return images


def test_chart_defaults_point_at_both_builds(chart: Any) -> None:
    values = yaml.safe_load((CHART_DIR / "ci" / "existing-secrets-values.yaml").read_text(encoding="utf-8"))
    app_version = yaml.safe_load((CHART_DIR / "Chart.yaml").read_text(encoding="utf-8"))["appVersion"]
    images = _images(chart, values)
    repository = chart_values()["image"]["repository"]
    assert images["cc-carecanvas-api"] == f"{repository}:{app_version}"
    assert images["cc-carecanvas-migrations"] == f"{repository}:{app_version}"
    assert images["cc-carecanvas-worker"] == f"{repository}:{app_version}-cuda"
    # docker-bake.hcl tags the two builds exactly so.
    bake = (REPO_ROOT / "docker-bake.hcl").read_text(encoding="utf-8")
    assert f'default = "{repository}"' in bake
    assert f'default = "{app_version}"' in bake
    assert '"${REPOSITORY}:${VERSION}-cuda"' in bake
    assert 'TORCH_VARIANT = "cu128"' in bake


def test_a_pinned_digest_needs_the_worker_digest_too(chart: Any) -> None:
    values = yaml.safe_load((CHART_DIR / "ci" / "existing-secrets-values.yaml").read_text(encoding="utf-8"))
    cpu, cuda = "sha256:" + "a" * 64, "sha256:" + "b" * 64
    values["image"] = {"digest": cpu}
    with pytest.raises(Exception, match=r"image\.workerDigest"):
        _images(chart, values)
    values["image"] = {"digest": cpu, "workerDigest": cuda}
    images = _images(chart, values)
    assert images["cc-carecanvas-api"].endswith(f"@{cpu}")
    assert images["cc-carecanvas-worker"].endswith(f"@{cuda}")
