"""Caches on the 2026 model families (issue 21), through the host's own sampling path on tiny seeded models of its
own classes (modelzoo/tiny_dits.py): Block Cache on every DiT with block patches (Wan 2.1 T2V / I2V, Qwen-Image,
HunyuanVideo, LTXV, Chroma), the model-level cache on every model (Lumina2 / Z-Image have no block patch), the Wan 2.2
two-expert graph, few-step back-off, CFG 1, interrupts, LoRA (every family), ControlNet, torch.compile, memory and bad
input.

ControlNet per family, on ComfyUI 0.3.75 (Flux's is tested in test_caching.py):
- Qwen-Image: the InstantX ControlNet (comfy.controlnet, ControlNetApplyAdvanced with a VAE) is tested here. Its
  DiffSynth block-wise control (a model patch, QwenImageDiffsynthControlnet) is not.
- Wan 2.1 / 2.2: VACE (a model class of its own, VaceWanModel, fed by WanVaceToVideo) and Fun Control (a model with
  32 more input channels, fed by WanFunControlToVideo) are tested here, each with a seeded control video in the
  conditioning where those nodes put it.
- HunyuanVideo, Chroma: their forwards read Flux-style control residuals, but the host has no ControlNet loader that
  builds one for them.
- LTXV: no ControlNet (its guides are conditioning, LTXVAddGuide). Lumina 2 / Z-Image: none on 0.3.75; ComfyUI 0.33
  adds Z-Image Fun ControlNet (a model patch), Qwen-Image Fun ControlNet and Wan Uni3C, absent from 0.3.75."""
import math
from pathlib import Path

import pytest
import torch

from samplers import caching as qc
from testbed.host import HOST_DIR

BLOCK_FAMILIES = ["wan_t2v", "wan_i2v", "qwen_image", "hunyuan_video", "ltxv", "chroma"]
MODEL_FAMILIES = ["lumina2", "z_image", "wan_t2v", "qwen_image"]

BLOCK_NEVER = {"threshold": 0.0, "front_blocks": 1, "back_blocks": 1, "forecaster": "taylor1", "warmup_steps": 0,
               "max_consecutive": 3, "start_percent": 0.0, "end_percent": 1.0, "history": 3, "few_step_limit": 0}
# Random-weight models have no smooth residuals to probe: the largest threshold with one cached step in a row caches
# about every other step after the warm-up, whatever the probe says.
BLOCK_SKIPPING = {**BLOCK_NEVER, "threshold": 2.0, "warmup_steps": 2, "max_consecutive": 1, "end_percent": 0.95}
MODEL_NEVER = {"threshold": 0.0, "forecaster": "taylor1", "warmup_steps": 0, "max_consecutive": 3,
               "start_percent": 0.0, "end_percent": 1.0, "history": 3, "few_step_limit": 0}
MODEL_SKIPPING = {**MODEL_NEVER, "threshold": 2.0, "warmup_steps": 2, "max_consecutive": 1, "end_percent": 0.95}


def cache_module():
    import sys

    import nodes
    return sys.modules[nodes.NODE_CLASS_MAPPINGS["QuickstepBlockCache"].__module__]


def apply(patcher, node_id, inputs):
    import nodes
    return nodes.NODE_CLASS_MAPPINGS[node_id].execute(model=patcher, **inputs)[0]


def block_cache(patcher, **inputs):
    return apply(patcher, "QuickstepBlockCache", {**BLOCK_NEVER, **inputs})


def model_cache(patcher, **inputs):
    return apply(patcher, "QuickstepModelCache", {**MODEL_NEVER, **inputs})


def sigmas_for(patcher, steps):
    import comfy.samplers
    return comfy.samplers.calculate_sigmas(patcher.get_model_object("model_sampling"), "simple", steps).cpu()


def conditioning_pair(family):
    from modelzoo import tiny_dits
    return tiny_dits.tiny_dit_conditioning(family, 0), tiny_dits.tiny_dit_conditioning(family, 1)


def sample(family, patcher, steps=10, cfg=3.0, sigmas=None, latent=None, noise_seed=0, callback=None,
           conditioning=None):
    """The host's sampling path (what SamplerCustom runs): euler, seeded noise, CFG with another negative
    (`conditioning`: the (positive, negative) pair, by default conditioning_pair(family))."""
    import comfy.sample
    import comfy.samplers
    from modelzoo import tiny_dits
    pos, neg = conditioning_pair(family) if conditioning is None else conditioning
    shape = tiny_dits.tiny_dit_latent_shape(family)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(noise_seed))
    sigmas = sigmas_for(patcher, steps) if sigmas is None else sigmas
    latent = torch.zeros(shape) if latent is None else latent
    return comfy.sample.sample_custom(patcher, noise, cfg, comfy.samplers.sampler_object("euler"), sigmas, pos, neg,
                                      latent, disable_pbar=True, seed=noise_seed, callback=callback)


def psnr(a, b):
    mse = (a.double() - b.double()).pow(2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10(b.abs().max().item() ** 2 / mse)


_MODELS = {}


def tiny(family, seed=0):
    """One tiny model per family and seed for the module (building one takes a second)."""
    from modelzoo import tiny_dits
    if (family, seed) not in _MODELS:
        _MODELS[family, seed] = tiny_dits.build_tiny_dit(family, seed)
    return _MODELS[family, seed]


def last(name):
    return cache_module().LAST_SUMMARY[name]


# ---------------------------------------------------------------------------------------------- block cache, models

@pytest.mark.parametrize("family", BLOCK_FAMILIES)
def test_block_cache_on_each_family_exact_at_threshold_0_and_close_when_skipping(inproc, family):
    base = tiny(family)
    plain = sample(family, base)
    never = sample(family, block_cache(base))
    assert (never - plain).abs().max().item() <= 1e-5, family
    assert last("BlockCache")["blocks_run"] == last("BlockCache")["blocks_total"]
    cached = sample(family, block_cache(base, **BLOCK_SKIPPING))
    summary = last("BlockCache")
    assert summary["blocks_run"] < 0.8 * summary["blocks_total"], summary["line"]
    assert psnr(cached, plain) > 15.0, (family, psnr(cached, plain), summary["line"])


@pytest.mark.parametrize("family", MODEL_FAMILIES)
def test_model_cache_on_each_family_exact_at_threshold_0_and_close_when_skipping(inproc, family):
    base = tiny(family)
    plain = sample(family, base)
    never = sample(family, model_cache(base))
    assert (never - plain).abs().max().item() <= 1e-5, family
    cached = sample(family, model_cache(base, **MODEL_SKIPPING))
    summary = last("ModelCache")
    assert summary["computed"] < summary["calls"], summary["line"]
    assert psnr(cached, plain) > 15.0, (family, psnr(cached, plain), summary["line"])


def with_other_control(family, conditioning):
    """The conditioning with another (seeded) control video: VACE's frames or Fun Control's concatenated latents."""
    key = {"wan_vace": "vace_frames", "wan_fun_control": "concat_latent_image"}[family]
    extras = dict(conditioning[0][1])
    value = extras[key][0] if isinstance(extras[key], list) else extras[key]
    other = torch.randn(value.shape, generator=torch.Generator().manual_seed(7))
    extras[key] = [other] if isinstance(extras[key], list) else other
    return [[conditioning[0][0], extras]]


@pytest.mark.parametrize("cache", ["block", "model"])
@pytest.mark.parametrize("family", ["wan_vace", "wan_fun_control"])
def test_caches_keep_the_control_video_of_wan(inproc, family, cache):
    """Wan's two control paths: VACE adds its hints to the stream after every other block, outside the block
    patches (on a cached step they still run, and the Block Cache's forecast replaces what the skipped middle blocks
    and their hints add); Fun Control feeds the control video's latents as 32 more input channels. The control must
    still steer a cached run: with control video A its error against the uncached run with A is under half (6 dB)
    the difference another control video B makes (random weights, every other step cached)."""
    base = tiny(family)
    positive, negative = conditioning_pair(family)
    plain = sample(family, base)
    plain_other = sample(family, base, conditioning=(with_other_control(family, positive), negative))
    attach, skipping, name = ((block_cache, BLOCK_SKIPPING, "BlockCache") if cache == "block"
                              else (model_cache, MODEL_SKIPPING, "ModelCache"))
    never = sample(family, attach(base))
    assert (never - plain).abs().max().item() <= 1e-5
    cached = sample(family, attach(base, **skipping))
    summary = last(name)
    assert summary["computed"] < summary["calls"], summary["line"]
    assert psnr(cached, plain) > psnr(plain_other, plain) + 6.0, (psnr(cached, plain), psnr(plain_other, plain))


def test_model_cache_leaves_the_sampler_input_untouched(inproc):
    """The host's EasyCache adds to its input in place; the model cache returns new tensors and keeps x as it was."""
    import comfy.patcher_extension as pe
    seen = []

    def record_input(executor, *args, **kwargs):
        x = args[0]
        before = x.clone()
        out = executor(*args, **kwargs)
        seen.append(torch.equal(x, before))
        return out
    watched = tiny("lumina2").clone()       # added before the cache's: the outermost wrapper, called on every step
    watched.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL, "qs_test_input", record_input)
    sample("lumina2", model_cache(watched, **MODEL_SKIPPING))
    assert last("ModelCache")["computed"] < last("ModelCache")["calls"]
    assert seen and all(seen)


def sample_tiny_host(arch, patcher, callback=None):
    """test_caching's host sampling path for modelzoo.tiny_host's models (SD3's MMDiT, the SD1.5 UNet), 10 steps,
    against another context."""
    from modelzoo import tiny_host
    from test_caching import sample_host
    return sample_host(arch, patcher, tiny_host.tiny_conditioning(arch, 0), tiny_host.tiny_conditioning(arch, 1),
                       steps=10, callback=callback)


def test_model_cache_serves_sd3_whose_forward_skips_the_diffusion_model_wrappers(inproc):
    """SD3's MMDiT never calls the host's DIFFUSION_MODEL wrappers (on 0.3.75 and 0.33): the Model Cache, hooked
    there as the host's EasyCache still is, skipped nothing on it, silently. It now hooks apply_model."""
    from modelzoo import tiny_host
    base = tiny_host.build_tiny("mmdit", 0)
    plain = sample_tiny_host("mmdit", base)
    never = sample_tiny_host("mmdit", model_cache(base))
    assert (never - plain).abs().max().item() <= 1e-5
    cached = sample_tiny_host("mmdit", model_cache(base, **MODEL_SKIPPING))
    summary = last("ModelCache")
    assert summary["computed"] < summary["calls"], summary["line"]
    assert psnr(cached, plain) > 15.0, (psnr(cached, plain), summary["line"])


@pytest.mark.parametrize("model", ["lumina2", "sd15", "mmdit"])
def test_model_cache_carries_the_denoised_prediction_to_a_skipped_step(inproc, model):
    """What the Model Cache stores is the model's denoised prediction (x0), for a flow DiT, an eps UNet and SD3
    alike: with the reuse forecaster a skipped step's x0 (CFG-combined, as the sampler sees it) is the last
    computed step's exactly, and every other step's differs."""
    from modelzoo import tiny_host
    x0 = []

    def keep_x0(step, denoised, x, total):
        x0.append(denoised.clone())
    patcher = model_cache(tiny(model) if model == "lumina2" else tiny_host.build_tiny(model, 0),
                          **dict(MODEL_SKIPPING, forecaster="reuse"))
    if model == "lumina2":
        sample(model, patcher, callback=keep_x0)
    else:
        sample_tiny_host(model, patcher, callback=keep_x0)
    summary = last("ModelCache")
    repeated = [torch.equal(a, b) for a, b in zip(x0, x0[1:])]
    assert sum(repeated) == summary["calls"] - summary["computed"] > 0, (repeated, summary["line"])


# ------------------------------------------------------------------------------------------------ Wan 2.2 two experts

def two_expert(high, low, steps=10, switch=5):
    """The stock Wan 2.2 graph: KSamplerAdvanced on the high-noise expert for steps [0, switch) returning leftover
    noise, then KSamplerAdvanced on the low-noise expert for [switch, steps) without new noise."""
    import nodes
    from modelzoo import tiny_dits
    pos, neg = tiny_dits.tiny_dit_conditioning("wan_t2v", 0), tiny_dits.tiny_dit_conditioning("wan_t2v", 1)
    latent = {"samples": torch.zeros(tiny_dits.tiny_dit_latent_shape("wan_t2v"))}
    sampler = nodes.KSamplerAdvanced()
    mid = sampler.sample(high, "enable", 7, steps, 3.0, "euler", "simple", pos, neg, latent, 0, switch, "enable")[0]
    return mid, sampler.sample(low, "disable", 7, steps, 3.0, "euler", "simple", pos, neg, mid, switch, steps,
                               "disable")[0]["samples"]


def test_wan22_two_experts_each_with_its_own_cache_state(inproc):
    """Two Wan models (the high- and low-noise experts) in one graph, each through its own Block Cache: exact at
    threshold 0; when skipping, the low-noise expert's run starts from its own empty history (its first step
    computes: nothing from the high-noise expert is reused at the switch), so its result equals the low-noise run
    on its own from the same switch latent, and stays close to the uncached pair."""
    high, low = tiny("wan_t2v", 0), tiny("wan_t2v", 1)
    mid, plain = two_expert(high, low)
    _, never = two_expert(block_cache(high), block_cache(low))
    assert (never - plain).abs().max().item() <= 1e-5
    skipping = {**BLOCK_SKIPPING, "warmup_steps": 1}
    cached_high, cached_low = block_cache(high, **skipping), block_cache(low, **skipping)
    cached_mid, cached = two_expert(cached_high, cached_low)
    low_run = last("BlockCache")
    assert low_run["calls"] == 5 and low_run["computed"] < 5, low_run["line"]
    import nodes
    from modelzoo import tiny_dits
    pos, neg = tiny_dits.tiny_dit_conditioning("wan_t2v", 0), tiny_dits.tiny_dit_conditioning("wan_t2v", 1)
    alone = nodes.KSamplerAdvanced().sample(cached_low, "disable", 7, 10, 3.0, "euler", "simple", pos, neg,
                                            cached_mid, 5, 10, "disable")[0]["samples"]
    assert torch.equal(alone, cached)
    assert psnr(cached, plain) > 20.0, psnr(cached, plain)


def test_the_benchmarks_two_expert_graph_is_the_stock_one(inproc):
    """bench.caching --two-expert runs the graph through comfy.sample.sample with a per-step callback: the same
    latent as the stock KSamplerAdvanced pair, one x0 per step (the last one the final latent, Euler's last step
    going to sigma 0), and with one model as both experts the pair is one run over all the steps."""
    import comfy.sample
    from bench import caching
    from modelzoo import tiny_dits
    high, low = tiny("wan_t2v", 0), tiny("wan_t2v", 1)
    pos, neg = tiny_dits.tiny_dit_conditioning("wan_t2v", 0), tiny_dits.tiny_dit_conditioning("wan_t2v", 1)
    setup = caching.Setup("wan_t2v", high, "wan_t2v", pos, neg,
                          torch.zeros(tiny_dits.tiny_dit_latent_shape("wan_t2v")), "simple", 3.0)
    out, x0, flops = caching.expert_pair(setup, high, low, 10, 5, seed=7)
    assert torch.equal(out.float(), two_expert(high, low)[1]) and len(x0) == 10
    assert (x0[-1] - out).abs().max().item() <= 1e-5 * out.abs().max().item()
    assert flops > 0
    single_pair, _, _ = caching.expert_pair(setup, high, tiny("wan_t2v", 0), 10, 5, seed=7)
    single = comfy.sample.sample(high, comfy.sample.prepare_noise(setup.latent, 7), 10, 3.0, "euler", "simple", pos,
                                 neg, setup.latent, seed=7)
    assert (single_pair - single.double()).abs().max().item() <= 1e-5


def test_the_benchmarks_temporal_measures():
    """Frame-difference PSNR: an error shared by every frame leaves the differences exact (up to rounding), one
    independent from frame to frame costs 3 dB against the clip PSNR; motion: a clip of twice the change is +6 dB."""
    from bench import caching
    g = torch.Generator().manual_seed(0)
    clip = torch.randn(2, 4, 200, 8, 8, generator=g, dtype=torch.float64)
    shared = clip + 0.1 * torch.randn(2, 4, 1, 8, 8, generator=g, dtype=torch.float64)
    assert caching.frame_difference_psnr(shared, clip) > 200          # exact up to rounding
    independent = clip + 0.1 * torch.randn(clip.shape, generator=g, dtype=torch.float64)
    gap = caching.psnr(independent, clip) - caching.frame_difference_psnr(independent, clip)
    assert abs(gap - 10 * math.log10(2)) < 0.1, gap
    assert abs(caching.motion_db(2 * clip, clip) - 20 * math.log10(2)) < 1e-9
    assert abs(caching.motion_db(shared, clip)) < 1e-9


def test_a_calibration_of_the_other_experts_range_is_refused(inproc):
    """Calibrated on the low-noise expert's steps, used on the high-noise expert's: its curve covers none of the
    cacheable steps (a flat curve there would cache every step): a clear error naming the node and the ranges."""
    import comfy.samplers
    low = tiny("wan_t2v", 1)
    sigmas = sigmas_for(low, 10)
    module = cache_module()
    from modelzoo import tiny_dits
    pos, neg = tiny_dits.tiny_dit_conditioning("wan_t2v", 0), tiny_dits.tiny_dit_conditioning("wan_t2v", 1)
    latent = {"samples": torch.zeros(tiny_dits.tiny_dit_latent_shape("wan_t2v"))}
    module.calibrate(block_cache(low), pos, neg, 3.0, comfy.samplers.sampler_object("euler"), sigmas[5:], latent, 1,
                     "qs_test_wan_low")
    calibrated = block_cache(low, policy="calibrated", calibration="qs_test_wan_low", threshold=0.5, warmup_steps=1,
                             end_percent=0.95)
    sample("wan_t2v", calibrated, sigmas=sigmas[5:])            # its own range: fine
    with pytest.raises(ValueError) as e:
        sample("wan_t2v", calibrated, sigmas=sigmas[:6])
    assert "Block Cache" in str(e.value) and "qs_test_wan_low" in str(e.value) and "outside" in str(e.value)


# ------------------------------------------------------------------------------------ few steps, CFG 1, interrupts

def test_few_step_schedule_backs_off_unless_told_not_to(inproc):
    base = tiny("qwen_image")
    plain = sample("qwen_image", base, steps=4)
    backed_off = sample("qwen_image", block_cache(base, **{**BLOCK_SKIPPING, "few_step_limit": 8}), steps=4)
    assert torch.equal(backed_off, plain) and last("BlockCache")["few_step"]
    assert "few-step schedule" in last("BlockCache")["line"]
    sample("qwen_image", block_cache(base, **{**BLOCK_SKIPPING, "warmup_steps": 1}), steps=4)
    assert last("BlockCache")["computed"] < last("BlockCache")["calls"]
    model_backed_off = sample("qwen_image", model_cache(base, **{**MODEL_SKIPPING, "few_step_limit": 8}), steps=4)
    assert torch.equal(model_backed_off, plain) and last("ModelCache")["few_step"]


@pytest.mark.parametrize("cache", ["block", "model"])
def test_cfg_1_runs_one_pass_per_step_and_the_caches_stay_correct(inproc, cache):
    """At CFG 1 the host skips the negative's pass: one call per step, one batch group; exact at threshold 0."""
    family, apply_cache = "wan_t2v", (block_cache if cache == "block" else model_cache)
    base = tiny(family)
    plain = sample(family, base, cfg=1.0)
    never = sample(family, apply_cache(base), cfg=1.0)
    name = "BlockCache" if cache == "block" else "ModelCache"
    assert (never - plain).abs().max().item() <= 1e-5 and last(name)["calls"] == 10
    skipping = BLOCK_SKIPPING if cache == "block" else MODEL_SKIPPING
    cached = sample(family, apply_cache(base, **skipping), cfg=1.0)
    assert last(name)["computed"] < 10 and psnr(cached, plain) > 15.0


class Stop(Exception):
    pass


@pytest.mark.parametrize("cache", ["block", "model"])
def test_an_interrupted_run_frees_its_state_and_the_next_run_is_unchanged(inproc, cache):
    import gc
    family = "hunyuan_video"
    apply_cache = block_cache if cache == "block" else model_cache
    patched = apply_cache(tiny(family), **(BLOCK_SKIPPING if cache == "block" else MODEL_SKIPPING))
    first = sample(family, patched)

    def stop_at_6(step, *a):
        if step == 6:
            raise Stop()
    with pytest.raises(Stop):
        sample(family, patched, noise_seed=3, callback=stop_at_6)
    name = "BlockCache" if cache == "block" else "ModelCache"
    assert last(name)["calls"] < 2 * 10
    gc.collect()
    assert not [o for o in gc.get_objects() if isinstance(o, qc.RunState) and o.groups]
    assert torch.equal(sample(family, patched), first)


# ------------------------------------------------------------------------------------------------------------ LoRA

LORA_LAYERS = {   # a block the skipping Block Cache always runs (the first) and one it skips (the third)
    "wan_t2v": {"blocks.0.self_attn.o": (64, 64), "blocks.2.self_attn.o": (64, 64)},
    "qwen_image": {"transformer_blocks.0.attn.to_out.0": (64, 64), "transformer_blocks.2.attn.to_out.0": (64, 64)},
    "hunyuan_video": {"double_blocks.0.img_attn.proj": (64, 64), "single_blocks.0.linear2": (64, 320)},
    "ltxv": {"transformer_blocks.0.attn1.to_out.0": (64, 64), "transformer_blocks.2.attn1.to_out.0": (64, 64)},
    "chroma": {"double_blocks.0.img_attn.proj": (64, 64), "single_blocks.0.linear2": (64, 320)},
    # Model Cache families: a cached step skips every layer
    "lumina2": {"layers.0.attention.out": (64, 64), "layers.2.attention.out": (64, 64)},
    "z_image": {"layers.0.attention.out": (256, 256), "layers.2.attention.out": (256, 256)},
}


def family_cache(family, patcher, skipping):
    """The cache that serves `family` (the Block Cache where the family has block patches, else the Model Cache),
    never-skipping or skipping, and the name of its run summary."""
    if family in BLOCK_FAMILIES:
        return block_cache(patcher, **(BLOCK_SKIPPING if skipping else {})), "BlockCache"
    return model_cache(patcher, **(MODEL_SKIPPING if skipping else {})), "ModelCache"


@pytest.mark.parametrize("family", sorted(LORA_LAYERS))
def test_cache_on_a_lora_patched_model(inproc, family):
    """LoRA through the host's loader path (its keys as comfy.lora.model_lora_keys_unet maps them): never-skipping
    equals the patched model exactly; skipping stays nearer the patched model than the unpatched one (the LoRA on
    the skipped blocks or steps is in the forecast residual)."""
    import comfy.lora
    import comfy.sd
    base = tiny(family)
    key_map = comfy.lora.model_lora_keys_unet(base.model, {})
    g = torch.Generator().manual_seed(5)
    lora = {}
    for key, (out_f, in_f) in LORA_LAYERS[family].items():
        assert f"diffusion_model.{key}" in key_map, key
        lora[f"diffusion_model.{key}.lora_up.weight"] = torch.randn(out_f, 1, generator=g) * 8
        lora[f"diffusion_model.{key}.lora_down.weight"] = torch.randn(1, in_f, generator=g) / in_f ** 0.5
    patched, _ = comfy.sd.load_lora_for_models(base, None, lora, 1.0, 0.0)
    assert len(patched.patches) == len(LORA_LAYERS[family])
    plain, patched_plain = sample(family, base), sample(family, patched)
    assert psnr(patched_plain, plain) < 25.0
    never, _ = family_cache(family, patched, skipping=False)
    assert (sample(family, never) - patched_plain).abs().max().item() <= 1e-5
    cached, summary_name = family_cache(family, patched, skipping=True)
    skipping = sample(family, cached)
    assert last(summary_name)["computed"] < last(summary_name)["calls"], last(summary_name)["line"]
    assert psnr(skipping, patched_plain) > psnr(skipping, plain) + 3.0, (psnr(skipping, patched_plain),
                                                                        psnr(skipping, plain))


# ------------------------------------------------------------------------------------------------------ ControlNet

def tiny_wan21_vae():
    """The host's Wan 2.1 VAE (the one Qwen-Image uses), loaded by comfy.sd.VAE from a seeded state dict of width 8:
    its loader reads the width from the checkpoint."""
    import comfy.ldm.wan.vae
    import comfy.sd
    from modelzoo import tiny_host
    vae = comfy.ldm.wan.vae.WanVAE(dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                                   temperal_downsample=[False, True, True])
    tiny_host.seeded_init_(vae, 4)
    return comfy.sd.VAE(sd=vae.state_dict())


def tiny_qwen_instantx_controlnet():
    """An InstantX Qwen-Image ControlNet in the tiny model's shape (2 blocks), wrapped as the host's
    load_controlnet_qwen_instantx wraps one."""
    import comfy.controlnet
    import comfy.latent_formats
    import comfy.ldm.qwen_image.controlnet
    import comfy.model_management
    import comfy.ops
    from modelzoo import tiny_dits, tiny_host
    config = {k: v for k, v in tiny_dits.FAMILIES["qwen_image"][1].items() if k != "image_model"}
    model = comfy.ldm.qwen_image.controlnet.QwenImageControlNetModel(
        operations=comfy.ops.disable_weight_init, dtype=torch.float32, device="cpu", **dict(config, num_layers=2))
    tiny_host.seeded_init_(model, 3)
    return comfy.controlnet.ControlNet(model, compression_ratio=1, latent_format=comfy.latent_formats.Wan21(),
                                       load_device=comfy.model_management.get_torch_device(), extra_conds=[])


def test_block_cache_with_a_qwen_image_controlnet(inproc):
    """The InstantX Qwen-Image ControlNet applied by the stock ControlNetApplyAdvanced node (with the VAE it needs
    to encode the hint): the never-skipping Block Cache equals the uncached controlled model exactly, and the
    control reaches the cached output (its residuals are added after every block)."""
    import nodes
    hint = torch.rand(1, 128, 128, 3, generator=torch.Generator().manual_seed(2))
    controlled = nodes.ControlNetApplyAdvanced().apply_controlnet(
        *conditioning_pair("qwen_image"), tiny_qwen_instantx_controlnet(), hint, 0.5, 0.0, 1.0,
        vae=tiny_wan21_vae())
    base = tiny("qwen_image")
    plain = sample("qwen_image", base, conditioning=controlled)
    never = sample("qwen_image", block_cache(base), conditioning=controlled)
    assert (never - plain).abs().max().item() <= 1e-5
    uncontrolled = sample("qwen_image", block_cache(base))
    assert psnr(never, uncontrolled) < 30.0, psnr(never, uncontrolled)


# ------------------------------------------------------------------------------------------------------ bad input

def test_bad_input_names_the_node_and_the_value(inproc):
    from modelzoo import tiny_dits
    lumina = tiny("lumina2")
    with pytest.raises(ValueError) as e:
        block_cache(lumina)
    assert "Block Cache" in str(e.value) and "NextDiT" in str(e.value) and "no block patch" in str(e.value) \
        and "Model Cache" in str(e.value)
    for node, inputs in (("QuickstepModelCache", {**MODEL_NEVER, "threshold": float("nan")}),
                         ("QuickstepBlockCache", {**BLOCK_NEVER, "threshold": float("inf")})):
        with pytest.raises(ValueError) as e:
            apply(lumina if node == "QuickstepModelCache" else tiny("wan_t2v"), node, inputs)
        assert "threshold" in str(e.value) and "finite" in str(e.value), str(e.value)
    with pytest.raises(ValueError) as e:
        model_cache(lumina, threshold=3.0)
    assert str(e.value).startswith("Model Cache:") and "threshold = 3.0" in str(e.value)
    with pytest.raises(ValueError) as e:
        model_cache(lumina, policy="calibrated", calibration="qs_test_missing_model_cache")
    assert "Model Cache" in str(e.value) and "no file" in str(e.value)
    with pytest.raises(ValueError) as e:
        block_cache(tiny_dits.build_tiny_dit("wan_t2v", 0, num_layers=2))
    assert "leaves no middle block" in str(e.value)


def test_sigmas_that_differ_per_sample_are_refused(inproc):
    module = cache_module()
    assert module._sigma_of({"sigmas": torch.tensor([0.5, 0.5])}, "Block Cache") == 0.5
    with pytest.raises(ValueError) as e:
        module._sigma_of({"sigmas": torch.tensor([0.5, 0.25])}, "Block Cache")
    assert str(e.value).startswith("Block Cache:") and "several noise levels" in str(e.value)


# ------------------------------------------------------------------------------------------------- offload, memory

def test_offloaded_history_gives_the_same_result_and_reports_where(inproc):
    import comfy.model_management
    base = tiny("wan_i2v")
    here = sample("wan_i2v", block_cache(base, **BLOCK_SKIPPING))
    offloaded = sample("wan_i2v", block_cache(base, **BLOCK_SKIPPING, offload=True))
    assert torch.equal(here, offloaded)
    assert f"on {comfy.model_management.unet_offload_device()}" in last("BlockCache")["line"]
    assert last("BlockCache")["peak_bytes"] > 0


def test_extra_memory_estimate_follows_the_config(inproc):
    """The estimate is the stored tensors' size: (history + 1 live copy) x tokens x width x CFG batch x bytes; the
    node's summary reports it."""
    module = cache_module()
    wan = tiny("wan_t2v")
    out = module.QuickstepBlockCache.execute(model=wan, **BLOCK_NEVER)
    layout = out.result[0].model_options["transformer_options"][module.KEY].layout
    config = qc.CacheConfig(0.3, 1, 6, "taylor1", 3)
    total, label = module.estimate_extra_bytes(wan, layout, config)
    tokens = 21 * (480 // 8 // 2) * (832 // 8 // 2)            # 81 frames 832x480: 21 latent frames, patch 1x2x2
    assert label == "81 frames 832x480"
    assert total == (3 + 1) * 2 * tokens * 64 * 2 * 4        # probe + middle img residual, batch 2, float32
    text = out.ui["text"][0] if isinstance(out.ui, dict) else str(out.ui.as_dict())
    assert "extra memory about" in text and "81 frames 832x480" in text
    model = module.QuickstepModelCache.execute(model=wan, **MODEL_NEVER)
    layout = model.result[0].model_options["transformer_options"][module.KEY].layout
    total, _ = module.estimate_extra_bytes(wan, layout, config)
    assert total == (3 + 1) * 16 * 21 * 60 * 104 * 2 * 4


# ---------------------------------------------------------------------------------------------------- torch.compile

def _is_pack_file(filename):
    """A file of this pack as the host loaded it (through its custom_nodes link) or from the checkout, not the host's
    own files, which sit below the checkout (.host/, .host033/) when it is named quickstep."""
    pack = str(Path(__file__).resolve().parent.parent) + "/"
    return "/custom_nodes/quickstep/" in filename or (filename.startswith(pack) and
                                                      not filename.startswith(str(HOST_DIR.resolve()) + "/"))


def test_block_cache_under_torch_compile_does_not_recompile_per_block(inproc):
    """The host's torch.compile wrapper (TorchCompileModel's, CPU-cheap "eager" backend) over a Block Cache on a
    Flux with 10 blocks. Before the cache's bookkeeping was excluded from Dynamo, Dynamo recompiled the block patch
    once per block position (guard `pos == k`) and fell back to eager after 8 (38 recompiles on 12 blocks). Now no
    frame of the pack recompiles, no frame reaches the recompile limit, and the numbers equal the uncompiled cache."""
    import torch._dynamo
    from comfy_api.torch_helpers import set_torch_compile_wrapper
    from modelzoo import tiny_host
    from torch._dynamo.utils import counters, guard_failures
    base = tiny_host.build_tiny("flux", 0, depth=1, depth_single_blocks=9)
    pos, neg = tiny_host.tiny_conditioning("flux", 0), tiny_host.tiny_conditioning("flux", 1)
    cached = block_cache(base, **{**BLOCK_SKIPPING, "warmup_steps": 1})
    import comfy.sample
    import comfy.samplers

    def run(patcher):
        noise = torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(0))
        return comfy.sample.sample_custom(patcher, noise, 3.0, comfy.samplers.sampler_object("euler"),
                                          sigmas_for(base, 3), pos, neg, torch.zeros_like(noise), disable_pbar=True,
                                          seed=0)
    reference = run(cached)
    assert (last("BlockCache")["calls"], last("BlockCache")["computed"]) == (3, 2)
    compiled = cached.clone()
    set_torch_compile_wrapper(compiled, backend="eager")
    torch._dynamo.reset()
    counters.clear()
    guard_failures.clear()
    try:
        out = run(compiled)
        graphs = counters["stats"]["unique_graphs"]
        failures = {code: list(reasons) for code, reasons in guard_failures.items()}
    finally:
        torch._dynamo.reset()
    assert graphs > 0
    assert (last("BlockCache")["calls"], last("BlockCache")["computed"]) == (3, 2)
    ours = {getattr(code, "co_name", code): len(r) for code, r in failures.items()
            if _is_pack_file(getattr(code, "co_filename", ""))}
    assert not ours, ours
    assert all(len(r) < torch._dynamo.config.recompile_limit for r in failures.values()), failures
    assert (out - reference).abs().max().item() <= 1e-5
