"""The tiny offline pipeline: built without network, deterministic, round-trips, tokenizes any text."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from transformers import CLIPTokenizer

from service.generation.tiny import (
    BOS_TOKEN,
    EOS_TOKEN,
    MODEL_CARD_FILENAME,
    TINY_MODEL_NAME,
    build_tiny_pipeline,
    byte_to_unicode_symbols,
    read_model_card,
)


def _weights(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {
        component: load_file(str(next((folder / component).glob("*.safetensors"))))
        for component in ("unet", "vae", "text_encoder")
    }


def _render(pipeline: StableDiffusionPipeline, seed: int = 3) -> np.ndarray:
    pipeline.set_progress_bar_config(disable=True)
    result = pipeline(
        "a heart with arteries",
        width=64,
        height=64,
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
    )
    return np.asarray(result.images[0])


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Any socket connection attempt fails the test and is recorded."""
    attempts: list[object] = []

    def refuse(self: socket.socket, address: object) -> None:
        attempts.append(address)
        raise OSError("network access attempted during an offline build")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    return attempts


def test_builds_and_loads_offline_without_touching_the_network(
    tmp_path: Path, no_network: list[object]
) -> None:
    folder = build_tiny_pipeline(tmp_path / "tiny", seed=0)
    pipeline = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    image = _render(pipeline)
    assert no_network == []
    assert image.shape == (64, 64, 3)
    assert pipeline.safety_checker is None
    assert pipeline.feature_extractor is None
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["requires_safety_checker"] is False


def test_folder_has_expected_architecture_and_model_card(tiny_model_path: Path) -> None:
    pipeline = StableDiffusionPipeline.from_pretrained(tiny_model_path, local_files_only=True)
    unet_config = pipeline.unet.config
    assert tuple(unet_config.block_out_channels) == (32, 64)
    assert unet_config.cross_attention_dim == 32
    assert all("CrossAttn" in block for block in unet_config.down_block_types)
    assert pipeline.vae_scale_factor == 8
    assert pipeline.text_encoder.config.vocab_size == len(pipeline.tokenizer)
    assert pipeline.text_encoder.config.hidden_size == 32
    assert pipeline.tokenizer.model_max_length == 77
    unet_parameters = sum(p.numel() for p in pipeline.unet.parameters())
    assert 500_000 < unet_parameters < 2_000_000
    card = read_model_card(tiny_model_path)
    assert card is not None
    assert card["name"] == TINY_MODEL_NAME
    assert "noise" in card["description"]
    assert card["licence"]
    assert card["is_test_model"] is True


def test_round_trip_through_save_and_load_is_bit_exact(tiny_model_path: Path, tmp_path: Path) -> None:
    loaded = StableDiffusionPipeline.from_pretrained(tiny_model_path, local_files_only=True)
    loaded.save_pretrained(tmp_path / "copy", safe_serialization=True)
    reloaded = StableDiffusionPipeline.from_pretrained(tmp_path / "copy", local_files_only=True)
    original_weights, copied_weights = _weights(tiny_model_path), _weights(tmp_path / "copy")
    for component, tensors in original_weights.items():
        assert tensors.keys() == copied_weights[component].keys()
        for name, tensor in tensors.items():
            assert torch.equal(tensor, copied_weights[component][name]), f"{component}.{name} changed"
    for name, tensor in loaded.unet.state_dict().items():
        assert torch.equal(tensor, original_weights["unet"][name])
    assert np.array_equal(_render(loaded), _render(reloaded))


def test_same_seed_builds_identical_weights_and_another_seed_does_not(
    tmp_path: Path, tiny_model_path: Path
) -> None:
    torch.manual_seed(1234)
    expected_next_random = torch.rand(1)
    torch.manual_seed(1234)
    again = build_tiny_pipeline(tmp_path / "again", seed=0)
    # The build must leave the caller's global RNG alone.
    assert torch.equal(torch.rand(1), expected_next_random)
    other = build_tiny_pipeline(tmp_path / "other", seed=1)
    reference, same, different = _weights(tiny_model_path), _weights(again), _weights(other)
    for name, tensor in reference["unet"].items():
        assert torch.equal(tensor, same["unet"][name])
    assert any(not torch.equal(tensor, different["unet"][name]) for name, tensor in reference["unet"].items())


def test_existing_build_is_reused_and_foreign_folder_is_not_overwritten(tmp_path: Path) -> None:
    folder = build_tiny_pipeline(tmp_path / "tiny", seed=0)
    marker = folder / "unet" / "marker"
    marker.write_text("kept")
    assert build_tiny_pipeline(folder, seed=0) == folder
    assert marker.exists(), "a matching build must be reused, not rebuilt"
    build_tiny_pipeline(folder, seed=2)
    assert not marker.exists(), "a different seed must rebuild the folder"
    assert read_model_card(folder)["seed"] == 2  # type: ignore[index]

    foreign = tmp_path / "someone-elses-model"
    foreign.mkdir()
    (foreign / "model_index.json").write_text("{}")
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        build_tiny_pipeline(foreign)
    assert (foreign / "model_index.json").read_text() == "{}"
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir()), "no staging folder may be left behind"


def test_model_card_unreadable_counts_as_missing(tmp_path: Path) -> None:
    assert read_model_card(tmp_path) is None
    (tmp_path / MODEL_CARD_FILENAME).write_text("[1, 2")
    assert read_model_card(tmp_path) is None
    (tmp_path / MODEL_CARD_FILENAME).write_text("[1, 2]")
    assert read_model_card(tmp_path) is None


def test_byte_symbols_are_the_256_distinct_clip_symbols() -> None:
    symbols = byte_to_unicode_symbols()
    assert len(set(symbols)) == 256
    assert symbols[ord("a")] == "a"
    assert symbols[ord(" ")] == "Ġ"  # GPT-2/CLIP's stand-in for the space byte


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_model_path: Path) -> CLIPTokenizer:
    return CLIPTokenizer.from_pretrained(tiny_model_path / "tokenizer", local_files_only=True)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=60))
def test_tokenizer_tokenizes_any_unicode_string(tiny_tokenizer: CLIPTokenizer, text: str) -> None:
    ids = tiny_tokenizer(text, truncation=True, max_length=77).input_ids
    bos, eos = tiny_tokenizer.convert_tokens_to_ids([BOS_TOKEN, EOS_TOKEN])
    assert ids[0] == bos
    assert ids[-1] == eos
    inner = ids[1:-1]
    # The unknown token is <|endoftext|>: it must never stand in for a character of the text.
    assert eos not in inner
    assert bos not in inner
    assert all(0 <= token < len(tiny_tokenizer) for token in inner)
    if text.strip() and len(text.encode()) <= 75:
        assert inner, "non-blank text must produce tokens"


def test_tokenizer_uses_the_merges(tiny_tokenizer: CLIPTokenizer) -> None:
    assert tiny_tokenizer.tokenize("the") == ["the</w>"]
    assert tiny_tokenizer.tokenize("Ünïcode ✓") != []
