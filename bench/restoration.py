"""Restoration benchmark: PSNR and measurement consistency on held-out real MNIST digits with the embedded digit model.

Tasks: x4 super-resolution, 50% box inpainting, 50% random-pixel inpainting, Gaussian deblur (9x9, sigma 2), each with
sigma_y = 0 and 0.05.  Methods: the pseudo-inverse (and bicubic for SR) baselines, unguided sampling, DDNM+,
RePaint (inpainting), and CCDF (pseudo-inverse forward-diffused to t0 = 0.3, then DDNM+ on the remaining steps).
Sampling goes through the host's own path (comfy.sample.sample_custom), unconditional prior, cfg 1, karras schedule.

usage: python -m bench.restoration [--samples 50] [--steps 20]
Writes bench/results/restoration.json and prints a markdown table.
"""
import argparse
import json
import logging
import time

import torch

from samplers import guidance, operators
from samplers.operators import consistency, psnr
from testbed.host import HOST_DIR, PACK_DIR

RESULTS = PACK_DIR / "bench" / "results"


def tasks(sigma_y):
    return {"sr_x4": operators.Downsample(4, sigma_y),
            "inpaint_box50": operators.Inpaint(operators.box_mask(32, 32, 0.5, "bottom"), sigma_y),
            "inpaint_random50": operators.Inpaint(operators.random_mask(32, 32, 0.5, seed=0), sigma_y),
            "deblur_g2": operators.GaussianBlur(9, 2.0, sigma_y)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=50)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--sigma-y", type=float, nargs="+", default=[0.0, 0.05])
    parser.add_argument("--out", default=str(RESULTS / "restoration.json"))
    args = parser.parse_args(argv)

    from testbed.inproc import InProcessHost
    logging.disable(logging.WARNING)
    InProcessHost(HOST_DIR / "benchbase")
    torch.set_grad_enabled(False)
    import comfy.sample
    import comfy.samplers
    from modelzoo import mnist_unet

    model = mnist_unet.load_mnist_model(prediction="eps")
    _, _, pixels, labels = mnist_unet.mnist_split()
    index = torch.arange(args.samples) * (len(labels) // args.samples)
    clean = mnist_unet.mnist_to_latent(pixels[index.numpy()])
    cond = mnist_unet.unconditional_conditioning(args.samples)
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "karras", args.steps).cpu()
    noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(0))

    def sample(fn, options, sig, latent):
        sampler = comfy.samplers.KSAMPLER(fn, extra_options=options)
        t = time.time()
        out = comfy.sample.sample_custom(model, noise, 1.0, sampler, sig, cond, cond, latent, disable_pbar=True,
                                         seed=0)
        return out.float().cpu(), time.time() - t

    unguided, unguided_s = sample(comfy.samplers.ksampler("euler_ancestral").sampler_function, {}, sigmas,
                                  torch.zeros_like(clean))
    results, t0 = {}, time.time()
    for sigma_y in args.sigma_y:
        for task, op in tasks(sigma_y).items():
            y = operators.add_noise(op.forward(clean), sigma_y, seed=1)
            pinv = op.pinv(y)
            rows = {"pseudo_inverse": (pinv, 0, 0.0), "unguided": (unguided, args.steps, unguided_s)}
            if task.startswith("sr"):
                rows["bicubic"] = (torch.nn.functional.interpolate(y, scale_factor=4, mode="bicubic"), 0, 0.0)
            base = dict(operator=op, measurement=y, eta=1.0)
            out, s = sample(guidance.sample_restoration, dict(base, method="ddnm"), sigmas, torch.zeros_like(clean))
            rows["ddnm+"] = (out, args.steps, s)
            if task.startswith("inpaint"):
                out, s = sample(guidance.sample_restoration, dict(base, method="repaint", jump_length=2,
                                                                  resample_count=2), sigmas, torch.zeros_like(clean))
                rows["repaint_j2_r2"] = (out, 2 * args.steps, s)
            tail = guidance.ccdf_sigmas(sigmas, 0.3)
            out, s = sample(guidance.sample_restoration, dict(base, method="ddnm"), tail, pinv)
            rows["ccdf_t0.3+ddnm+"] = (out, len(tail) - 1, s)
            key = f"{task} sigma_y={sigma_y}"
            results[key] = {m: {"psnr": psnr(x, clean), "consistency": consistency(op, x, y), "nfe": nfe,
                                "seconds": round(sec, 2)} for m, (x, nfe, sec) in rows.items()}
            print(key, {m: round(v["psnr"], 2) for m, v in results[key].items()}, flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"samples": args.samples, "steps": args.steps, "results": results, "wall_s": time.time() - t0},
                  f, indent=1)
    print("| task | method | PSNR dB | ||A x - y|| (RMS) | NFE | s |\n|---|---|---|---|---|---|")
    for key, rows in results.items():
        for m, v in rows.items():
            print(f"| {key} | {m} | {v['psnr']:.2f} | {v['consistency']:.4f} | {v['nfe']} | {v['seconds']} |")
    print(f"wrote {args.out} in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
