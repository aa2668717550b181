"""Full-size diffusion architectures from their published configs, with random weights, built on any device.

No download: every config is embedded here (copied from the published ``config.json`` files of
runwayml/stable-diffusion-v1-5, stabilityai/stable-diffusion-xl-base-1.0 — SDXL-Turbo has the same
architecture — and black-forest-labs/FLUX.1-schnell). Tokenizers are the byte-level CLIP tokenizer CareCanvas
builds for its tiny model (every id is a valid id of the full vocabulary); T5's is a WordLevel tokenizer over
the same bytes. Weights are random, so images are noise; shapes, FLOPs and memory are the real ones.

``tiny=True`` keeps each architecture's structure (block types, SDXL's text-time embedding and per-level
transformer depths, FLUX's double and single blocks, two text encoders) at a few channels, so the CPU test
suite checks the builders without a GPU.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench.bench_gpu_configs import (
    CLIP_L_TEXT_CONFIG,
    FLUX_TRANSFORMER_CONFIG,
    FLUX_VAE_CONFIG,
    OPENCLIP_BIGG_TEXT_CONFIG,
    SD15_UNET_CONFIG,
    SD15_VAE_CONFIG,
    SDXL_UNET_CONFIG,
    SDXL_VAE_CONFIG,
    T5_XXL_CONFIG,
)

# Above the byte-level tokenizers' largest id (CLIP 520, T5 259): tiny builds skip the 49,408-row embeddings.
TINY_VOCAB = 600


@dataclass(frozen=True)
class Family:
    """One architecture and how CareCanvas serves it (its model-registry defaults)."""

    name: str
    pipeline_class: str
    width: int
    height: int
    steps: int
    guidance: float
    batch_cap: int


FAMILIES: dict[str, Family] = {
    "sd15": Family("sd15", "StableDiffusionPipeline", 512, 512, 30, 7.5, 8),
    "sdxl": Family("sdxl", "StableDiffusionXLPipeline", 1024, 1024, 20, 7.5, 4),
    "sdxl-turbo": Family("sdxl-turbo", "StableDiffusionXLPipeline", 512, 512, 4, 0.0, 16),
    "flux-schnell": Family("flux-schnell", "FluxPipeline", 512, 512, 4, 0.0, 4),
}


def _tiny_unet(config: dict[str, Any]) -> dict[str, Any]:
    tiny = copy.deepcopy(config)
    levels = len(tiny["block_out_channels"])
    tiny.update(
        block_out_channels=tuple(32 * (index + 1) for index in range(levels)),
        layers_per_block=1,
        cross_attention_dim=32,
        norm_num_groups=8,
        sample_size=8,
    )
    if isinstance(tiny.get("attention_head_dim"), tuple):
        tiny["attention_head_dim"] = tuple(2 for _ in tiny["attention_head_dim"])
    else:
        tiny["attention_head_dim"] = 2
    if "transformer_layers_per_block" in tiny:
        tiny["transformer_layers_per_block"] = tuple(min(2, n) for n in tiny["transformer_layers_per_block"])
    if tiny.get("addition_embed_type") == "text_time":
        # text_embeds (the second encoder's pooled projection, 32 here) + 6 time ids × 8.
        tiny.update(addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8)
    return tiny


def _tiny_vae(config: dict[str, Any]) -> dict[str, Any]:
    tiny = copy.deepcopy(config)
    tiny.update(block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=8, sample_size=64)
    return tiny


def _tiny_text(config: dict[str, Any]) -> dict[str, Any]:
    tiny = copy.deepcopy(config)
    tiny.update(
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=2,
        projection_dim=32,
        vocab_size=TINY_VOCAB,
    )
    return tiny


def _tiny_t5(config: dict[str, Any]) -> dict[str, Any]:
    tiny = copy.deepcopy(config)
    tiny.update(d_model=32, d_ff=37, d_kv=8, num_heads=4, num_layers=2, vocab_size=TINY_VOCAB)
    return tiny


def _tiny_flux(config: dict[str, Any]) -> dict[str, Any]:
    tiny = copy.deepcopy(config)
    tiny.update(
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=(4, 6, 6),
    )
    return tiny


def _clip_tokenizer(folder: Path) -> Any:
    from transformers import CLIPTokenizer

    from service.generation.tiny import _write_tokenizer_files

    _write_tokenizer_files(folder)
    return CLIPTokenizer.from_pretrained(folder, local_files_only=True)


def _t5_tokenizer(folder: Path) -> Any:
    """A fast tokenizer with T5's special tokens over the 256 byte symbols (ids far below T5's vocabulary)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from service.generation.tiny import byte_to_unicode_symbols

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for symbol in byte_to_unicode_symbols():
        vocab.setdefault(symbol, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))  # noqa: S106 - a token name
    core.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    folder.mkdir(parents=True, exist_ok=True)
    core.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 512}), encoding="utf-8"
    )
    return PreTrainedTokenizerFast(
        tokenizer_file=str(folder / "tokenizer.json"),
        pad_token="<pad>",  # noqa: S106
        eos_token="</s>",  # noqa: S106
        unk_token="<unk>",  # noqa: S106
        model_max_length=512,
    )


def _scheduler(family: Family) -> Any:
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

    if family.name == "flux-schnell":
        return FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False
        )
    # SD's published schedule; "trailing" spacing for SDXL-Turbo's few steps (as its scheduler config has).
    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        timestep_spacing="trailing" if family.name == "sdxl-turbo" else "leading",
    )


def build_pipeline(name: str, *, device: str = "cpu", dtype: Any = None, tiny: bool = False) -> Any:
    """The family's diffusers pipeline with random weights, each module created directly on ``device``."""
    import torch
    from diffusers import (
        AutoencoderKL,
        FluxPipeline,
        FluxTransformer2DModel,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        T5Config,
        T5EncoderModel,
    )

    family = FAMILIES[name]
    dtype = dtype or torch.float32
    unet_cfg, vae_cfg = {
        "sd15": (SD15_UNET_CONFIG, SD15_VAE_CONFIG),
        "sdxl": (SDXL_UNET_CONFIG, SDXL_VAE_CONFIG),
        "sdxl-turbo": (SDXL_UNET_CONFIG, SDXL_VAE_CONFIG),
        "flux-schnell": (FLUX_TRANSFORMER_CONFIG, FLUX_VAE_CONFIG),
    }[name]
    vae_cfg = _tiny_vae(vae_cfg) if tiny else vae_cfg
    words = Path(tempfile.mkdtemp(prefix=f"cc-{name}-tokenizers-"))
    tokenizer = _clip_tokenizer(words / "clip")
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # parameters are made in the serving dtype (no float32 copy first)
    try:
        with torch.device(device):
            vae = AutoencoderKL(**vae_cfg)
            clip_cfg = _tiny_text(CLIP_L_TEXT_CONFIG) if tiny else CLIP_L_TEXT_CONFIG
            special = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
            text_encoder = CLIPTextModel(CLIPTextConfig(**clip_cfg, **special))
            if name == "sd15":
                unet = UNet2DConditionModel(**(_tiny_unet(unet_cfg) if tiny else unet_cfg))
                return StableDiffusionPipeline(
                    vae=vae,
                    text_encoder=text_encoder,
                    tokenizer=tokenizer,
                    unet=unet,
                    scheduler=_scheduler(family),
                    safety_checker=None,
                    feature_extractor=None,
                    requires_safety_checker=False,
                )
            if name in ("sdxl", "sdxl-turbo"):
                unet_config = _tiny_unet(unet_cfg) if tiny else unet_cfg
                if tiny:
                    # The UNet's cross-attention takes both encoders' hidden states side by side.
                    unet_config["cross_attention_dim"] = 64
                big_cfg = _tiny_text(OPENCLIP_BIGG_TEXT_CONFIG) if tiny else OPENCLIP_BIGG_TEXT_CONFIG
                return StableDiffusionXLPipeline(
                    vae=vae,
                    text_encoder=text_encoder,
                    text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**big_cfg, **special)),
                    tokenizer=tokenizer,
                    tokenizer_2=tokenizer,
                    unet=UNet2DConditionModel(**unet_config),
                    scheduler=_scheduler(family),
                    force_zeros_for_empty_prompt=name == "sdxl-turbo",
                )
            t5 = T5EncoderModel(T5Config(**(_tiny_t5(T5_XXL_CONFIG) if tiny else T5_XXL_CONFIG)))
            return FluxPipeline(
                vae=vae,
                text_encoder=text_encoder,
                text_encoder_2=t5,
                tokenizer=tokenizer,
                tokenizer_2=_t5_tokenizer(words / "t5"),
                transformer=FluxTransformer2DModel(**(_tiny_flux(unet_cfg) if tiny else unet_cfg)),
                scheduler=_scheduler(family),
            )
    finally:
        torch.set_default_dtype(previous)


def parameter_count(pipeline: Any) -> dict[str, int]:
    """Parameters per module of a built pipeline (the published totals are the check that configs match)."""
    counts = {}
    for name in ("unet", "transformer", "vae", "text_encoder", "text_encoder_2"):
        module = getattr(pipeline, name, None)
        if module is not None:
            counts[name] = sum(p.numel() for p in module.parameters())
    return counts
