"""Published component configs (config.json) of SD 1.5, SDXL / SDXL-Turbo and FLUX.1-schnell, embedded.

Copied from runwayml/stable-diffusion-v1-5, stabilityai/stable-diffusion-xl-base-1.0 (SDXL-Turbo's components
have the same shapes) and black-forest-labs/FLUX.1-schnell; only architecture keys (no file names, no
weights). bench.gpu_models builds the modules from them with random weights.
"""

from __future__ import annotations

from typing import Any

# unet/config.json of SD 1.5 (859.5 M parameters).
SD15_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "down_block_types": (
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
}
# unet/config.json of SDXL base 1.0 (2,567.5 M parameters); SDXL-Turbo's UNet has the same shapes.
SDXL_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (320, 640, 1280),
    "layers_per_block": 2,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "transformer_layers_per_block": (1, 2, 10),
    "cross_attention_dim": 2048,
    "attention_head_dim": (5, 10, 20),
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
    "norm_num_groups": 32,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
}
_VAE_BASE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "act_fn": "silu",
    "block_out_channels": (128, 256, 512, 512),
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
}
SD15_VAE_CONFIG: dict[str, Any] = {
    **_VAE_BASE,
    "latent_channels": 4,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}
SDXL_VAE_CONFIG: dict[str, Any] = {
    **_VAE_BASE,
    "latent_channels": 4,
    "sample_size": 1024,
    "scaling_factor": 0.13025,
    "force_upcast": True,
}
FLUX_VAE_CONFIG: dict[str, Any] = {
    **_VAE_BASE,
    "latent_channels": 16,
    "sample_size": 1024,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}
# text_encoder/config.json (CLIP ViT-L/14 text tower): SD 1.5, SDXL's first encoder, FLUX's CLIP.
CLIP_L_TEXT_CONFIG: dict[str, Any] = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "max_position_embeddings": 77,
    "vocab_size": 49408,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
    "layer_norm_eps": 1e-5,
}
# text_encoder_2/config.json of SDXL (OpenCLIP ViT-bigG/14 text tower, with projection).
OPENCLIP_BIGG_TEXT_CONFIG: dict[str, Any] = {
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_attention_heads": 20,
    "num_hidden_layers": 32,
    "max_position_embeddings": 77,
    "vocab_size": 49408,
    "hidden_act": "gelu",
    "projection_dim": 1280,
    "layer_norm_eps": 1e-5,
}
# transformer/config.json of FLUX.1-schnell (11.9 B parameters).
FLUX_TRANSFORMER_CONFIG: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 64,
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "guidance_embeds": False,
    "axes_dims_rope": (16, 56, 56),
}
# text_encoder_2/config.json of FLUX.1-schnell (T5 v1.1 XXL encoder, 4.8 B parameters).
T5_XXL_CONFIG: dict[str, Any] = {
    "d_model": 4096,
    "d_ff": 10240,
    "d_kv": 64,
    "num_heads": 64,
    "num_layers": 24,
    "feed_forward_proj": "gated-gelu",
    "vocab_size": 32128,
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "layer_norm_epsilon": 1e-6,
    "dropout_rate": 0.0,
    "is_gated_act": True,
    "dense_act_fn": "gelu_new",
    "tie_word_embeddings": False,
}
