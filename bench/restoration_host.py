"""Restoration against the host's own tools: the same model, the same number of model calls.

The host's ways to restore, run through the host's own nodes and functions, each at its best setting:
  img2img      the degraded image (SR: bicubic up-sampling by the host's comfy.utils.common_upscale, what ImageScale
               does) encoded, then nodes.common_ksampler (the KSampler node's function) at a partial denoise; the
               denoise and the sampler are swept (denoise 0 = the start image itself, no diffusion)
  noise_mask   inpainting: SetLatentNoiseMask on the encoded masked image, then common_ksampler (denoise swept)
  diff_diff    the same with the model patched by the DifferentialDiffusion node
(VAEEncodeForInpaint and InpaintModelConditioning are not run: they feed inpainting models, whose extra input
channels these digit models lack; on a model without them VAEEncodeForInpaint is noise-mask inpainting from a grey
hole with the mask grown by 6 px.)
Quickstep's rows: the Restoration Sampler's methods (`--ours`, default DAPS and DiffPIR, each at its tuned setting) from
the model's empty latent, the operator acting on pixels (through the decoder on latent models), on a schedule of the
model's whole range; the schedule (`--schedulers`, host scheduler names) is one of the tuned settings.

Protocol: every candidate setting (host and ours) runs on `--tune` tuning digits (from the training split); the best
of each method family there is run on `--samples` held-out digits (modelzoo.mnist_unet.mnist_split: the last 50 of
each class; spread over the classes); figures are from the held-out run. PSNR / SSIM in pixels (the 32x32 digit,
[-1, 1] mapped to [0, 1]); for inpainting also the class accuracy of ccexam's MNIST classifier (bench/distilled.py).
Unconditional (the null digit), cfg 1: one model call per step for every sampler used here.

Models (`--model`): sd15 (the embedded pixel-space digit model, eps); sd15_unshuffle4 / sd15_unshuffle16 (the same
network seen through an exact pixel-unshuffle "VAE": latents [B, 4, 16, 16] / [B, 16, 8, 8], the host's noise mask
then works at latent resolution); or an architecture of the digit model zoo (modelzoo.digit_models: sdxl, sd3,
flux, qwen_image (one-frame latents), lumina2), where that module and its weights exist; sd15_taesd, sdxl_taesdxl,
sd3_taesd3 and flux_taef1 are in real latent spaces: the 32 px digit is upscaled to 64 px RGB and goes through the
real TAESD / TAESDXL / TAESD3 / TAEF1 encoder and decoder (../shared/models/taesd), the operator and the figures
stay on the 32 px digit.

usage: python -m bench.restoration_host [--model sd15] [--tasks ...] [--calls 30] [--tune 6] [--samples 20]
                                        [--ours daps diffpir] [--schedulers karras simple] [--particles 1 2 4]
                                        [--daps-tau 0.01 0.05]
Writes bench/results/restoration_host_<model>.json and prints a markdown table.
"""
import argparse
import contextlib
import json
import logging
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from samplers import guidance, operators
from samplers.operators import psnr, ssim
from testbed.host import HOST_DIR, PACK_DIR

RESULTS = PACK_DIR / "bench" / "results"
SIZE = 32
DENOISE = (0.0, 0.2, 0.35, 0.5, 0.65, 0.8)      # euler; euler_ancestral at the upper half
MASK_DENOISE = (0.85, 1.0)
HOST_SAMPLERS = ("euler", "euler_ancestral")
PARTICLES = (1, 2, 4)       # chains averaged, each with calls / particles steps: a tuned setting of every method
DAPS_TAUS = (0.01, 0.05)
TASKS = ("sr_x2", "sr_x4", "inpaint_box50", "inpaint_random50", "inpaint_strokes", "deblur_g2_noisy", "jpeg_q20")


def task_operator(task):
    if task.startswith("sr_x"):
        return operators.Downsample(int(task[4:]))
    if task == "inpaint_box50":
        return operators.Inpaint(operators.box_mask(SIZE, SIZE, 0.5, "bottom"))
    if task == "inpaint_random50":
        return operators.Inpaint(operators.random_mask(SIZE, SIZE, 0.5, seed=0))
    if task == "inpaint_strokes":
        return operators.Inpaint(operators.stroke_mask(SIZE, SIZE, seed=0))
    if task == "deblur_g2_noisy":
        return operators.GaussianBlur(9, 2.0, sigma_y=0.05)
    if task == "jpeg_q20":
        return operators.JPEG(20)
    raise ValueError(f"unknown task {task!r}; tasks: {', '.join(TASKS)}")


class Prior:
    """A digit model with its latent code: encode/decode between pixel digits [B, 1, 32, 32] in [-1, 1] and the raw
    latents the host's samplers take and return."""

    def __init__(self, name):
        from modelzoo import mnist_unet
        self.name, self.single_frame, self.vae = name, False, None
        if name == "sd15" or name.startswith("sd15_unshuffle"):
            channels = int(name[len("sd15_unshuffle"):]) if name != "sd15" else 1
            self.factor, self.scale = math.isqrt(channels), 1.0
            self.patcher = mnist_unet.load_mnist_model(prediction="eps")
            if self.factor > 1:
                self.patcher = self.patcher.clone()
                self.patcher.set_model_unet_function_wrapper(self._unshuffled)
            self.conditioning = mnist_unet.unconditional_conditioning
        else:
            try:
                from modelzoo import digit_models
            except ImportError:
                raise SystemExit(f"--model {name}: modelzoo.digit_models (the digit model zoo) is not in this "
                                 "checkout; models here: sd15, sd15_unshuffle4, sd15_unshuffle16") from None
            arch = digit_models.architecture(name)
            if arch.frames > 1:
                raise SystemExit(f"--model {name}: video latents are not benchmarked")
            self.single_frame = arch.frames == 1      # Qwen-Image: an image is a one-frame clip [B, C, 1, H, W]
            self.factor, self.scale = math.isqrt(arch.channels), digit_models.LATENT_SCALE[arch.channels]
            if arch.vae:
                from testbed.mnist_ddpm import MODELS_DIR
                try:
                    self.vae = digit_models.load_taesd(arch.vae, MODELS_DIR / "taesd")
                except FileNotFoundError as e:
                    raise SystemExit(f"--model {name}: {e}") from None
            self.patcher = digit_models.load_digit_model(name)
            self.conditioning = digit_models.unconditional_conditioning

    def _unshuffled(self, apply_model, args):
        """The pixel model seen through the unshuffle code: latent -> pixels -> denoised pixels -> latent."""
        pixels = F.pixel_shuffle(args["input"], self.factor)
        return F.pixel_unshuffle(apply_model(pixels, args["timestep"], **args["c"]), self.factor)

    def encode(self, pixels):
        if self.vae is not None:
            from modelzoo import digit_models
            return digit_models.encode_digits(self.vae, pixels)
        if self.factor == 1:
            return pixels.clone()
        latent = F.pixel_unshuffle(pixels, self.factor) * self.scale
        return latent.unsqueeze(2) if self.single_frame else latent

    def decode(self, latent):
        if self.vae is not None:
            from modelzoo import digit_models
            return digit_models.decoded_to_pixels(self.vae.decode(latent).movedim(-1, 1) * 2.0 - 1.0)
        if self.factor == 1:
            return latent.float()
        latent = latent[:, :, 0] if self.single_frame else latent
        return F.pixel_shuffle(latent.float() / self.scale, self.factor)

    def state_decoder(self):
        """Dec for the guided sampler: the sampler's state is the model's processed latent."""
        if self.factor == 1:
            return None
        base = self.patcher.model
        if self.vae is not None:
            from modelzoo import digit_models
            decoder = self.vae.first_stage_model
            return lambda z: digit_models.decoded_to_pixels(decoder.decode(base.process_latent_out(z)))
        return lambda z: self.decode(base.process_latent_out(z))


def digits(split, count):
    """(pixels [N, 1, 32, 32] in [-1, 1], labels): `count` digits spread evenly over the split (classes in turn)."""
    from modelzoo import mnist_unet
    train_pixels, train_labels, eval_pixels, eval_labels = mnist_unet.mnist_split()
    pixels, labels = (train_pixels, train_labels) if split == "tune" else (eval_pixels, eval_labels)
    index = (torch.arange(count) * (len(labels) // count)).numpy()
    return mnist_unet.mnist_to_latent(pixels[index]), torch.as_tensor(labels[index])


def host_candidates(task):
    if task.startswith("inpaint"):
        return [("noise_mask", {"sampler": s, "denoise": d}) for s in HOST_SAMPLERS for d in MASK_DENOISE] + \
               [("diff_diff", {"sampler": "euler", "denoise": d}) for d in MASK_DENOISE]
    return [("img2img", {"sampler": s, "denoise": d}) for s in HOST_SAMPLERS for d in DENOISE
            if s == "euler" or d >= 0.5]


def our_candidates(task, methods, schedulers=("karras",), particles=PARTICLES, daps_taus=DAPS_TAUS):
    table = {"daps": [{"daps_prior_std": 1.0, "daps_tau": t} for t in daps_taus],
             "pigdm": [{"eta": 1.0}], "diffpir": [{"diffpir_zeta": 1.0}], "ddnm": [{"eta": 1.0}],
             "dps": [{"eta": 1.0}], "reddiff": [{}]}
    out = []
    for method in methods:
        if task == "jpeg_q20" and method not in ("daps", "dps", "reddiff"):
            continue
        for options in table[method]:
            if task == "jpeg_q20" and method == "daps":
                options = dict(options, daps_tau=max(options["daps_tau"], 0.01))
            out.extend((method, dict(options, method=method, particles=k, scheduler=scheduler))
                       for scheduler in schedulers for k in particles)
    return [c for i, c in enumerate(out) if c not in out[:i]]


class Runner:
    def __init__(self, prior, calls):
        self.prior, self.calls = prior, calls

    def sigmas(self, steps, scheduler="karras"):
        import comfy.samplers
        return comfy.samplers.calculate_sigmas(self.prior.patcher.get_model_object("model_sampling"), scheduler,
                                               steps).cpu()

    def host(self, kind, setting, op, y, batch):
        """A host method at one setting: (pixels, model calls)."""
        import nodes
        prior = self.prior
        if setting["denoise"] == 0:
            return start_pixels(op, y), 0
        hole = None
        if isinstance(op, operators.Inpaint):
            hole = (1.0 - op.mask)[:, 0].expand(batch, -1, -1)        # a ComfyUI MASK: 1 = to fill in
        latent = {"samples": prior.encode(start_pixels(op, y))}
        model = prior.patcher
        if hole is not None:
            (latent,) = nodes.SetLatentNoiseMask().set_mask(latent, hole)
        if kind == "diff_diff":
            from comfy_extras.nodes_differential_diffusion import DifferentialDiffusion
            model = DifferentialDiffusion.execute(model)[0]
        cond = prior.conditioning(batch)
        calls = CallCounter(model)
        (out,) = nodes.common_ksampler(calls.model, 0, self.calls, 1.0, setting["sampler"], "karras", cond, cond,
                                       latent, denoise=setting["denoise"])
        return prior.decode(out["samples"]).cpu(), calls.count

    def ours(self, setting, op, y, batch):
        import comfy.sample
        import comfy.samplers
        prior = self.prior
        decoder = prior.state_decoder()
        options = {k: v for k, v in setting.items() if k != "scheduler"}
        sampler = comfy.samplers.KSAMPLER(guidance.sample_restoration,
                                          extra_options=dict(options, operator=op, measurement=y, decoder=decoder))
        empty = prior.encode(torch.full((batch, 1, SIZE, SIZE), -1.0))
        noise = torch.randn(empty.shape, generator=torch.Generator().manual_seed(0))
        cond = prior.conditioning(batch)
        calls = CallCounter(prior.patcher)
        particles = options.get("particles", 1)
        decoder_weights = (guidance.autograd_weights(prior.vae.first_stage_model) if prior.vae is not None
                           else contextlib.nullcontext())
        with decoder_weights:
            sigmas = self.sigmas(self.calls // particles, setting.get("scheduler", "karras"))
            out = comfy.sample.sample_custom(calls.model, noise, 1.0, sampler, sigmas, cond, cond, empty,
                                             disable_pbar=True, seed=0)
        return prior.decode(out).cpu(), calls.count * particles     # each call evaluates every particle


class CallCounter:
    """Counts the model's forward calls (per batch) through a wrapper on a clone of the patcher."""

    def __init__(self, patcher):
        self.count = 0
        self.model = patcher.clone()
        inner = patcher.model_options.get("model_function_wrapper")

        def counted(apply_model, args):
            self.count += 1
            if inner is not None:
                return inner(apply_model, args)
            return apply_model(args["input"], args["timestep"], **args["c"])
        self.model.set_model_unet_function_wrapper(counted)


def start_pixels(op, y):
    """What a user holds: the degraded image, at the output size (bicubic, the host's common_upscale, for SR)."""
    import comfy.utils
    if isinstance(op, operators.Downsample):
        up = comfy.utils.common_upscale(y, SIZE, SIZE, "bicubic", "disabled")
        return up.clamp(-1, 1)
    return y.clone()


def measure(x, clean, labels, net, task):
    row = {"psnr": psnr(x, clean), "ssim": ssim(x, clean)}
    if net is not None:
        from modelzoo import mnist_unet
        with torch.no_grad():
            normalised = (mnist_unet.latent_to_digits(x.float()).unsqueeze(1) - 0.1307) / 0.3081   # ccexam's own
            predicted = net(normalised).argmax(1)
        row["accuracy"] = float((predicted == labels).float().mean())
    return row


def classifier():
    from bench.distilled import classifier as ccexam
    return ccexam()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sd15")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    parser.add_argument("--calls", type=int, default=30, help="model calls per image for every method (<= 50)")
    parser.add_argument("--tune", type=int, default=6, help="tuning digits (training split)")
    parser.add_argument("--samples", type=int, default=20, help="held-out digits")
    parser.add_argument("--ours", nargs="+", default=["daps", "diffpir"], help="Restoration Sampler methods to run")
    parser.add_argument("--schedulers", nargs="+", default=["karras", "simple"],
                        help="host schedulers our methods are tuned over (the host's img2img runs on karras)")
    parser.add_argument("--particles", nargs="+", type=int, default=list(PARTICLES),
                        help="chain counts our methods are tuned over")
    parser.add_argument("--daps-tau", nargs="+", type=float, default=list(DAPS_TAUS),
                        help="DAPS likelihood floors our DAPS rows are tuned over")
    parser.add_argument("--out", default=None)
    parser.add_argument("--base", default=str(HOST_DIR / "benchbase"),
                        help="the host's base directory (custom_nodes linked to this checkout)")
    args = parser.parse_args(argv)

    from testbed.inproc import InProcessHost
    logging.disable(logging.WARNING)
    torch.set_num_threads(1)
    InProcessHost(Path(args.base))
    import comfy.utils
    comfy.utils.PROGRESS_BAR_ENABLED = False
    torch.set_grad_enabled(False)
    prior = Prior(args.model)
    runner = Runner(prior, args.calls)
    net = classifier()
    out_path = args.out or str(RESULTS / f"restoration_host_{args.model}.json")
    report = {"model": args.model, "calls": args.calls, "tune": args.tune, "samples": args.samples, "tasks": {}}
    t0 = time.time()
    for task in args.tasks:
        op = task_operator(task)
        uses_net = net if task.startswith("inpaint") else None
        ours = our_candidates(task, args.ours, args.schedulers, args.particles, args.daps_tau)
        candidates = [("host", kind, s) for kind, s in host_candidates(task)] + \
                     [("ours", method, s) for method, s in ours]
        tuning, best = [], {}
        for split, count in (("tune", args.tune), ("heldout", args.samples)):
            clean, labels = digits(split, count)
            y = operators.add_noise(op.forward(clean), op.sigma_y, seed=1)
            runs = candidates if split == "tune" else list(best.values())
            for side, family, setting in runs:
                t = time.time()
                if side == "host":
                    x, calls = runner.host(family, setting, op, y, count)
                else:
                    x, calls = runner.ours(setting, op, y, count)
                row = dict(measure(x, clean, labels, uses_net, task), side=side, method=family, setting=setting,
                           calls=calls, seconds=round(time.time() - t, 1))
                if split == "tune":
                    tuning.append(row)
                    if family not in best or row["psnr"] > best[family][3]:
                        best[family] = (side, family, setting, row["psnr"])
                    print(f"tune {task} {family} {setting}: {row['psnr']:.2f} dB, {calls} calls", flush=True)
                else:
                    report["tasks"].setdefault(task, {"tuning": tuning, "heldout": []})["heldout"].append(row)
                    print(f"HELD-OUT {task} {family} {setting}: {row['psnr']:.2f} dB "
                          f"{row.get('accuracy', '')} {calls} calls", flush=True)
            best = {k: v[:3] for k, v in best.items()}
        if uses_net is not None:
            clean, labels = digits("heldout", args.samples)
            report["tasks"][task]["clean_accuracy"] = measure(clean, clean, labels, net, task)["accuracy"]
        RESULTS.mkdir(parents=True, exist_ok=True)
        report["wall_s"] = round(time.time() - t0)
        with open(out_path, "w") as f:
            json.dump(report, f, indent=1)
    print_table(report)
    print(f"wrote {out_path} in {time.time() - t0:.0f} s")


def print_table(report):
    print(f"model {report['model']}, {report['calls']} model calls, settings tuned on {report['tune']} training "
          f"digits, figures on {report['samples']} held-out digits")
    print("| task | method (tuned setting) | PSNR dB | SSIM | class accuracy | calls |\n|---|---|---|---|---|---|")
    for task, entry in report["tasks"].items():
        for row in entry["heldout"]:
            setting = ", ".join(f"{k} {v}" for k, v in row["setting"].items() if k != "method")
            accuracy = f"{row['accuracy']:.2f}" if "accuracy" in row else "-"
            print(f"| {task} | {row['side']}: {row['method']} ({setting}) | {row['psnr']:.2f} | {row['ssim']:.3f} | "
                  f"{accuracy} | {row['calls']} |")
        host = max((r["psnr"] for r in entry["heldout"] if r["side"] == "host"), default=math.nan)
        ours = max((r["psnr"] for r in entry["heldout"] if r["side"] == "ours"), default=math.nan)
        print(f"| {task} | **best ours - best host** | **{ours - host:+.2f}** | | | |")


if __name__ == "__main__":
    main()
