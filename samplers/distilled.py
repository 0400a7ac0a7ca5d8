"""Sampling distilled few-step models (spec group 4): TCD's strategic stochastic sampling, consistency-model noise
levels, and the published timesteps of each distilled family.

TCD (Zheng et al. 2024), one step from sigma_i to sigma_{i+1}:
    D = model(x, sigma_i)
    s = floor((1 - gamma) * timestep(sigma_{i+1}))           # in the model's TIMESTEP units, not sigma
    x_s = DDIM jump of (x, D) from sigma_i to sigma(s)         # exponential-integrator first order (frame.py)
    x_{i+1} = x_s re-noised from sigma(s) up to sigma_{i+1}    # marginal-preserving for EPS and CONST (spec 0.4)
gamma = 0 is deterministic DDIM; gamma = 1 denoises to the clean end and re-noises, which is consistency-model
multistep sampling (ComfyUI's `lcm` loop; diffusers' TCD stops at timestep 0 instead, a 0.03 sigma away).
"""
import math

import torch

from .common import Run, check_float
from .frame import frame_of, model_sampling_of
from .schedules import karras_sigmas
from .solvers import _check_common, default_noise_sampler, with_validation


def _check_tcd(gamma=0.3, pure_noise_start=False, noise_sampler=None, stats=None):
    check_float("gamma", gamma, 0.0, 1.0)
    if pure_noise_start not in (True, False):
        raise ValueError(f"option pure_noise_start must be True or False, got {pure_noise_start!r}")
    _check_common(stats=stats)


def intermediate_sigma(model_sampling, sigma_next, gamma):
    """TCD's intermediate level: (1 - gamma) of the next TIMESTEP, floored onto the model's integer grid, as a
    sigma.  Without a host model_sampling's time map (plain torch), time is sigma itself and no grid applies."""
    if sigma_next <= 0.0 or gamma == 0.0:
        return sigma_next
    if gamma == 1.0:        # consistency-model sampling: the clean end itself, not the grid's first level
        return 0.0
    if not hasattr(model_sampling, "timestep"):       # no host time map (plain torch): time is sigma itself
        return (1.0 - gamma) * sigma_next
    timestep = float(model_sampling.timestep(torch.tensor([sigma_next], dtype=torch.float32))[0])
    target = math.floor((1.0 - gamma) * timestep)
    return float(model_sampling.sigma(torch.tensor([float(target)], dtype=torch.float32))[0])


@with_validation(_check_tcd)
def sample_tcd(model, x, sigmas, extra_args=None, callback=None, disable=None, gamma=0.3, pure_noise_start=False,
               noise_sampler=None, stats=None):
    """TCD strategic stochastic sampling (gamma in [0, 1]); 1 NFE per step; exact for EPS, V and CONST models.

    `pure_noise_start`: the first level is a one-step generator's fixed timestep (DMD2 t=399, Hyper-SD t=800)
    that was trained on *pure* noise: the host scales the start noise by sigma_0, the generator expects the
    variance-preserving unit noise, i.e. sqrt(1 + sigma_0^2) in the host's EPS space (txt2img from an empty
    latent; flow models already start from unit noise)."""
    _check_tcd(gamma, pure_noise_start, noise_sampler, stats)
    run = Run(model, x, sigmas, extra_args, callback, disable, stats)
    frame, model_sampling = frame_of(model), model_sampling_of(model)
    if noise_sampler is None and gamma > 0:
        noise_sampler = default_noise_sampler(run.x, run.denoiser.extra_args.get("seed", 0))
    x = run.x
    if pure_noise_start and not frame.flow and run.sigmas[0] > 0:
        x = x * (math.sqrt(1.0 + run.sigmas[0] ** 2) / run.sigmas[0])
    for i in run.steps():
        sigma, sigma_next = run.sigmas[i], run.sigmas[i + 1]
        denoised = run.denoiser(x, sigma)
        run.report(i, x, denoised)
        sigma_mid = min(intermediate_sigma(model_sampling, sigma_next, gamma), sigma_next)
        ratio, weight = frame.finite_for([sigma]).first_order(sigma, sigma_mid)
        x = ratio * x + weight * denoised if sigma_mid > 0 else denoised
        if sigma_next > sigma_mid:
            x = frame.renoise(x, sigma_mid, sigma_next, noise_sampler())
    return run.finish(x)


def consistency_sigmas(indices, grid_steps, sigma_min, sigma_max, rho=7.0):
    """Consistency-model multistep noise levels as the official CM sampler picks them: indices into a Karras
    (rho) grid of `grid_steps` levels from sigma_max down to sigma_min (e.g. 0, 22, 39 of 40 on ImageNet-64 gives
    tau_1 = 1.38), then 0.  Indices must be increasing, the first 0."""
    if grid_steps < 2 or not indices or indices[0] != 0 or any(b <= a for a, b in zip(indices, indices[1:])) \
            or indices[-1] >= grid_steps:
        raise ValueError(f"indices {list(indices)} must start at 0, increase and stay below grid_steps = {grid_steps}")
    grid = karras_sigmas(grid_steps, sigma_min, sigma_max, rho)
    return torch.cat([grid[list(indices)], grid.new_zeros(1)])


# Published timesteps per family and step count (discrete 1000-step models; a SIGMAS is sigma(t) + a final 0).
# LCM / TCD / DMD2 4-step: the 50-step distillation grid (every 20th timestep), evenly indexed; Lightning and
# Hyper-SD N-step: "trailing" spacing round(1000 - 1000 k / N) - 1; Turbo: 999, 899, ... (ComfyUI's
# SDTurboScheduler); one-step models trained at a fixed timestep say so (Hyper-SD 800, DMD2 399).
def lcm_timesteps(steps, original_steps=50):
    grid = [(k + 1) * (1000 // original_steps) - 1 for k in range(original_steps)][::-1]
    return [grid[int(math.floor(k * original_steps / steps))] for k in range(steps)]


def trailing_timesteps(steps):
    return [int(round(1000 - 1000 * k / steps)) - 1 for k in range(steps)]


def turbo_timesteps(steps):
    return [999 - 100 * k for k in range(steps)]


class Family:
    """How one distilled family is sampled: published timesteps per step count, TCD gamma (0 = DDIM/Euler,
    1 = consistency re-noising), the prediction it needs and the model-sampling patch it wants."""

    def __init__(self, title, steps, timesteps, gamma, prediction, patch=None, pure_noise_steps=(), note=""):
        self.title, self.steps, self.timesteps, self.gamma = title, steps, timesteps, gamma
        self.prediction, self.patch, self.pure_noise_steps, self.note = prediction, patch, pure_noise_steps, note


def _one_step_at(timestep, multi):
    return lambda steps: [timestep] if steps == 1 else multi(steps)


# prediction: "eps" (must be EPS), "discrete" (EPS or V, warn on V), "flow" (CONST).
FAMILIES = {
    "lcm": Family("LCM / LCM-LoRA", (1, 2, 4, 8), lcm_timesteps, 1.0, "eps", patch="lcm",
                  note="LCM boundary condition (c_skip/c_out) patched in; cfg 1-2."),
    "tcd": Family("TCD", (1, 2, 4, 8), lcm_timesteps, 0.3, "discrete",
                  note="gamma 0.3 by default, higher for more steps; cfg 1."),
    "turbo": Family("SD-Turbo / SDXL-Turbo (ADD)", (1, 2, 3, 4), turbo_timesteps, 1.0, "discrete",
                    note="cfg 1, 512x512; more than one step re-noises as a consistency model."),
    "lightning": Family("SDXL-Lightning", (1, 2, 4, 8), trailing_timesteps, 0.0, "discrete", patch="x0_one_step",
                        note="trailing timesteps, Euler; the 1-step checkpoint predicts x0."),
    "hyper_sd": Family("Hyper-SD", (1, 2, 4, 8), _one_step_at(800, trailing_timesteps), 0.0, "discrete",
                       pure_noise_steps=(1,), note="trailing DDIM for 2-8 steps; 1 step: TCD gamma 1 at t=800."),
    "dmd2": Family("DMD2", (1, 4), _one_step_at(399, trailing_timesteps), 1.0, "discrete", pure_noise_steps=(1,),
                   note="4 steps at 999/749/499/249 with consistency re-noising; 1 step at t=399."),
    "consistency": Family("Consistency model", (1, 2), None, 1.0, "discrete",
                          note="2 steps: indices 0 and 22 of a 40-level Karras grid, as the official sampler."),
    "flow_distilled": Family("Flow-distilled (FLUX.1-schnell, SD3.5 Turbo)", (1, 2, 4, 8), None, 0.0, "flow",
                             note="the model's own flow schedule, Euler; cfg 1."),
}
