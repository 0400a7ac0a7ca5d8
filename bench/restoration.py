"""Restoration benchmark: PSNR, SSIM and measurement consistency on held-out real MNIST digits.

Priors: the project's trained digit model (`digit`, eps, 32x32) and the pretrained MNIST DDPM (`ddpm`, 28x28, from
../shared/models).  Tasks: x4 super-resolution, 50% box inpainting, 50% random-pixel inpainting, Gaussian deblur (9x9,
sigma 2), each with sigma_y = 0 and 0.05.  Methods: the pseudo-inverse (and bicubic for SR) baselines, unguided
sampling, DDNM+, DiffPIR (zeta 0.3 and 1), RePaint (inpainting), PiGDM, DPS, RED-diff (the same steps, and as the
optimizer it is: 500 iterations on SR and deblurring), and CCDF (pseudo-inverse forward-diffused to the level where
the last --ccdf-calls steps of the schedule start, then PiGDM on those steps; default a quarter of --steps).
Sampling goes through the host's own path (comfy.sample.sample_custom), unconditional prior, cfg 1, karras schedule,
the same noises for every method.

Per method: seconds per step (model calls + guidance, this machine); the autograd memory one step saves for its
backward pass (bytes of the tensors autograd saves, counted with saved_tensors_hooks: 0 for methods without a
gradient through the model; freed after each step); and the peak tensor memory of a run above what was allocated at
its start (the whole batch), measured on a separate 3-step run of the method (every method frees its per-step memory,
so the peak does not grow with the steps): on CUDA the caching allocator's max_memory_allocated, on CPU torch's own
CPU allocations as the profiler records them (profile_memory; Python objects and the model weights, allocated
before, are not counted).

usage: python -m bench.restoration [--model digit|ddpm] [--samples 24] [--steps 30] [--methods ...] [--tasks ...]
Writes bench/results/restoration_<model>.json and prints a markdown table.
"""
import argparse
import json
import logging
import time

import torch

from samplers import guidance, operators
from samplers.operators import consistency, psnr, ssim
from testbed.host import HOST_DIR, PACK_DIR

RESULTS = PACK_DIR / "bench" / "results"


def tasks(size, sigma_y):
    return {"sr_x4": operators.Downsample(4, sigma_y),
            "inpaint_box50": operators.Inpaint(operators.box_mask(size, size, 0.5, "bottom"), sigma_y),
            "inpaint_random50": operators.Inpaint(operators.random_mask(size, size, 0.5, seed=0), sigma_y),
            "deblur_g2": operators.GaussianBlur(9, 2.0, sigma_y)}


class SavedBytes:
    """Peak bytes autograd saves for backward inside one step (saved_tensors_hooks)."""

    def __init__(self):
        self.current = self.peak = 0

    def pack(self, t):
        self.current += t.numel() * t.element_size()
        self.peak = max(self.peak, self.current)
        return t

    def unpack(self, t):
        return t

    def step_done(self):
        self.current = 0


PEAK_MEMORY_MEANING = {
    "cuda": "CUDA max_memory_allocated during the run minus memory_allocated at its start",
    "cpu": "peak of torch's CPU allocations during the run above its start (profiler, profile_memory)"}


def memory_device():
    import comfy.model_management
    return "cuda" if comfy.model_management.get_torch_device().type == "cuda" else "cpu"


def peak_memory(run):
    """Peak tensor bytes allocated while run() runs, above what was allocated when it started (PEAK_MEMORY_MEANING)."""
    if memory_device() == "cuda":
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - start
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    # [memory] events carry +bytes for an allocation and -bytes for a free; their running sum is the live total
    changes = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                     if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in changes:
        live += nbytes
        peak = max(peak, live)
    return peak


def load_prior(name, samples):
    """(model patcher, clean held-out digits in the model's units, unconditional cond, units per [-1, 1] unit).
    The digit model's data spans [-1, 1]; the DDPM's is pixel / 255 - 0.5 (28x28), half that scale: its operators get
    sigma_y / 2 and every figure is reported in [-1, 1] units."""
    from modelzoo import mnist_unet
    _, _, pixels, labels = mnist_unet.mnist_split()
    index = (torch.arange(samples) * (len(labels) // samples)).numpy()
    if name == "digit":
        return (mnist_unet.load_mnist_model(prediction="eps"), mnist_unet.mnist_to_latent(pixels[index]),
                mnist_unet.unconditional_conditioning(samples), 1.0)
    from testbed import mnist_ddpm
    clean = torch.as_tensor(pixels[index], dtype=torch.float32).reshape(-1, *mnist_ddpm.LATENT_SHAPE) / 255.0 - 0.5
    return mnist_ddpm.load_ddpm_model(), clean, [[torch.zeros(1, 1, 1), {}]], 0.5


def figure(path, clean, rows, count=8):
    """A grid: the clean digits on top, then one row per method (labelled on the left), images in [-1, 1]."""
    from PIL import Image, ImageDraw
    size, label_width = clean.shape[-1], 150
    images = {"clean": clean, **rows}
    sheet = Image.new("L", (label_width + count * size, len(images) * size), 255)
    draw = ImageDraw.Draw(sheet)
    for r, (name, x) in enumerate(images.items()):
        draw.text((4, r * size + size // 2 - 6), name, fill=0)
        pixels = ((x[:count, 0].float().clamp(-1, 1) + 1) * 127.5).round().byte().numpy()
        for c, digit in enumerate(pixels):
            sheet.paste(Image.fromarray(digit), (label_width + c * size, r * size))
    sheet.save(path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["digit", "ddpm"], default="digit")
    parser.add_argument("--samples", type=int, default=24)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--sigma-y", type=float, nargs="+", default=[0.0, 0.05])
    parser.add_argument("--tasks", nargs="+", default=None)
    parser.add_argument("--methods", nargs="+", default=None, help="guided rows to run (default: all)")
    parser.add_argument("--ccdf-calls", type=int, default=None,
                        help="CCDF: run the last this many steps of the schedule (default: steps // 4)")
    parser.add_argument("--reddiff-iterations", type=int, default=500,
                        help="also RED-diff as the optimizer it is: this many iterations (its own schedule), Adam lr "
                             "0.05, lambda 0.1, on SR and deblurring; 0 = off")
    parser.add_argument("--out", default=None)
    parser.add_argument("--figure", action="store_true",
                        help="write docs/restoration_<task>.png (first 8 digits, first sigma_y): clean, pseudo-"
                             "inverse, then each method, one row each")
    args = parser.parse_args(argv)

    from testbed.inproc import InProcessHost
    logging.disable(logging.WARNING)
    InProcessHost(HOST_DIR / "benchbase")
    import comfy.sample
    import comfy.samplers

    model, clean, cond, units = load_prior(args.model, args.samples)
    size = clean.shape[-1]
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "karras", args.steps).cpu()
    noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(0))
    saved = SavedBytes()
    short_sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "karras", 3).cpu()
    ccdf_calls = args.ccdf_calls or args.steps // 4

    def sample(fn, options, sig, latent):
        sampler = comfy.samplers.KSAMPLER(fn, extra_options=options)
        saved.peak = saved.current = 0
        t = time.time()
        with torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack):
            out = comfy.sample.sample_custom(model, noise, 1.0, sampler, sig, cond, cond, latent, disable_pbar=True,
                                             seed=0, callback=lambda *a: saved.step_done())
        return out.float().cpu(), time.time() - t, saved.peak

    def run_peak(fn, options, latent):
        return peak_memory(lambda: comfy.sample.sample_custom(
            model, noise, 1.0, comfy.samplers.KSAMPLER(fn, extra_options=options), short_sigmas, cond, cond, latent,
            disable_pbar=True, seed=0))

    torch.set_grad_enabled(False)
    ancestral = comfy.samplers.ksampler("euler_ancestral").sampler_function
    start = torch.zeros_like(clean)
    unguided = (*sample(ancestral, {}, sigmas, start), run_peak(ancestral, {}, start))
    results, t0 = {}, time.time()
    for sigma_y in args.sigma_y:
        for task, op in tasks(size, sigma_y * units).items():
            if args.tasks and task not in args.tasks:
                continue
            y = operators.add_noise(op.forward(clean), sigma_y * units, seed=1)
            pinv = op.pinv(y)
            rows = {"pseudo_inverse": (pinv, 0, 0.0, 0, 0), "unguided": (unguided[0], args.steps, *unguided[1:])}
            if task.startswith("sr"):   # y is the block average: bicubic up-sampling centres each pixel on its block
                rows["bicubic"] = (torch.nn.functional.interpolate(y, scale_factor=4, mode="bicubic"), 0, 0.0, 0, 0)
            base = dict(operator=op, measurement=y)
            runs = {"ddnm+": (dict(method="ddnm", eta=1.0), sigmas),
                    "diffpir": (dict(method="diffpir"), sigmas),
                    "diffpir_zeta1": (dict(method="diffpir", diffpir_zeta=1.0), sigmas),
                    "pigdm": (dict(method="pigdm", eta=1.0), sigmas),
                    "dps": (dict(method="dps", eta=1.0), sigmas), "reddiff": (dict(method="reddiff"), sigmas)}
            if task.startswith("inpaint"):
                runs["repaint_j2_r2"] = (dict(method="repaint", eta=1.0, jump_length=2, resample_count=2), sigmas)
            if args.reddiff_iterations and task.startswith(("sr", "deblur")):
                long_sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "karras",
                                                              args.reddiff_iterations).cpu()
                runs[f"reddiff_{args.reddiff_iterations}it"] = (
                    dict(method="reddiff", learning_rate=0.05, strength=0.1 / guidance.REDDIFF_LAMBDA), long_sigmas)
            tail = guidance.ccdf_sigmas(sigmas, ccdf_calls / args.steps)
            runs[f"ccdf_{len(tail) - 1}of{args.steps}+pigdm"] = (dict(method="pigdm", eta=1.0), tail)
            for name, (options, sig) in runs.items():
                if args.methods and name not in args.methods:
                    continue
                start = pinv if name.startswith("ccdf") else torch.zeros_like(clean)
                out, sec, mem = sample(guidance.sample_restoration, dict(base, **options), sig, start)
                nfe = (len(sig) - 1) * options.get("resample_count", 1)
                rows[name] = (out, nfe, sec, mem, run_peak(guidance.sample_restoration, dict(base, **options), start))
            key = f"{task} sigma_y={sigma_y}"
            results[key] = {m: {"psnr": psnr(x / units, clean / units), "ssim": ssim(x / units, clean / units),
                                "consistency": consistency(op, x, y) / units,
                                "nfe": nfe, "s_per_step": round(sec / max(nfe, 1), 4), "saved_bytes_per_step": mem,
                                "peak_bytes": peak}
                            for m, (x, nfe, sec, mem, peak) in rows.items()}
            print(key, {m: round(v["psnr"], 2) for m, v in results[key].items()}, flush=True)
            if args.figure and sigma_y == args.sigma_y[0]:
                figure(PACK_DIR / "docs" / f"restoration_{task}.png", clean / units,
                       {m: x / units for m, (x, *_) in rows.items() if m != "unguided"})
    RESULTS.mkdir(parents=True, exist_ok=True)
    out_path = args.out or str(RESULTS / f"restoration_{args.model}.json")
    with open(out_path, "w") as f:
        json.dump({"model": args.model, "samples": args.samples, "steps": args.steps, "results": results,
                   "peak_memory": PEAK_MEMORY_MEANING[memory_device()], "wall_s": time.time() - t0}, f, indent=1)
    print(f"peak MB: {PEAK_MEMORY_MEANING[memory_device()]}, batch of {args.samples}")
    print("| task | method | PSNR dB | SSIM | RMS(A x - y) | NFE | s/step | autograd MB/step | peak MB |\n"
          "|---|---|---|---|---|---|---|---|---|")
    for key, rows in results.items():
        for m, v in rows.items():
            print(f"| {key} | {m} | {v['psnr']:.2f} | {v['ssim']:.3f} | {v['consistency']:.4f} | {v['nfe']} | "
                  f"{v['s_per_step']} | {v['saved_bytes_per_step'] / 2 ** 20:.1f} | {v['peak_bytes'] / 2 ** 20:.1f} |")
    print(f"wrote {out_path} in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
