"""`carecanvas models build-tiny | list | check` through main(argv), with models configured by environment."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"

from service.cli import main
from service.generation.tiny import TINY_MODEL_NAME, read_model_card

SECOND = "tiny-seed-7"


@pytest.fixture
def configured(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for key in list(os.environ):
        if key.startswith("CARECANVAS_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("CARECANVAS_DATA_DIR", str(tmp_path / "data"))
    return tmp_path


def write_models_file(
    folder: Path, entries: list[dict[str, object]], monkeypatch: pytest.MonkeyPatch
) -> Path:
    models_file = folder / "models.json"
    models_file.write_text(json.dumps(entries), encoding="utf-8")
    monkeypatch.setenv("CARECANVAS_MODELS_FILE", str(models_file))
    return models_file


def entry(name: str, path: Path) -> dict[str, object]:
    return {
        "name": name,
        "path": str(path),
        "pipeline_class": "auto",
        "default_width": 64,
        "default_height": 64,
    }


def test_build_tiny_writes_a_loadable_pipeline_and_reuses_it(configured: Path, capsys) -> None:
    target = configured / "tiny"
    assert main(["models", "build-tiny", str(target), "--seed", "7"]) == 0
    assert f"tiny offline pipeline written to {target}" in capsys.readouterr().out
    assert (target / "model_index.json").is_file()
    card = read_model_card(target)
    assert (card["name"], card["seed"]) == (TINY_MODEL_NAME, 7)
    before = (target / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns
    assert main(["models", "build-tiny", str(target), "--seed", "7"]) == 0  # same seed: kept as it is
    assert (target / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns == before


def test_build_tiny_refuses_to_overwrite_another_folder(configured: Path, capsys) -> None:
    occupied = configured / "my-model"
    occupied.mkdir()
    (occupied / "weights.bin").write_bytes(b"precious")
    assert main(["models", "build-tiny", str(occupied)]) == 1
    assert "refusing to overwrite" in capsys.readouterr().err
    assert (occupied / "weights.bin").read_bytes() == b"precious"


def test_list_shows_configured_models_and_the_default(configured: Path, monkeypatch, capsys) -> None:
    write_models_file(configured, [entry(SECOND, configured / "second")], monkeypatch)
    monkeypatch.setenv("CARECANVAS_DEFAULT_MODEL", SECOND)
    assert main(["models", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"{SECOND}\t{configured / 'second'}\tauto [default]"
    assert lines[1].startswith(f"{TINY_MODEL_NAME}\t")
    assert lines[1].endswith("(test model: random weights)")


def test_list_fails_when_the_default_model_is_not_configured(configured: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("CARECANVAS_DEFAULT_MODEL", "sdxl-turbo")
    assert main(["models", "list"]) == 1
    assert "default model 'sdxl-turbo' is not configured" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("not json", "model configuration is invalid"),
        (json.dumps([{"name": "x", "path": "/m", "pipeline_class": "EvilPipeline"}]), "is not allowed"),
        (json.dumps([{"name": "a", "path": "/a"}, {"name": "a", "path": "/b"}]), "configured twice"),
    ],
)
def test_invalid_model_configuration_is_reported_without_a_traceback(
    configured: Path, monkeypatch, capsys, content: str, message: str
) -> None:
    models_file = configured / "models.json"
    models_file.write_text(content, encoding="utf-8")
    monkeypatch.setenv("CARECANVAS_MODELS_FILE", str(models_file))
    assert main(["models", "list"]) == 2
    assert message in capsys.readouterr().err


def test_check_loads_good_models_and_names_the_problems_of_bad_ones(
    configured: Path, monkeypatch, capsys
) -> None:
    good = configured / "good"
    assert main(["models", "build-tiny", str(good), "--seed", "7"]) == 0
    broken = configured / "broken"
    broken.mkdir()
    write_models_file(
        configured,
        [entry(SECOND, good), entry("broken", broken), entry("missing", configured / "nope")],
        monkeypatch,
    )
    capsys.readouterr()
    assert main(["models", "check"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"{SECOND}: ok "
    assert out[1].startswith("broken: PROBLEM ")
    assert "model_index.json does not exist" in out[1]
    assert out[2] == f"missing: PROBLEM model folder {configured / 'nope'} does not exist"
    assert out[3] == f"{TINY_MODEL_NAME}: not built yet (built on first start)"


def test_check_passes_when_every_model_loads(configured: Path, monkeypatch, capsys) -> None:
    good = configured / "good"
    main(["models", "build-tiny", str(good), "--seed", "7"])
    write_models_file(configured, [entry(SECOND, good)], monkeypatch)
    # The built-in test model too, once it exists where the data directory says.
    main(["models", "build-tiny", str(configured / "data" / "models" / TINY_MODEL_NAME)])
    capsys.readouterr()
    assert main(["models", "check"]) == 0
    assert capsys.readouterr().out.splitlines() == [f"{SECOND}: ok ", f"{TINY_MODEL_NAME}: ok "]


def test_console_script_runs_as_a_process(configured: Path) -> None:
    env = {**os.environ, "CARECANVAS_DATA_DIR": str(configured / "data")}
    result = subprocess.run(
        [sys.executable, "-m", "service.cli", "models", "list"],
        env=env,
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr.decode()[-1000:]
    assert result.stdout.decode().startswith(f"{TINY_MODEL_NAME}\t")
    assert "[default]" in result.stdout.decode()
