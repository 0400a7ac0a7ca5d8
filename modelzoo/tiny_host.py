"""Small models built from ComfyUI's own architecture classes (its SD1.5 UNet, its MMDiT and its Flux DiT), with
seeded random weights, plus matching conditioning. They exercise the host's real block structure, model sampling
and patch points at test-friendly sizes. Imports comfy: use inside a running host only.
"""
import dataclasses
import math

import torch

ARCHITECTURES = ("sd15", "mmdit", "flux")

# Context width and pooled width of the conditioning each tiny model takes.
CONTEXT_DIM = {"sd15": 64, "mmdit": 64, "flux": 64}
POOLED_DIM = {"sd15": None, "mmdit": 64, "flux": 64}

# Fields that ComfyUI 0.33's model-parameter dataclasses require and 0.3.75's do not know, with the values the host's
# own model detection gives the original checkpoints (Flux.1 and Chroma: no text position ids beyond the image's, Chroma:
# no pooled-vector input, HunyuanVideo 1.0: no meanflow sum).
NEWER_HOST_FIELDS = {"txt_ids_dims": [], "vec_in_dim": None, "meanflow_sum": False}


def with_newer_host_fields(params_class, config):
    """`config` plus each NEWER_HOST_FIELDS entry that the running host's `params_class` declares and `config` lacks:
    a newer host requires them, an older host's class rejects them."""
    declared = {f.name for f in dataclasses.fields(params_class)}
    return dict(config, **{k: v for k, v in NEWER_HOST_FIELDS.items() if k in declared and k not in config})


_SD15_UNET = {
    "use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
    "adm_in_channels": None, "in_channels": 4, "out_channels": 4, "model_channels": 32,
    "num_res_blocks": [1, 1], "channel_mult": [1, 2], "transformer_depth": [1, 1], "transformer_depth_output": [1, 1, 1, 1],
    "transformer_depth_middle": 1, "use_linear_in_transformer": True, "context_dim": 64, "num_heads": 2,
    "use_temporal_resblock": False, "use_temporal_attention": False,
}
_MMDIT = {
    "in_channels": 16, "out_channels": 16, "patch_size": 2, "depth": 2, "input_size": None, "adm_in_channels": 64,
    "pos_embed_max_size": 32, "num_patches": 1024, "pos_embed_scaling_factor": None,
    "context_embedder_config": {"target": "torch.nn.Linear", "params": {"in_features": 64, "out_features": 128}},
    "x_block_self_attn_layers": [],
}
_FLUX = {
    "image_model": "flux", "in_channels": 16, "out_channels": 16, "vec_in_dim": 64, "context_in_dim": 64,
    "hidden_size": 64, "mlp_ratio": 4.0, "num_heads": 2, "depth": 2, "depth_single_blocks": 2,
    "axes_dim": [8, 12, 12], "theta": 10000, "patch_size": 2, "qkv_bias": True, "guidance_embed": True,
}


def seeded_init_(module, seed):
    """ComfyUI's layers skip weight init (they hold uninitialised memory): fill every parameter, and every float
    buffer a checkpoint would carry (MMDiT's pos_embed is torch.empty until loaded), reproducibly."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, b in sorted(module.named_buffers(), key=lambda kv: kv[0]):
            if b.is_floating_point():
                b.copy_(torch.randn(b.shape, generator=g) * 0.02)
        for name, p in sorted(module.named_parameters(), key=lambda kv: kv[0]):
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
            elif name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
            else:
                p.fill_(1.0)


def time_embedding_input(dm):
    """The linear layer that reads the host's sinusoidal timestep embedding: a Flux's time_in.in_layer (256 wide,
    of 1000 * sigma: Flux's time factor), an MMDiT's t_embedder.mlp[0] (256 wide, of 1000 * sigma: its model
    sampling's multiplier) or a UNet's time_embed[0] (model_channels wide, of the discrete timestep, 999 to 0). All
    three lay the embedding out as [cos, sin] with max period 10000, over a timestep that spans about 1000."""
    if hasattr(dm, "time_in"):
        return dm.time_in.in_layer
    if hasattr(dm, "t_embedder"):
        return dm.t_embedder.mlp[0]
    if hasattr(dm, "time_embed"):
        return dm.time_embed[0]
    raise ValueError(f"{type(dm).__name__} has no Flux-, MMDiT- or UNet-style timestep embedder")


def smooth_time_embedding_(dm, cycles=0.5):
    """Make a seeded Flux's, MMDiT's or UNet's output vary smoothly with sigma, as a trained one's does: its time
    embedding reads only the sinusoids of the host's timestep embedding that turn at most `cycles` times while the
    timestep crosses its range of about 1000 (sigma from 1 to 0 for the DiTs, timestep 999 to 0 for the UNet).
    Seeded weights read every frequency, the fastest of which turns about 160 times, so the output of a random model
    jumps between neighbouring steps. The kept columns are rescaled to keep the embedding's variance."""
    layer = time_embedding_input(dm)
    half = layer.weight.shape[1] // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float64) / half)
    keep = (1000 * freqs / (2 * math.pi) <= cycles).repeat(2)
    with torch.no_grad():
        layer.weight[:, ~keep] = 0
        layer.weight.mul_(math.sqrt(keep.numel() / int(keep.sum())))


def unet_config(arch, **overrides):
    """The config dict of the tiny `arch` model (one of ARCHITECTURES) for this host's model classes, `overrides`
    replacing entries, with the fields a newer host's FluxParams requires (with_newer_host_fields)."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"tiny model architecture must be one of {ARCHITECTURES}, got {arch!r}")
    config = dict({"sd15": _SD15_UNET, "mmdit": _MMDIT, "flux": _FLUX}[arch])
    if arch == "flux":
        import comfy.ldm.flux.model
        config = with_newer_host_fields(comfy.ldm.flux.model.FluxParams, config)
    config.update(overrides)
    return config


def build_tiny(arch="sd15", seed=0, **overrides):
    """A ModelPatcher around a small, seeded model of the host's `arch` class (one of ARCHITECTURES); `overrides`
    replace entries of its config (e.g. depth=1 for fewer blocks)."""
    import comfy.supported_models

    config = unet_config(arch, **overrides)   # checks arch
    config = {"sd15": comfy.supported_models.SD15, "mmdit": comfy.supported_models.SD3,
              "flux": comfy.supported_models.Flux}[arch](config)
    return seeded_patcher(config, seed)


def seeded_patcher(config, seed):
    """A float32 host model of a supported-models `config` with seeded weights, in a ModelPatcher."""
    import comfy.model_management
    import comfy.model_patcher
    config.set_inference_dtype(torch.float32, None)
    offload_device = comfy.model_management.unet_offload_device()
    model = config.get_model({}, device=offload_device)
    seeded_init_(model.diffusion_model, seed)
    return comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                            offload_device=offload_device)


def tiny_conditioning(arch="sd15", seed=0, tokens=8, batch=1, context_dim=0):
    """CONDITIONING for a tiny model: seeded context tokens (and the pooled vector the DiTs need).
    `context_dim` > 0 overrides the width (768 for the SD1.5-detectable checkpoint file)."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"tiny model architecture must be one of {ARCHITECTURES}, got {arch!r}")
    g = torch.Generator().manual_seed(seed)
    extras = {}
    context = torch.randn(batch, tokens, context_dim or CONTEXT_DIM[arch], generator=g)
    if POOLED_DIM[arch] is not None:
        extras["pooled_output"] = torch.randn(batch, POOLED_DIM[arch], generator=g)
    return [[context, extras]]
