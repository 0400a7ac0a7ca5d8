"""Small seeded models of the host's 2026 DiT families (Wan 2.1/2.2 T2V, I2V, VACE and Fun Control, Qwen-Image,
HunyuanVideo, LTXV, Chroma, Lumina2 / Z-Image, HiDream), built from ComfyUI's own model classes through its
supported-model configs, plus matching conditioning and latents. Next to tiny_host (SD1.5, MMDiT, Flux), whose
seeded init they reuse. Imports comfy: use inside a running host only.
"""
import torch

from .tiny_host import seeded_patcher, with_newer_host_fields

CONTEXT_DIM = 64

# family -> (supported_models class name, unet config, latent shape of one sample at 128x128 pixels)
FAMILIES = {
    "wan_t2v": ("WAN21_T2V", {
        "image_model": "wan2.1", "model_type": "t2v", "patch_size": (1, 2, 2), "in_dim": 16, "dim": 64,
        "ffn_dim": 128, "freq_dim": 256, "text_dim": CONTEXT_DIM, "out_dim": 16, "num_heads": 2, "num_layers": 6},
        (16, 3, 16, 16)),
    "wan_i2v": ("WAN21_I2V", {
        "image_model": "wan2.1", "model_type": "i2v", "patch_size": (1, 2, 2), "in_dim": 36, "dim": 64,
        "ffn_dim": 128, "freq_dim": 256, "text_dim": CONTEXT_DIM, "out_dim": 16, "num_heads": 2, "num_layers": 6},
        (16, 3, 16, 16)),
    "qwen_image": ("QwenImage", {
        "image_model": "qwen_image", "patch_size": 2, "in_channels": 64, "out_channels": 16, "num_layers": 6,
        "attention_head_dim": 32, "num_attention_heads": 2, "joint_attention_dim": CONTEXT_DIM,
        "axes_dims_rope": (8, 12, 12)},
        (16, 1, 16, 16)),
    "hunyuan_video": ("HunyuanVideo", {
        "image_model": "hunyuan_video", "in_channels": 16, "out_channels": 16, "vec_in_dim": CONTEXT_DIM,
        "context_in_dim": CONTEXT_DIM, "hidden_size": 64, "mlp_ratio": 4.0, "num_heads": 2, "depth": 2,
        "depth_single_blocks": 4, "axes_dim": [8, 12, 12], "theta": 256, "patch_size": [1, 2, 2], "qkv_bias": True,
        "guidance_embed": True, "byt5": False, "meanflow": False, "use_cond_type_embedding": False,
        "vision_in_dim": None},
        (16, 3, 16, 16)),
    "ltxv": ("LTXV", {
        "image_model": "ltxv", "in_channels": 128, "cross_attention_dim": 64, "attention_head_dim": 32,
        "num_attention_heads": 2, "caption_channels": CONTEXT_DIM, "num_layers": 6},
        (128, 2, 4, 4)),
    "chroma": ("Chroma", {
        "image_model": "chroma", "in_channels": 64, "out_channels": 64, "context_in_dim": CONTEXT_DIM,
        "hidden_size": 64, "mlp_ratio": 4.0, "num_heads": 2, "depth": 2, "depth_single_blocks": 4,
        "axes_dim": [8, 12, 12], "theta": 10000, "patch_size": 2, "qkv_bias": True, "in_dim": 64, "out_dim": 64,
        "hidden_dim": 32, "n_layers": 2},
        (16, 16, 16)),
    "lumina2": ("Lumina2", {
        "image_model": "lumina2", "patch_size": 2, "in_channels": 16, "dim": 64, "n_layers": 4,
        "n_refiner_layers": 1, "n_heads": 2, "n_kv_heads": 2, "multiple_of": 16, "ffn_dim_multiplier": 2.0,
        "norm_eps": 1e-5, "qk_norm": True, "cap_feat_dim": CONTEXT_DIM, "axes_dims": (8, 12, 12),
        "axes_lens": (64, 64, 64)},
        (16, 16, 16)),
}
# Wan 2.1 VACE: the T2V model plus VACE blocks after every other block, fed the control video's latents (inactive +
# reactive, 32 channels) and its mask at latent resolution (64 channels), as WanVaceToVideo builds them.
FAMILIES["wan_vace"] = ("WAN21_Vace", dict(FAMILIES["wan_t2v"][1], model_type="vace", vace_layers=3, vace_in_dim=96),
                        FAMILIES["wan_t2v"][2])
# Wan 2.1 Fun Control: 32 more input channels, the control video's latents and a start image's (WanFunControlToVideo).
FAMILIES["wan_fun_control"] = ("WAN21_FunControl2V", dict(FAMILIES["wan_t2v"][1], model_type="i2v", in_dim=48),
                               FAMILIES["wan_t2v"][2])
# Z-Image's modulation reads a 256-wide time embedding: its width cannot go below 256.
FAMILIES["z_image"] = ("ZImage", dict(FAMILIES["lumina2"][1], dim=256, n_heads=2, n_kv_heads=2,
                                      axes_dims=(32, 48, 48), z_image_modulation=True, time_scale=1000.0,
                                      pad_tokens_multiple=32), FAMILIES["lumina2"][2])


def build_tiny_dit(family, seed=0, **overrides):
    """A ModelPatcher around a small seeded model of the host class of `family` (one of FAMILIES), float32,
    built through the host's supported-model config (so its model sampling, latent format and conds are the
    family's own); `overrides` replace entries of the unet config (e.g. num_layers=3)."""
    import comfy.supported_models

    if family not in FAMILIES:
        raise ValueError(f"tiny DiT family must be one of {', '.join(FAMILIES)}, got {family!r}")
    config_name, unet_config, _ = FAMILIES[family]
    unet_config = dict(unet_config, **overrides)
    if family in ("hunyuan_video", "chroma"):
        import comfy.ldm.chroma.model
        import comfy.ldm.hunyuan_video.model
        params = {"hunyuan_video": comfy.ldm.hunyuan_video.model.HunyuanVideoParams,
                  "chroma": comfy.ldm.chroma.model.ChromaParams}[family]
        unet_config = with_newer_host_fields(params, unet_config)
    return seeded_patcher(getattr(comfy.supported_models, config_name)(unet_config), seed)


def tiny_dit_conditioning(family, seed=0, tokens=8, batch=1):
    """CONDITIONING for a tiny DiT: seeded context tokens, plus the pooled vector HunyuanVideo reads."""
    if family not in FAMILIES:
        raise ValueError(f"tiny DiT family must be one of {', '.join(FAMILIES)}, got {family!r}")
    g = torch.Generator().manual_seed(seed)
    context = torch.randn(batch, tokens, CONTEXT_DIM, generator=g)
    extras = {}
    if family in ("hunyuan_video", "chroma"):       # Chroma's Flux conds read a pooled vector it then ignores
        extras["pooled_output"] = torch.randn(batch, CONTEXT_DIM, generator=g)
    if family == "ltxv":                           # its T5 encoder's token mask
        extras["attention_mask"] = torch.ones(batch, tokens, dtype=torch.int64)
    if family == "wan_i2v":        # the start image's latent, as WanImageToVideo puts it in the conditioning
        shape = FAMILIES[family][2]
        extras["concat_latent_image"] = torch.randn(batch, *shape, generator=g)
        mask = torch.ones(batch, 1, shape[1], shape[2], shape[3])
        mask[:, :, :1] = 0.0
        extras["concat_mask"] = mask
    if family == "wan_fun_control":    # a control video's latents (seeded), no start image (zeros)
        channels, frames, height, width = FAMILIES[family][2]
        extras["concat_latent_image"] = torch.cat([torch.randn(batch, channels, frames, height, width, generator=g),
                                                   torch.zeros(batch, channels, frames, height, width)], dim=1)
    if family == "wan_vace":       # a control video (seeded) over the whole clip, at full strength
        channels, frames, height, width = FAMILIES[family][2]
        extras["vace_frames"] = [torch.randn(batch, 2 * channels, frames, height, width, generator=g)]
        extras["vace_mask"] = [torch.ones(batch, 64, frames, height, width)]
        extras["vace_strength"] = [1.0]
    return [[context, extras]]


def tiny_dit_latent_shape(family, batch=1):
    """The latent shape of a batch for the tiny family (videos: 3 latent frames, images 16x16 latents)."""
    return (batch,) + FAMILIES[family][2]
