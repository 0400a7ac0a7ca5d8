"""Feature-cache benchmark: compute ratio and PSNR vs uncached for Quickstep's DeepCache / Block Cache beside the
host's EasyCache and LazyCache, on host-architecture models with seeded random weights.

Each configuration samples the same noise through the host's own sampling path (euler, CFG 3 with a different
negative, batch 2). Measured per run: sampler-level model calls (PREDICT_NOISE), FLOPs of everything that ran inside
sampling (torch's FlopCounterMode: the diffusion model plus the caches' own overhead), the compute ratio
uncached FLOPs / cached FLOPs, wall time, and PSNR of the final latent against the uncached run (peak = max |x|).

Models: the tiny sd15 UNet, MMDiT and Flux of modelzoo/tiny_host, and deeper DiT variants built the same way
(mmdit4: 4 joint blocks; flux-12: 4 double + 8 single blocks) so that front/back blocks leave a real middle.

usage: python -m bench.caching [--steps 24] [--models mmdit4 flux12 sd15 ...] [--quick]
Writes bench/results/caching.json and prints markdown tables.
"""
import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path

import torch

from testbed.host import HOST_DIR, PACK_DIR

RESULTS = PACK_DIR / "bench" / "results"


def build_model(name):
    from modelzoo import tiny_host
    if name in tiny_host.ARCHITECTURES:
        return finite_buffers(tiny_host.build_tiny(name, 0)), name
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models
    if name == "mmdit4":         # MMDiT's width is 64 * depth: the context embedder must follow
        ctx = {"target": "torch.nn.Linear", "params": {"in_features": 64, "out_features": 256}}
        arch, cls_, cfg = "mmdit", comfy.supported_models.SD3, dict(tiny_host._MMDIT, depth=4,
                                                                      context_embedder_config=ctx)
    elif name == "flux12":
        arch, cls_, cfg = "flux", comfy.supported_models.Flux, dict(tiny_host._FLUX, depth=4, depth_single_blocks=8)
    else:
        raise ValueError(name)
    config = cls_(dict(cfg))
    config.set_inference_dtype(torch.float32, None)
    dev = comfy.model_management.unet_offload_device()
    model = config.get_model({}, device=dev)
    tiny_host.seeded_init_(model.diffusion_model, 0)
    return finite_buffers(comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                            offload_device=dev)), arch


def finite_buffers(patcher):
    """The host's MMDiT keeps pos_embed as an uninitialised buffer (torch.empty) that seeded_init_ does not fill:
    it can hold NaN. Fill such buffers reproducibly so every run is finite and comparable."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, buf in sorted(patcher.model.diffusion_model.named_buffers(), key=lambda kv: kv[0]):
            if buf.is_floating_point():
                buf.copy_(torch.randn(buf.shape, generator=g) * 0.02)
    return patcher


def conditioning(arch, seed):
    import comfy.sampler_helpers  # noqa: F401
    from modelzoo import tiny_host
    return tiny_host.tiny_conditioning(arch, seed)


def node(name):
    import nodes
    return nodes.NODE_CLASS_MAPPINGS[name]


def apply(patcher, spec):
    """spec: None (uncached) or (node id, inputs dict)."""
    if spec is None:
        return patcher
    cls_ = node(spec[0])
    out = cls_.execute(model=patcher, **spec[1])
    out = getattr(out, "result", out)
    return out[0] if isinstance(out, (tuple, list)) else out


def sample(patcher, arch, steps, seed=0, batch=2, size=16, cfg=3.0):
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
    channels = 4 if arch == "sd15" else 16
    noise = torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(seed))
    scheduler = "normal" if arch == "sd15" else "simple"
    sigmas = comfy.samplers.calculate_sigmas(patcher.get_model_object("model_sampling"), scheduler, steps).cpu()
    sampler = comfy.samplers.sampler_object("euler")
    pos, neg = conditioning(arch, 0), conditioning(arch, 1)
    t0 = time.perf_counter()
    with FlopCounterMode(display=False) as fc:
        out = comfy.sample.sample_custom(counted, noise, cfg, sampler, sigmas, pos, neg, torch.zeros_like(noise),
                                         disable_pbar=True, seed=seed)
    return out.double(), calls[0], fc.get_total_flops(), time.perf_counter() - t0


def psnr(a, b):
    mse = (a - b).pow(2).mean().item()
    peak = b.abs().max().item()
    return math.inf if mse == 0 else 10 * math.log10(peak * peak / mse)


HOST = {"EasyCache": ("EasyCache", {"reuse_threshold": 0.2, "start_percent": 0.15, "end_percent": 0.95,
                                    "verbose": False}),
        "LazyCache": ("LazyCache", {"reuse_threshold": 0.2, "start_percent": 0.15, "end_percent": 0.95,
                                    "verbose": False})}

DEEPCACHE = {"interval": 3, "schedule": "uniform", "branch": 0, "start_percent": 0.1, "end_percent": 0.95,
             "forecaster": "reuse", "history": 3}
BLOCKCACHE = {"threshold": 0.2, "front_blocks": 1, "back_blocks": 1, "forecaster": "taylor1", "warmup_steps": 2,
              "max_consecutive": 3, "start_percent": 0.0, "end_percent": 0.95, "history": 3, "compute_steps": ""}


def configs(arch, n_blocks, quick):
    out = [("uncached", None), ("EasyCache (default)", HOST["EasyCache"]), ("LazyCache (default)", HOST["LazyCache"])]
    if arch == "sd15":
        out.append(("DeepCache (default)", ("QuickstepDeepCache", DEEPCACHE)))
        if not quick:
            for fc in ("reuse", "taylor1"):
                for interval in (3, 5):
                    out.append((f"DeepCache N={interval} {fc}",
                                ("QuickstepDeepCache", dict(DEEPCACHE, interval=interval, forecaster=fc))))
            for thr in (0.4,):
                out.append((f"EasyCache t={thr}", ("EasyCache", dict(HOST["EasyCache"][1], reuse_threshold=thr))))
        return out
    back = 1 if n_blocks > 2 else 0
    out.append(("BlockCache (default)", ("QuickstepBlockCache", dict(BLOCKCACHE, back_blocks=back))))
    if not quick:
        for fc in ("reuse", "taylor1"):
            for thr in (0.7, 1.0, 1.5):
                out.append((f"BlockCache F1B{back} t={thr} {fc}",
                            ("QuickstepBlockCache", dict(BLOCKCACHE, back_blocks=back, threshold=thr, forecaster=fc,
                                                         max_consecutive=5))))
        for thr in (0.5,):
            out.append((f"LazyCache t={thr}", ("LazyCache", dict(HOST["LazyCache"][1], reuse_threshold=thr))))
    return out


def n_blocks(patcher):
    dm = patcher.model.diffusion_model
    if hasattr(dm, "joint_blocks"):
        return len(dm.joint_blocks)
    if hasattr(dm, "double_blocks"):
        return len(dm.double_blocks) + len(dm.single_blocks)
    return len(dm.input_blocks)


def benchmark(model_name, steps, quick, log):
    patcher, arch = build_model(model_name)
    rows, ref, ref_flops = [], None, None
    for label, spec in configs(arch, n_blocks(patcher), quick):
        out, calls, flops, wall = sample(apply(patcher, spec), arch, steps)
        if ref is None:
            ref, ref_flops, ref_wall = out, flops, wall
        row = {"config": label, "calls": calls, "gflops": flops / 1e9, "compute_ratio": ref_flops / max(flops, 1),
               "wall_s": wall, "speedup": ref_wall / wall, "psnr": psnr(out, ref), "spec": spec}
        rows.append(row)
        log(f"{model_name:8s} {label:34s} calls {calls:3d}  compute {row['compute_ratio']:.2f}x  "
            f"PSNR {row['psnr']:.1f} dB  wall {wall:.2f}s")
    return rows


def markdown(name, rows):
    lines = [f"### {name}", "", "| config | model calls | compute ratio | wall speedup | PSNR vs uncached (dB) |",
             "|---|---|---|---|---|"]
    for r in rows:
        p = "exact" if math.isinf(r["psnr"]) else f"{r['psnr']:.1f}"
        lines.append(f"| {r['config']} | {r['calls']} | {r['compute_ratio']:.2f}x | {r['speedup']:.2f}x | {p} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--models", nargs="+", default=["mmdit4", "flux12", "sd15"])
    parser.add_argument("--quick", action="store_true", help="defaults only, no sweep")
    parser.add_argument("--out", default=str(RESULTS / "caching.json"))
    args = parser.parse_args(argv)

    from testbed.inproc import InProcessHost
    logging.disable(logging.WARNING)
    InProcessHost(HOST_DIR / "benchbase")
    torch.set_grad_enabled(False)
    results, t0 = {}, time.time()
    for name in args.models:
        results[name] = benchmark(name, args.steps, args.quick, print)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"steps": args.steps, "results": results, "wall_s": time.time() - t0}, f, indent=1, default=str)
    for name, rows in results.items():
        print(markdown(f"{name}, {args.steps} steps", rows), "\n")
    print(f"wrote {args.out} in {time.time() - t0:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
