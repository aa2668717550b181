"""Build a tiny Stable Diffusion pipeline offline with random weights (noise images) for tests and demo."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

TINY_MODEL_NAME = "carecanvas-tiny-test"
TINY_MODEL_VERSION = "1"
MODEL_CARD_FILENAME = "carecanvas-model.json"

# CLIP's special tokens (tokenizer vocabulary entries, not secrets).
BOS_TOKEN = "<|startoftext|>"  # noqa: S105
EOS_TOKEN = "<|endoftext|>"  # noqa: S105
# A handful of merges exercises the BPE path; the byte-level base vocabulary alone covers every string.
_TINY_MERGES: tuple[tuple[str, str], ...] = (
    ("t", "h"),
    ("th", "e</w>"),
    ("a", "n"),
    ("i", "n"),
    ("e", "r</w>"),
    ("o", "n</w>"),
)


def byte_to_unicode_symbols() -> list[str]:
    """The 256 printable stand-ins that GPT-2/CLIP byte-level BPE uses for the bytes 0..255, in byte order."""
    printable = list(range(ord("!"), ord("~") + 1))
    printable += list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    code_points = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            code_points.append(256 + extra)
            extra += 1
    by_byte = dict(zip(printable, code_points, strict=True))
    return [chr(by_byte[byte]) for byte in range(256)]


def tiny_vocabulary() -> dict[str, int]:
    """Byte symbols, the same with `</w>`, the merge results, then the two special tokens."""
    symbols = byte_to_unicode_symbols()
    tokens = symbols + [symbol + "</w>" for symbol in symbols]
    tokens += ["".join(pair) for pair in _TINY_MERGES]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    return {token: index for index, token in enumerate(tokens)}


def _write_tokenizer_files(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(tiny_vocabulary(), ensure_ascii=False), encoding="utf-8")
    merges = "#version: 0.2\n" + "".join(f"{left} {right}\n" for left, right in _TINY_MERGES)
    (folder / "merges.txt").write_text(merges, encoding="utf-8")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": 77,
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "unk_token": EOS_TOKEN,
        "pad_token": EOS_TOKEN,
        "do_lower_case": True,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")


def _model_card(seed: int) -> dict[str, Any]:
    return {
        "name": TINY_MODEL_NAME,
        "version": TINY_MODEL_VERSION,
        "seed": seed,
        "pipeline_class": "StableDiffusionPipeline",
        "description": "random weights: images are noise; for tests and the offline demo only",
        "licence": "built by CareCanvas from diffusers/transformers configs; no third-party weights or terms",
        "is_test_model": True,
    }


def read_model_card(path: Path) -> dict[str, Any] | None:
    """The carecanvas-model.json of a model folder, or None when the folder has none (or it is unreadable)."""
    try:
        card = json.loads((path / MODEL_CARD_FILENAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return card if isinstance(card, dict) else None


def _build_into(folder: Path, *, seed: int) -> None:
    # Imported here so HF_HUB_OFFLINE is set before huggingface_hub reads it at import time.
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    tokenizer_folder = folder / "tokenizer"
    _write_tokenizer_files(tokenizer_folder)
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_folder, local_files_only=True)

    # fork_rng keeps the caller's global RNG untouched; each component gets its own seed so adding one
    # component never changes another's weights.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=2,
            norm_num_groups=32,
        )
        torch.manual_seed(seed + 1)
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            block_out_channels=(8, 16, 32, 32),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            latent_channels=4,
            layers_per_block=1,
            norm_num_groups=8,
            sample_size=64,
        )
        torch.manual_seed(seed + 2)
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                hidden_size=32,
                intermediate_size=37,
                num_hidden_layers=2,
                num_attention_heads=2,
                projection_dim=32,
                layer_norm_eps=1e-5,
                vocab_size=len(tokenizer),
                max_position_embeddings=77,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
    # DDIM with Stable Diffusion's published schedule. Not Euler: its set_timesteps trips a NumPy 2
    # DeprecationWarning (torch tensor -> np.array copy=False), and the test suite treats warnings as errors.
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        timestep_spacing="leading",
    )
    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(folder, safe_serialization=True)  # type: ignore[attr-defined]  # diffusers stubs miss it
    (folder / MODEL_CARD_FILENAME).write_text(json.dumps(_model_card(seed), indent=2), encoding="utf-8")


def build_tiny_pipeline(path: Path, *, seed: int = 0) -> Path:
    """Write the tiny pipeline folder at `path` (deterministic for `seed`) and return it.

    A folder that already holds the same tiny model (same version and seed) is reused as it is. The build goes
    into a sibling temporary folder that is renamed into place, so a reader never sees a half-written model.
    """
    os.environ["HF_HUB_OFFLINE"] = "1"
    path = Path(path)
    card = read_model_card(path)
    is_tiny_model = card is not None and card.get("name") == TINY_MODEL_NAME
    if is_tiny_model and card and card.get("version") == TINY_MODEL_VERSION and card.get("seed") == seed:
        return path
    if path.exists() and (not path.is_dir() or any(path.iterdir())) and not is_tiny_model:
        raise FileExistsError(
            f"refusing to overwrite {path}: it exists and is not a {TINY_MODEL_NAME} folder; "
            "pass an empty or missing folder"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.parent / f".{path.name}.building-{uuid.uuid4().hex}"
    try:
        _build_into(staging, seed=seed)
        if path.exists():
            # Only an empty folder or an older build of the tiny model reaches this point.
            shutil.rmtree(path)
        staging.rename(path)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return path
