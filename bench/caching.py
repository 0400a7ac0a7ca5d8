"""Feature-cache benchmark: Quickstep's DeepCache / Block Cache (residual-probe and calibrated policies, all
forecasters) beside the host's EasyCache and LazyCache, on host-architecture models.

Each configuration samples the same noise through the host's own sampling path (euler, 24 steps by default, CFG with
a different negative, batch 2). Measured per configuration:
- model calls: sampler-level calls (PREDICT_NOISE wrapper), one per CFG-combined prediction;
- compute ratio: uncached FLOPs / cached FLOPs, FLOPs counted by torch's FlopCounterMode over everything that ran
  inside sampling (the diffusion model plus the caches' own work), in a separate counted run;
- wall speedup: uncached / cached wall time of an uncounted run (one thread; the uncached time is the faster of a
  run before and one after the others; noisy on a shared machine);
- PSNR (peak = max |x| of the reference) and SSIM (7x7 Gaussian window, both tensors scaled by the reference's range)
  of the final latent against the uncached run.
Calibrated policies are calibrated with the Calibrate Cache code path on the noise seed after the measured one
(--seed, 0 by default).
On a video latent [B, C, T, H, W] also its temporal consistency: the frame-difference PSNR (x[t+1] - x[t] of the
cached clip against the uncached clip's, the clip PSNR's peak; target: at most TEMPORAL_DB below the clip PSNR) and
the motion in dB (mean squared frame difference against the uncached clip's; target: within TEMPORAL_DB of 0).

Models: "digits" and "digits-flow", the pack's trained SD1.5-architecture UNets (MNIST, pixel space,
modelzoo/mnist_unet.py; eps with the karras schedule, rectified flow with the simple one; digits 3 and 7 against the
null digit, CFG 2.5); "digits-<architecture>", the other trained digit models of modelzoo/digit_models.py (their
8x8 latents included: digits-sd15_taesd, -sdxl_taesdxl, -sd3_taesd3 and -flux_taef1 in real TAESD-family latents);
"digits-page" / "digits-flow-page", the SD1.5 digit UNets on a 64x64 page (build_digit_page: the size at which
the host caches' probe, which reads every 8th position, sees 8x8 positions); tiny seeded random-weight host models "sd15" (UNet),
"mmdit4" (4 joint blocks), "flux12" (4 double + 8 single blocks), and "flux12-smooth" and "mmdit12-smooth" (that
Flux, and an MMDiT of mmdit4's width with 12 joint blocks, whose time embeddings read only the sinusoids that turn at
most half a cycle over the schedule, so their output varies smoothly with sigma as a trained model's does; not
trained), CFG 3.

Per model: a speed-vs-PSNR curve per cache (its main knob swept), the largest compute ratio each cache reaches at
>= 30 dB, how many EasyCache/LazyCache points a Quickstep point dominates (no less compute ratio and PSNR), and the
forecasters compared at equal compute (the same compute steps: uniform DeepCache interval, calibrated Block Cache).
Block Cache's residual-probe threshold is swept with the node's default forecaster and with plain reuse.

"sd15-full-smooth" (not in the default --models: about 15 min on a 2-core CPU at 20 steps): the host's full-size
SD1.5 UNet (860M parameters), seeded random weights, its time embedding smoothed the same way, a 24x24 latent,
batch 1, CFG 3, 77-token contexts; a short sweep (SHORT_SWEEP).

--preset NAME [NAME ...]: sample on a distilled preset's own SIGMAS and CFG (samplers/distilled.py FAMILIES with a
flow shift: wan_lightning, qwen_image_lightning, z_image_turbo, flux_schnell, sd35_turbo) instead of the model's
scheduler at CFG 2.5/3: one name for every model, or one per model in order; --steps then defaults to the preset's
first published count. Each Quickstep cache then also runs with its few-step back-off off (few_step_limit 0), to show
what the back-off keeps.

--tune-model-cache SEED [SEED ...]: instead of the sweep, the grid the Model Cache's defaults were chosen on
(TUNING_GRID: window end x threshold x skipped steps in a row) on every given noise seed; per setting the compute
ratio and the PSNR over the seeds (lowest, median, how many under 30 dB). Run it on tuning models only (the README
names them: the pixel digit UNets "digits" and "digits-flow").

--two-expert SWITCH: instead of the sweep, the Wan 2.2 two-expert graph (the stock KSamplerAdvanced split: the
high-noise expert for steps [0, SWITCH) returning leftover noise, the low-noise expert for the rest without new
noise) with the model loaded twice as the two experts, each patcher with its own cache node at its defaults (host
and Quickstep caches): the x0 prediction's PSNR at every step against the uncached pair, the steps around the switch
(SWITCH_WINDOW) against the median of the others (target: at most SWITCH_DROP_DB below), and the same cache on one
patcher over all the steps as the control.

usage: python -m bench.caching [--steps 24] [--models digits digits-flow sd15 mmdit4 flux12 flux12-smooth
                                                   mmdit12-smooth sd15-full-smooth] [--quick] [--preset NAME ...]
                          [--two-expert SWITCH]
Writes bench/results/caching.json and prints markdown tables.
"""
import argparse
import itertools
import json
import logging
import math
import statistics
import sys
import time
from pathlib import Path

import torch

from modelzoo import tiny_host
from modelzoo.digit_models import ARCHITECTURES
from samplers.operators import ssim as image_ssim
from testbed.host import HOST_DIR, PACK_DIR

RESULTS = PACK_DIR / "bench" / "results"
TARGET_DB = 30.0


class Setup:
    """A model with what sampling it needs: conditioning, start latent, scheduler, CFG."""

    def __init__(self, name, patcher, arch, positive, negative, latent, scheduler, cfg):
        self.name, self.patcher, self.arch = name, patcher, arch
        self.positive, self.negative, self.latent = positive, negative, latent
        self.scheduler, self.cfg = scheduler, cfg
        self.sigmas = None           # a distilled preset's own SIGMAS, used instead of the scheduler's

    def use_preset(self, preset, steps):
        """Sample on distilled preset `preset`'s published SIGMAS for `steps` and at its CFG."""
        from samplers import distilled
        family = distilled.FAMILIES.get(preset)
        if family is None or family.shift is None:
            raise SystemExit(f"unknown flow preset {preset!r}; known: "
                             f"{', '.join(n for n, f in distilled.FAMILIES.items() if f.shift is not None)}")
        if steps not in family.steps:
            raise SystemExit(f"preset {preset!r} publishes {', '.join(map(str, family.steps))} steps, not {steps}")
        self.sigmas, self.cfg = distilled.flow_preset_sigmas(family, steps), family.cfg


def build_digits(name, batch):
    """A trained digit model of the zoo (modelzoo/digit_models.py; names as bench.solvers gives them: "digits",
    "digits-flow", "digits-<architecture>"): digits 3 and 7 (repeated to the batch) against the empty digit, CFG
    2.5, the family's blank latent; karras for the eps UNets, simple for flow models."""
    from modelzoo import digit_models
    arch_name, prediction = {"digits": ("sd15", "eps"), "digits-flow": ("sd15", "flow")}.get(
        name, (name[len("digits-"):], None))
    patcher = digit_models.load_digit_model(arch_name, prediction)
    family = digit_models.architecture(arch_name)
    flow = (prediction or family.predictions[0]) != "eps"
    # the caches tell a UNet (DeepCache) from a DiT (Block Cache) by this label (the real-latent models by their class)
    arch = {"SD15": "sd15", "SDXL": "sd15", "Flux": "flux"}.get(family.host_class, arch_name)
    return Setup(name, patcher, arch, digit_models.digit_conditioning([3, 7]),
                 digit_models.unconditional_conditioning(batch), digit_models.empty_latent(arch_name, batch),
                 "simple" if flow else "karras", 2.5)


def build_digit_page(name, batch):
    """"digits-page" / "digits-flow-page": the SD1.5 pixel-space digit UNet (eps / flow) on a 64x64 page, twice the
    side it was trained on (its convolutions and attention take any size; it draws digit strokes across the page).
    The host caches' change probe reads every 8th latent position, so here it sees 8x8 of them, as on a 512 px SD1.5
    image, where on the 8x8 latents of the other digit models it sees one. Every cache is judged against this same
    model uncached."""
    setup = build_digits(name[:-len("-page")], batch)
    setup.name, setup.latent = name, torch.full((batch, 1, 2 * setup.latent.shape[-2], 2 * setup.latent.shape[-1]),
                                                -1.0)
    return setup


def build_tiny_host(name, batch):
    arch, overrides, smooth = DEEPER_DITS.get(name, (name, {}, False))
    patcher = finite_buffers(tiny_host.build_tiny(arch, 0, **overrides))
    if smooth:
        tiny_host.smooth_time_embedding_(patcher.model.diffusion_model)
    channels = 4 if arch == "sd15" else 16
    return Setup(name, patcher, arch, tiny_host.tiny_conditioning(arch, 0), tiny_host.tiny_conditioning(arch, 1),
                 torch.zeros(batch, channels, 16, 16), "normal" if arch == "sd15" else "simple", 3.0)


def build_tiny_dit(name, batch):
    """A tiny seeded model of a 2026 family (modelzoo/tiny_dits.py: Wan, Qwen-Image, HunyuanVideo, LTXV, Chroma,
    Lumina2, Z-Image), its own latent shape and conditioning."""
    from modelzoo import tiny_dits
    patcher = tiny_dits.build_tiny_dit(name, 0)
    return Setup(name, patcher, name, tiny_dits.tiny_dit_conditioning(name, 0, batch=1),
                 tiny_dits.tiny_dit_conditioning(name, 1, batch=1),
                 torch.zeros(tiny_dits.tiny_dit_latent_shape(name, batch)), "simple", 3.0)


def build_setup(name, batch=2):
    """The Setup of a benchmark model by name: BUILDERS maps each name to its builder(name, batch). A new model
    family (e.g. the trained digit models of modelzoo/digit_models.py) is one entry there."""
    if name not in BUILDERS:
        raise SystemExit(f"unknown model {name!r}; known: {', '.join(BUILDERS)}")
    return BUILDERS[name](name, batch)


# name -> (architecture, config overrides of its tiny model, smooth time dependence). MMDiT's width is 64 * depth:
# the context embedder must follow. Smooth: the time embedding reads only slow sinusoids
# (tiny_host.smooth_time_embedding_), so the output varies smoothly with sigma as a trained model's does.
MMDIT_256_CONTEXT = {"target": "torch.nn.Linear", "params": {"in_features": 64, "out_features": 256}}
DEEPER_DITS = {
    "mmdit4": ("mmdit", {"depth": 4, "context_embedder_config": MMDIT_256_CONTEXT}, False),
    "flux12": ("flux", {"depth": 4, "depth_single_blocks": 8}, False),
    "flux12-smooth": ("flux", {"depth": 4, "depth_single_blocks": 8}, True),
    # the MMDiT counterpart: mmdit4's width (depth 4: 256 wide, 4 heads) with 12 joint blocks (num_blocks), as many
    # as flux12 has, so a cache can keep front and back blocks live and still skip most of the model
    "mmdit12-smooth": ("mmdit", {"depth": 4, "num_blocks": 12, "context_embedder_config": MMDIT_256_CONTEXT},
                       True),
}


TINY_DIT_FAMILIES = ("wan_t2v", "wan_i2v", "qwen_image", "hunyuan_video", "ltxv", "chroma", "lumina2", "z_image")
BUILDERS = {
    # "digits" / "digits-flow" are the SD1.5 UNets; every other zoo architecture is "digits-<name>"
    **{name: build_digits for name in ("digits", "digits-flow", *(f"digits-{arch}" for arch in ARCHITECTURES
                                                                   if arch != "sd15"))},
    **{name: build_digit_page for name in ("digits-page", "digits-flow-page")},
    "sd15-full-smooth": lambda name, batch: build_sd15_full(name, 24, 1, smooth=True),   # one call takes seconds
    **{name: build_tiny_host for name in ("sd15", "mmdit", "flux", *DEEPER_DITS)},
    **{name: build_tiny_dit for name in TINY_DIT_FAMILIES},
}


# Models too slow on a CPU for the whole sweep: the host caches at their defaults only, DeepCache at its defaults
# and its interval swept (3, 4, default, 8), and its default forecaster against plain reuse at the default interval;
# no calibrated policy.
SHORT_SWEEP = {"sd15-full-smooth"}


def finite_buffers(patcher):
    """The host's MMDiT keeps pos_embed as an uninitialised buffer (torch.empty) that seeded_init_ does not fill:
    it can hold NaN. Fill such buffers reproducibly so every run is finite and comparable."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, buf in sorted(patcher.model.diffusion_model.named_buffers(), key=lambda kv: kv[0]):
            if buf.is_floating_point():
                buf.copy_(torch.randn(buf.shape, generator=g) * 0.02)
    return patcher


def node(name):
    import nodes
    return nodes.NODE_CLASS_MAPPINGS[name]


def caching_nodes():
    """The pack's nodes/caching.py as the host loaded it (under a path-derived module name)."""
    return sys.modules[node("QuickstepDeepCache").__module__]


def with_input_copy(patcher):
    """A clone whose diffusion model gets a copy of its input, outermost of the DIFFUSION_MODEL wrappers.
    The host's EasyCache adds its cached change to that input in place; on a CONST (flow) model in float32 the host's
    calculate_input returns the sampler's own tensor, which then computes the denoised value from a moved x and
    corrupts EasyCache's result. On a GPU in fp16/bf16 the dtype cast makes a copy, so users never see this: every
    configuration here, cached or not, ours or the host's, runs with the copy, as users run them."""
    import comfy.patcher_extension
    copied = patcher.clone()

    def copy_input(executor, x, *args, **kwargs):
        return executor(x.clone(), *args, **kwargs)
    copied.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "quickstep_bench_input_copy",
                                copy_input)
    return copied


def apply(patcher, spec):
    """spec: None (uncached) or (node id, inputs dict); the cache goes on a clone given a copy of its input."""
    patcher = with_input_copy(patcher)
    if spec is None:
        return patcher
    out = node(spec[0]).execute(model=patcher, **spec[1])
    out = getattr(out, "result", out)
    return out[0] if isinstance(out, (tuple, list)) else out


def sigmas_of(setup, steps):
    import comfy.samplers
    if setup.sigmas is not None:
        return setup.sigmas
    return comfy.samplers.calculate_sigmas(setup.patcher.get_model_object("model_sampling"), setup.scheduler,
                                           steps).cpu()


def sample(setup, patcher, steps, seed=0, count_flops=False):
    """(latent, sampler-level model calls, FLOPs or None, wall seconds)."""
    import comfy.patcher_extension
    import comfy.sample
    import comfy.samplers
    from torch.utils.flop_counter import FlopCounterMode
    calls = [0]
    counted = patcher.clone()

    def count(executor, *args, **kwargs):
        calls[0] += 1
        return executor(*args, **kwargs)
    counted.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.PREDICT_NOISE, "quickstep_bench", count)
    latent = setup.latent
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(seed))
    sampler = comfy.samplers.sampler_object("euler")
    args = (counted, noise, setup.cfg, sampler, sigmas_of(setup, steps), setup.positive, setup.negative, latent)
    t0 = time.perf_counter()
    if count_flops:
        with FlopCounterMode(display=False) as fc:
            out = comfy.sample.sample_custom(*args, disable_pbar=True, seed=seed)
        flops = fc.get_total_flops()
    else:
        out, flops = comfy.sample.sample_custom(*args, disable_pbar=True, seed=seed), None
    return out.double(), calls[0], flops, time.perf_counter() - t0


def psnr(a, b):
    mse = (a - b).pow(2).mean().item()
    peak = b.abs().max().item()
    return math.inf if mse == 0 else 10 * math.log10(peak * peak / mse)


def frame_difference_psnr(a, b):
    """Temporal consistency of clip `a` against reference clip `b` (video latents [B, C, T, H, W]): the PSNR of a's
    frame-to-frame differences a[t+1] - a[t] against b's, with the clip PSNR's peak (max |b|), so the two PSNRs
    compare directly: errors independent from frame to frame give about 3 dB less than the clip PSNR, an error shared
    by all frames none. The digit latents are the pixels up to a pixel shuffle and one scale factor, so the figure is
    the same on the decoded frames."""
    mse = (a.diff(dim=2) - b.diff(dim=2)).pow(2).mean().item()
    peak = b.abs().max().item()
    return math.inf if mse == 0 else 10 * math.log10(peak * peak / mse)


def motion_db(a, b):
    """The frame-to-frame change of clip `a` against reference `b`'s, in dB (10 log10 of the ratio of the mean
    squared frame differences): 0 is the reference's motion, below 0 a stiller clip, above 0 more flicker."""
    return 10 * math.log10(a.diff(dim=2).pow(2).mean().item() / b.diff(dim=2).pow(2).mean().item())


# the temporal target: frame-difference PSNR at most this far below the clip PSNR, motion at most this far from 0
TEMPORAL_DB = 1.0


def ssim(a, b):
    """SSIM of latents: both mapped to [-1, 1] by the reference's range, then samplers.operators.ssim (a video
    latent's frames are folded into its channels)."""
    if a.ndim == 5:
        a, b = a.flatten(1, 2), b.flatten(1, 2)
    lo, hi = b.amin(dim=(1, 2, 3), keepdim=True), b.amax(dim=(1, 2, 3), keepdim=True)
    scale = (hi - lo).clamp_min(1e-12)
    return image_ssim(2 * (a - lo) / scale - 1, 2 * (b - lo) / scale - 1)


def calibrate(setup, spec, steps, name, measured_seed):
    """Calibrate the cache of `spec` (computing every step) on the noise seed after `measured_seed`, so a calibrated
    policy is never scored on the noise it was calibrated on; returns the calibration name."""
    import comfy.samplers
    cached = apply(setup.patcher, spec)
    caching_nodes().calibrate(cached, setup.positive, setup.negative, setup.cfg,
                              comfy.samplers.sampler_object("euler"), sigmas_of(setup, steps),
                              {"samples": setup.latent}, measured_seed + 1, name)
    return name


def defaults(node_id):
    """The node's own input defaults (so "default" rows follow the nodes), without the model input."""
    return {i.id: i.default for i in node(node_id).define_schema().inputs if getattr(i, "default", None) is not None}


FORECASTERS = ("reuse", "taylor1", "taylor2", "chebyshev")


def configs(setup, steps, quick, seed=0):
    """[(cache family, label, spec)]: uncached, the host caches and Quickstep's, defaults first then sweeps, measured
    on noise `seed`."""
    short = setup.name in SHORT_SWEEP
    host_thresholds = (0.2,) if quick or short else (0.05, 0.1, 0.2, 0.4, 0.8)
    out = [("uncached", "uncached", None)]
    for cache in ("EasyCache", "LazyCache"):
        base = dict(defaults(cache), verbose=False)
        for t in host_thresholds:
            label = f"{cache} t={t}" + (" (default)" if t == base["reuse_threshold"] else "")
            out.append((cache, label, (cache, dict(base, reuse_threshold=t))))
    if setup.arch == "sd15":
        deep = defaults("QuickstepDeepCache")
        out.append(("DeepCache", "DeepCache (default)", ("QuickstepDeepCache", deep)))
        if quick:
            return out + model_cache_configs(setup, quick)
        if short:
            for n in (3, 4, 8):
                out.append(("DeepCache", f"DeepCache N={n}", ("QuickstepDeepCache", dict(deep, interval=n))))
            out.append(("forecaster", "DeepCache (default) reuse",
                        ("QuickstepDeepCache", dict(deep, forecaster="reuse"))))
            return out
        for n in (2, 3, 4, 6, 8):
            out.append(("DeepCache", f"DeepCache N={n}", ("QuickstepDeepCache", dict(deep, interval=n))))
        name = calibrate(setup, ("QuickstepDeepCache", dict(deep, interval=1)), steps, f"bench_{setup.name}", seed)
        for t in (0.1, 0.24, 0.5, 1.0):
            out.append(("DeepCache calibrated", f"DeepCache calibrated t={t}", ("QuickstepDeepCache", dict(
                deep, schedule="calibrated", calibration=name, threshold=t, interval=8))))
        for fc in FORECASTERS:
            out.append(("forecaster", f"DeepCache N=4 {fc}", ("QuickstepDeepCache",
                                                              dict(deep, interval=4, forecaster=fc))))
        return out + model_cache_configs(setup, quick)
    out += model_cache_configs(setup, quick)
    if layout_of(setup) is None:           # no block patch (Lumina2, Z-Image, HiDream): the model cache only
        return out
    block = block_cache_defaults(setup)
    out.append(("BlockCache", "BlockCache (default)" + (", back_blocks 0" if not block["back_blocks"] else ""),
                ("QuickstepBlockCache", block)))
    if setup.sigmas is not None:
        out.append(("BlockCache", "BlockCache (default), back-off off",
                    ("QuickstepBlockCache", dict(block, few_step_limit=0))))
    if quick:
        return out
    for forecaster in (block["forecaster"], "reuse"):
        family = "BlockCache" if forecaster == block["forecaster"] else f"BlockCache {forecaster}"
        for t in (0.1, 0.2, 0.3, 0.4, 0.6):
            if forecaster != block["forecaster"] or t != block["threshold"]:
                out.append((family, f"BlockCache t={t} {forecaster}",
                            ("QuickstepBlockCache", dict(block, threshold=t, forecaster=forecaster))))
    name = calibrate(setup, ("QuickstepBlockCache", dict(block, threshold=0.0)), steps, f"bench_{setup.name}", seed)
    calibrated = dict(block, policy="calibrated", calibration=name, max_consecutive=5, warmup_steps=1)
    for t in (0.1, 0.24, 0.5, 1.0):
        out.append(("BlockCache calibrated", f"BlockCache calibrated t={t}",
                    ("QuickstepBlockCache", dict(calibrated, threshold=t))))
    for fc in FORECASTERS:
        out.append(("forecaster", f"BlockCache calibrated t=0.5 {fc}",
                    ("QuickstepBlockCache", dict(calibrated, threshold=0.5, forecaster=fc))))
    return out


def model_cache_configs(setup, quick):
    """The Model Cache (it serves every model, UNets included): its default, then its threshold swept, and the low
    thresholds again with one more skipped step allowed in a row (its other knob)."""
    model = defaults("QuickstepModelCache")
    out = [("ModelCache", "ModelCache (default)", ("QuickstepModelCache", model))]
    if setup.sigmas is not None:
        out.append(("ModelCache", "ModelCache (default), back-off off",
                    ("QuickstepModelCache", dict(model, few_step_limit=0))))
    if not quick:
        for t in (0.05, 0.1, 0.15, 0.4):
            out.append(("ModelCache", f"ModelCache t={t}", ("QuickstepModelCache", dict(model, threshold=t))))
        longer = model["max_consecutive"] + 1
        for t in (0.05, 0.1):
            out.append(("ModelCache", f"ModelCache t={t}, {longer} in a row",
                        ("QuickstepModelCache", dict(model, threshold=t, max_consecutive=longer))))
    return out


SUMMARY_OF = {"QuickstepDeepCache": "DeepCache", "QuickstepBlockCache": "BlockCache",
              "QuickstepModelCache": "ModelCache"}


def layout_of(setup):
    return caching_nodes()._dit_layout(setup.patcher.model.diffusion_model)


def block_cache_defaults(setup):
    """The Block Cache node's defaults, with no back block kept live on a model of two blocks or fewer."""
    return dict(defaults("QuickstepBlockCache"), back_blocks=1 if len(layout_of(setup)) > 2 else 0)


def benchmark(model_name, steps, quick, log, preset=None, seed=0):
    setup = build_setup(model_name)
    if preset:
        setup.use_preset(preset, steps)
    rows, ref = [], None
    for family, label, spec in configs(setup, steps, quick, seed):
        patched = apply(setup.patcher, spec)
        out, calls, _, wall = sample(setup, patched, steps, seed=seed)
        summary = caching_nodes().LAST_SUMMARY.pop(SUMMARY_OF.get(spec[0]) if spec else None, None)
        _, _, flops, _ = sample(setup, patched, steps, seed=seed, count_flops=True)
        if ref is None:
            ref = {"out": out, "flops": flops, "wall": wall}
        row = {"family": family, "config": label, "calls": calls, "gflops": flops / 1e9,
               "compute_ratio": ref["flops"] / max(flops, 1), "wall_s": wall, "speedup": ref["wall"] / wall,
               "psnr": psnr(out, ref["out"]), "ssim": ssim(out.float(), ref["out"].float()), "spec": spec,
               "cache_summary": summary if spec and spec[0].startswith("Quickstep") else None}
        if out.ndim == 5:
            row.update(frame_diff_psnr=frame_difference_psnr(out, ref["out"]), motion_db=motion_db(out, ref["out"]))
        rows.append(row)
        log(f"{model_name:8s} {label:36s} calls {calls:3d}  compute {row['compute_ratio']:.2f}x  "
            f"wall {row['speedup']:.2f}x  PSNR {row['psnr']:.1f} dB  SSIM {row['ssim']:.3f}"
            + (f"  frame-diff PSNR {row['frame_diff_psnr']:.1f} dB  motion {row['motion_db']:+.2f} dB"
               if "motion_db" in row else ""))
    # the uncached time again at the end (the machine's load drifts): the faster of the two is the reference
    ref_wall = min(ref["wall"], sample(setup, apply(setup.patcher, None), steps, seed=seed)[3])
    for row in rows:
        row["speedup"] = ref_wall / row["wall_s"]
    return rows


TUNING_GRID = {"end_percent": (0.95, 1.0), "threshold": (0.1, 0.2, 0.3), "max_consecutive": (2, 3)}


def model_cache_tuning(model_name, steps, seeds, log):
    """Every TUNING_GRID setting of the Model Cache (its other inputs at their defaults) on each noise seed: rows of
    compute ratio and PSNR against the uncached run from the same seed."""
    setup = build_setup(model_name)
    base = defaults("QuickstepModelCache")
    rows = []
    for seed in seeds:
        ref, _, ref_flops, _ = sample(setup, apply(setup.patcher, None), steps, seed=seed, count_flops=True)
        for values in itertools.product(*TUNING_GRID.values()):
            setting = dict(zip(TUNING_GRID, values))
            spec = ("QuickstepModelCache", dict(base, **setting))
            out, _, flops, _ = sample(setup, apply(setup.patcher, spec), steps, seed=seed, count_flops=True)
            rows.append(dict(setting, seed=seed, compute_ratio=ref_flops / flops, psnr=psnr(out, ref)))
            log(f"{model_name} seed {seed} {setting}: {rows[-1]['compute_ratio']:.2f}x {rows[-1]['psnr']:.1f} dB")
    return rows


def tuning_markdown(name, rows):
    lines = [f"### {name}: Model Cache tuning grid", "",
             "| " + " | ".join(TUNING_GRID) + " | compute ratio (min-max) | PSNR lowest / median (dB) | seeds under "
             f"{TARGET_DB:.0f} dB |", "|---" * (len(TUNING_GRID) + 3) + "|"]
    for values in sorted({tuple(r[k] for k in TUNING_GRID) for r in rows}):
        mine = [r for r in rows if tuple(r[k] for k in TUNING_GRID) == values]
        ratios, psnrs = [r["compute_ratio"] for r in mine], [r["psnr"] for r in mine]
        lines.append("| " + " | ".join(str(v) for v in values) + f" | {min(ratios):.2f}-{max(ratios):.2f}x | "
                     f"{db(min(psnrs))} / {db(statistics.median(psnrs))} | "
                     f"{sum(p < TARGET_DB for p in psnrs)} of {len(psnrs)} |")
    return "\n".join(lines)


def expert_pair(setup, high, low, steps, switch, seed=0):
    """The stock Wan 2.2 graph, as KSamplerAdvanced runs it (tests/test_cache_families.py two_expert): the high-noise
    expert for steps [0, switch) from seeded noise, returning leftover noise, then the low-noise expert for
    [switch, steps) without new noise; `low` None: `high` alone for all the steps, one sampler call. Both through
    comfy.sample.sample, the call KSamplerAdvanced makes, with a callback recording each step's x0 prediction (in
    the output latent's space, as the final latent: the sampler works on the latent format's process_in).
    Returns (final latent, [x0 per step], FLOPs of the whole graph)."""
    import comfy.sample
    from torch.utils.flop_counter import FlopCounterMode
    predictions = []

    def record(step, x0, x, total):
        predictions.append(setup.patcher.model.process_latent_out(x0).double())

    def run(model, latent, start, end, first):
        noise = (comfy.sample.prepare_noise(latent, seed) if first else torch.zeros(latent.shape))
        return comfy.sample.sample(model, noise, steps, setup.cfg, "euler", setup.scheduler, setup.positive,
                                   setup.negative, latent, disable_noise=not first, start_step=start, last_step=end,
                                   force_full_denoise=not first or low is None, callback=record,
                                   disable_pbar=True, seed=seed)
    with FlopCounterMode(display=False) as fc:
        if low is None:
            out = run(high, setup.latent, 0, steps, True)
        else:
            out = run(low, run(high, setup.latent, 0, switch, True), switch, steps, False)
    return out.double(), predictions, fc.get_total_flops()


# The steps "around the switch": the high-noise expert's last and the low-noise expert's first two.
SWITCH_WINDOW = (-1, 0, 1)
SWITCH_DROP_DB = 2.0   # the target: those steps' x0 PSNR at most this far below the median of the other steps'


def two_expert_benchmark(model_name, steps, switch, log):
    """Each cache at its defaults on two separate model patchers (the trained model loaded twice: the high- and the
    low-noise expert), each patcher with its own cache node, in the stock two-expert graph: per-step x0 PSNR against
    the uncached pair, the steps around the switch against the others, and the same cache on one patcher over all
    the steps (no switch) at the same steps."""
    if not 0 < switch < steps - 1:
        raise SystemExit(f"--two-expert switch must lie in 1..{steps - 2} for {steps} steps, got {switch}")
    setup, low_setup = build_setup(model_name), build_setup(model_name)
    ref, ref_x0, ref_flops = expert_pair(setup, apply(setup.patcher, None), apply(low_setup.patcher, None), steps,
                                         switch)
    single_ref = expert_pair(setup, apply(setup.patcher, None), None, steps, switch)[0]
    log(f"{model_name} two experts, switch at {switch} of {steps}: the uncached pair against one uncached model over "
        f"all steps: PSNR {db(psnr(single_ref, ref))} dB")
    specs = [(cache, (cache, dict(defaults(cache), verbose=False))) for cache in HOST_CACHES]
    specs.append(("ModelCache", ("QuickstepModelCache", defaults("QuickstepModelCache"))))
    if layout_of(setup) is not None:
        specs.append(("BlockCache", ("QuickstepBlockCache", block_cache_defaults(setup))))
    window = [switch + k for k in SWITCH_WINDOW]
    rows = []
    for label, spec in specs:
        out, x0, flops = expert_pair(setup, apply(setup.patcher, spec), apply(low_setup.patcher, spec), steps,
                                     switch)
        single_x0 = expert_pair(setup, apply(setup.patcher, spec), None, steps, switch)[1]
        per_step = [psnr(a, b) for a, b in zip(x0, ref_x0)]
        single = [psnr(a, b) for a, b in zip(single_x0, ref_x0)]
        others = [p for i, p in enumerate(per_step) if i not in window and math.isfinite(p)]
        median = statistics.median(others) if others else math.inf
        row = {"config": f"{label} (default), one per expert", "spec": spec, "compute_ratio": ref_flops / flops,
               "psnr": psnr(out, ref), "per_step_psnr": per_step, "single_per_step_psnr": single,
               "window_min": min(per_step[i] for i in window), "others_median": median,
               "single_window_min": min(single[i] for i in window)}
        if out.ndim == 5:
            row.update(frame_diff_psnr=frame_difference_psnr(out, ref), motion_db=motion_db(out, ref))
        rows.append(row)
        log(f"{model_name} two experts {label:10s} compute {row['compute_ratio']:.2f}x  final PSNR "
            f"{db(row['psnr'])} dB  x0 PSNR per step: {' '.join(db(p) for p in per_step)}")
    return {"switch": switch, "steps": steps, "window": window, "pair_vs_single_psnr": psnr(single_ref, ref),
            "rows": rows}


def two_expert_markdown(name, result):
    switch, window = result["switch"], result["window"]
    lines = [f"### {name}: two experts, switch at step {switch} of {result['steps']}", "",
             f"x0 PSNR (dB) against the uncached pair; window = steps {', '.join(map(str, window))} (the high-noise "
             f"expert's last, the low-noise expert's first two); the uncached pair against one uncached model: "
             f"{db(result['pair_vs_single_psnr'])} dB.", "",
             "| cache (defaults) | compute ratio | final PSNR | window min | median of other steps "
             "| drop at the switch | one model, no switch: window min | drop against one model |", "|---" * 8 + "|"]
    for r in result["rows"]:
        drop = r["others_median"] - r["window_min"]
        pairs = [(r["single_per_step_psnr"][i], r["per_step_psnr"][i]) for i in window]
        against_one = max((one - two for one, two in pairs if math.isfinite(one) or math.isfinite(two)),
                          default=-math.inf)
        lines.append(f"| {r['config']} | {r['compute_ratio']:.2f}x | {db(r['psnr'])} | {db(r['window_min'])} | "
                     f"{db(r['others_median'])} | {'none' if not drop > 0 else f'{drop:.1f} dB'}"
                     f"{' (target missed)' if drop > SWITCH_DROP_DB else ''} | {db(r['single_window_min'])} | "
                     f"{'none' if not against_one > 0 else f'{against_one:.1f} dB'} |")
    lines.append("")
    for r in result["rows"]:
        lines.append(f"- {r['config']} per step: " + " ".join(db(p) for p in r["per_step_psnr"]))
    return "\n".join(lines)


# The full-size SD1.5 UNet (860M parameters) as overrides of the tiny sd15 config: 320 channels, 4 levels,
# attention on the first three, 768-wide context.
SD15_FULL_UNET = dict(model_channels=320, num_res_blocks=[2, 2, 2, 2], channel_mult=[1, 2, 4, 4],
                      transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], transformer_depth_output=[1] * 9 + [0] * 3,
                      use_linear_in_transformer=False, context_dim=768, num_heads=8)


def build_sd15_full(name, size, batch, smooth):
    """The full-size SD1.5 UNet with seeded random weights (tiny_host.seeded_init_) at a size x size latent, with
    seeded 77-token contexts; `smooth`: its time embedding reads only slow sinusoids (as the smooth DiTs')."""
    patcher = tiny_host.build_tiny("sd15", 0, **SD15_FULL_UNET)
    if smooth:
        tiny_host.smooth_time_embedding_(patcher.model.diffusion_model)
    g = torch.Generator().manual_seed(0)
    return Setup(name, patcher, "sd15", [[torch.randn(1, 77, 768, generator=g), {}]],
                 [[torch.randn(1, 77, 768, generator=g), {}]], torch.zeros(batch, 4, size, size), "normal", 3.0)


def sd15_partial_cost(size=64, log=print):
    """FLOPs of a DeepCache partial call (branch 0) over a full call on the full-size SD1.5 UNet architecture
    (860M parameters, random weights: FLOPs do not depend on them): 3 euler steps, full / partial / full, against
    3 full ones. Slow on a CPU (minutes at 64x64)."""
    setup = build_sd15_full("sd15-full", size, 1, smooth=False)
    patcher = setup.patcher
    full = sample(setup, patcher, 3, count_flops=True)[2] / 3
    cached = apply(patcher, ("QuickstepDeepCache", dict(defaults("QuickstepDeepCache"), interval=2,
                                                        start_percent=0.0)))
    partial = (sample(setup, cached, 3, count_flops=True)[2] - 2 * full) / full
    log(f"SD1.5 architecture, {size}x{size} latent: a DeepCache partial call (branch 0) costs {partial:.3f} of a "
        f"full call ({full / 2e9:.0f} GFLOP per UNet pass)")
    return partial


def best_at_target(rows, family):
    ok = [r["compute_ratio"] for r in rows if r["family"] == family and r["psnr"] >= TARGET_DB]
    return max(ok) if ok else None


def at_least_as_good(a, b):
    """a matches or beats b on both compute ratio and PSNR. Compute ratios are compared as the tables print them
    (2 decimals): two runs that skip the same steps differ in the third decimal by the caches' own bookkeeping."""
    return round(a["compute_ratio"], 2) >= round(b["compute_ratio"], 2) and a["psnr"] >= b["psnr"]


def dominated(rows, ours, theirs):
    """How many of `theirs` points some `ours` point matches or beats on both compute ratio and PSNR."""
    mine = [r for r in rows if r["family"] in ours]
    other = [r for r in rows if r["family"] == theirs and r["compute_ratio"] > 1.0]
    won = sum(1 for o in other if any(at_least_as_good(m, o) for m in mine))
    return won, len(other)


def dominating(rows, row):
    """The host cache points at least as good as `row` on both compute ratio and PSNR (protocol section 5)."""
    return [r for r in rows if r["family"] in HOST_CACHES and at_least_as_good(r, row)]


HOST_CACHES = ("EasyCache", "LazyCache")


def db(p):
    return "exact" if math.isinf(p) else f"{p:.1f}"


def markdown(name, rows):
    video = "motion_db" in rows[0]
    lines = [f"### {name}", "",
             "| config | model calls | compute ratio | wall speedup | PSNR (dB) | SSIM |"
             + (" frame-diff PSNR (dB) | motion (dB) |" if video else ""),
             "|---|---|---|---|---|---|" + ("---|---|" if video else "")]
    for r in rows:
        lines.append(f"| {r['config']} | {r['calls']} | {r['compute_ratio']:.2f}x | {r['speedup']:.2f}x | "
                     f"{db(r['psnr'])} | {r['ssim']:.3f} |"
                     + (f" {db(r['frame_diff_psnr'])} | {r['motion_db']:+.2f} |" if video else ""))
    ours = sorted({r["family"] for r in rows} - {"uncached", *HOST_CACHES, "forecaster"})
    lines.append("")
    for family in [*HOST_CACHES, *ours]:
        best = best_at_target(rows, family)
        lines.append(f"- {family}: largest compute ratio at >= {TARGET_DB:.0f} dB: "
                     + (f"{best:.2f}x" if best else "none (no swept point reaches it)"))
    for theirs in HOST_CACHES:
        won, n = dominated(rows, ours, theirs)
        lines.append(f"- Quickstep points match or beat {won} of {n} skipping {theirs} points on both compute and PSNR")
    for r in rows:
        if r["family"] in ours and "(default)" in r["config"]:
            above = dominating(rows, r)
            lines.append(f"- host points dominating {r['config']}: "
                         + (", ".join(f"{h['config']} ({h['compute_ratio']:.2f}x, {db(h['psnr'])} dB)" for h in above)
                            or "none"))
    if video:
        flicker = [r["config"] for r in rows if r["frame_diff_psnr"] < r["psnr"] - TEMPORAL_DB]
        lines.append(f"- frame-diff PSNR more than {TEMPORAL_DB:.0f} dB below the clip PSNR (temporal target missed): "
                     + (", ".join(flicker) or "none"))
        moved = [r["config"] for r in rows if abs(r["motion_db"]) > TEMPORAL_DB]
        lines.append(f"- motion more than {TEMPORAL_DB:.0f} dB from the uncached clip's: "
                     + (", ".join(moved) or "none"))
    return "\n".join(lines)


def plan_runs(parser, args):
    """{result key: (model, preset or None, steps)}: a preset pairs with every model or with each in order; its steps
    default to its first published count."""
    if not args.preset:
        return {name: (name, None, args.steps or 24) for name in args.models}
    if len(args.preset) not in (1, len(args.models)):
        parser.error(f"--preset takes one name or one per model ({len(args.models)}), got {len(args.preset)}")
    from samplers import distilled
    presets = args.preset * len(args.models) if len(args.preset) == 1 else args.preset
    runs = {}
    for name, preset in zip(args.models, presets):
        family = distilled.FAMILIES.get(preset)
        steps = args.steps or (family.steps[0] if family else 0)
        runs[f"{name} {preset}"] = (name, preset, steps)
    return runs


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=None, help="24, or with --preset its first published count")
    parser.add_argument("--models", nargs="+", default=["digits", "digits-flow", "sd15", "mmdit4", "flux12",
                                                          "flux12-smooth", "mmdit12-smooth"])
    parser.add_argument("--quick", action="store_true", help="defaults only, no sweep")
    parser.add_argument("--preset", nargs="+", default=None,
                        help="distilled flow preset(s): one for all models or one per model")
    parser.add_argument("--out", default=str(RESULTS / "caching.json"))
    parser.add_argument("--base", default=str(HOST_DIR / "benchbase"),
                        help="host base directory (its custom_nodes links this checkout: one per checkout)")
    parser.add_argument("--sd15-partial-cost", action="store_true",
                        help="also measure a partial call's FLOPs on the full-size SD1.5 architecture (slow)")
    parser.add_argument("--two-expert", type=int, default=None, metavar="SWITCH",
                        help="instead of the sweep: the Wan 2.2 two-expert graph switching experts at step SWITCH, "
                             "each cache at its defaults, per-step x0 PSNR")
    parser.add_argument("--seed", type=int, default=0, help="the noise seed of the sweep (0)")
    parser.add_argument("--tune-model-cache", type=int, nargs="+", default=None, metavar="SEED",
                        help="instead of the sweep: the Model Cache's tuning grid on these noise seeds")
    args = parser.parse_args(argv)
    if args.two_expert is not None and args.preset:
        parser.error("--two-expert samples on the model's scheduler: no --preset")
    if args.tune_model_cache is not None and (args.preset or args.two_expert is not None):
        parser.error("--tune-model-cache samples on the model's scheduler at its own settings: no --preset or "
                     "--two-expert")
    runs = plan_runs(parser, args)

    from testbed.inproc import InProcessHost
    logging.disable(logging.WARNING)
    InProcessHost(Path(args.base))
    torch.set_grad_enabled(False)
    torch.set_num_threads(1)
    results, t0 = {}, time.time()
    if args.sd15_partial_cost:
        results["sd15_full_partial_cost"] = sd15_partial_cost()
    for key, (name, preset, steps) in runs.items():
        if args.tune_model_cache is not None:
            results[key] = model_cache_tuning(name, steps, args.tune_model_cache, print)
        elif args.two_expert is not None:
            results[key] = two_expert_benchmark(name, steps, args.two_expert, print)
        else:
            results[key] = benchmark(name, steps, args.quick, print, preset, args.seed)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"steps": args.steps, "seed": args.seed, "presets": args.preset, "two_expert": args.two_expert,
                       "tune_model_cache": args.tune_model_cache, "results": results, "wall_s": time.time() - t0},
                      f, indent=1, default=str)
    for key, (_, _, steps) in runs.items():
        if args.tune_model_cache is not None:
            print(tuning_markdown(f"{key}, {steps} steps, seeds {args.tune_model_cache}", results[key]), "\n")
        elif args.two_expert is not None:
            print(two_expert_markdown(key, results[key]), "\n")
        else:
            print(markdown(f"{key}, {steps} steps", results[key]), "\n")
    print(f"wrote {args.out} in {time.time() - t0:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
