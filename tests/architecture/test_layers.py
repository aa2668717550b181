"""The house rules that keep the layers apart: no import cycle, and no torch in the API process."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("service", "fhir_adapters", "sandbox")


def _modules() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            if "node_modules" in path.parts:
                continue
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            modules[name.removesuffix(".__init__")] = path
    return modules


def _target(name: str, modules: dict[str, Path]) -> str | None:
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_graph() -> dict[str, set[str]]:
    """Module → the project modules it imports, at module level or inside functions (both count)."""
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            imported: list[str] = []
            if isinstance(node, ast.Import):
                imported = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*parts, base] if base else parts)
                imported = [base, *(f"{base}.{alias.name}" for alias in node.names)]
            for item in imported:
                target = _target(item, modules)
                if target and target != name and not name.startswith(target + "."):
                    graph[name].add(target)
    return graph


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative: every group of modules that import each other in a ring."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                group = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    group.append(member)
                    if member == node:
                        break
                if len(group) > 1:
                    cycles.append(sorted(group))
    return cycles


def test_the_cycle_finder_finds_a_ring() -> None:
    assert strongly_connected({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycle_anywhere_in_the_project() -> None:
    assert strongly_connected(import_graph()) == []


def test_fhir_adapters_never_import_the_service() -> None:
    graph = import_graph()
    offenders = {
        module: sorted(target for target in targets if target.split(".")[0] in ("service", "sandbox"))
        for module, targets in graph.items()
        if module.startswith("fhir_adapters")
    }
    assert {module: targets for module, targets in offenders.items() if targets} == {}


SERVE_MODE_PROBE = """
import json, sys, tempfile
from pathlib import Path
from fastapi.testclient import TestClient
from service.app import create_app
from service.settings import Settings

data = Path(tempfile.mkdtemp())
settings = Settings(data_dir=data, embedded_worker=False, public_url="http://127.0.0.1:9")
with TestClient(create_app(settings)) as client:
    ok = client.get("/healthz").status_code
heavy = sorted(m for m in ("torch", "diffusers", "transformers") if m in sys.modules)
print(json.dumps({"healthz": ok, "heavy": heavy}))
"""


def test_the_api_process_never_imports_torch_diffusers_or_transformers() -> None:
    """`carecanvas serve` builds the app without the embedded worker: only the worker loads the ML stack."""
    result = subprocess.run(
        [sys.executable, "-c", SERVE_MODE_PROBE],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    assert answer == {"healthz": 200, "heavy": []}
