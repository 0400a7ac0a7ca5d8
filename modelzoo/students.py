"""One-step and few-step students of the embedded digit model, and the sampling both the distillation script and the
benchmark use for teacher and students alike.

The consistency student has the teacher's architecture and format (a flow-prediction host UNet in a safetensors file
with the digit table), so it loads through the same node and samplers as the teacher. It is trained to be the
teacher's consistency function: from any point x_t of a teacher PF-ODE trajectory (DPM-Solver++(2M), 20 steps, CFG
baked in) it predicts that trajectory's end. One step from sigma = 1 is then a sample; more steps re-noise the
estimate (consistency multistep sampling, the TCD sampler at gamma 1).

Imports comfy: only import this inside a running host (nodes, scripts, benchmarks).
"""
from pathlib import Path

import torch

from . import mnist_unet

STUDENTS = {"consistency": "mnist_student_consistency.safetensors"}
TEACHER_PREDICTION = "flow"
TEACHER_STEPS = 20
TEACHER_CFG = 2.0


def student_path(name):
    if name not in STUDENTS:
        raise ValueError(f"student must be one of {', '.join(STUDENTS)}, got {name!r}")
    return Path(__file__).resolve().parent / "weights" / STUDENTS[name]


class GuidedDenoiser:
    """D(x, sigma) of a digit model with CFG against the null digit, called the k-diffusion way (x, sigma[B])."""

    def __init__(self, model, digits, cfg):
        self.model, self.cfg = model, cfg
        self.positive = mnist_unet.digit_context(digits)
        self.negative = mnist_unet.digit_context([mnist_unet.NULL_DIGIT] * len(digits))

    def __call__(self, x, sigma, **_sampler_extras):
        if self.cfg == 1.0:
            return self.model.apply_model(x, sigma, c_crossattn=self.positive)
        both = self.model.apply_model(torch.cat([x, x]), torch.cat([sigma, sigma]),
                                      c_crossattn=torch.cat([self.positive, self.negative]))
        cond, uncond = both.chunk(2)
        return uncond + self.cfg * (cond - uncond)


def flow_sigmas(model, steps):
    import comfy.samplers
    return comfy.samplers.calculate_sigmas(model.model_sampling, "simple", steps).float().cpu()


def start_noise(count, seed):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(count, 1, mnist_unet.IMAGE_SIZE, mnist_unet.IMAGE_SIZE, generator=generator)


@torch.no_grad()
def sample(model, digits, sigmas, cfg, seed, sampler, states=None, **options):
    """Digits from noise of `seed` at sigmas[0] = 1 (flow) with a k-diffusion `sampler` function (samplers/).
    `states` (a list) collects the state entering every step and the result."""
    denoise = GuidedDenoiser(model, digits, cfg)
    x = start_noise(len(digits), seed) * float(sigmas[0])
    record = None if states is None else (lambda info: states.append(info["x"].clone()))
    out = sampler(denoise, x, sigmas, {"seed": seed}, callback=record, disable=True, **options)
    if states is not None:
        states.append(out.clone())
    return out
