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


# Flow-distilled checkpoints publish flow times t in (0, 1] (timestep / 1000) and the time shift they were distilled
# at; the noise level is sigma = shift t / (1 + (shift - 1) t) (the host's time_snr_shift), then a final 0. A flow
# model's time map is sigma x multiplier whatever shift it was loaded with, so these sigmas are right for its own
# model_sampling: the shift the authors used is applied here, not the one the loader set.
def even_flow_times(steps):
    """1, 1 - 1/N, ..., 1/N: every reference below spaces its N model calls this way (Euler, last step to 0)."""
    return [1.0 - k / steps for k in range(steps)]


def sd3_normal_flow_times(steps, shift=3.0, train_steps=1000):
    """Stability's SD3.5 reference (sd3_infer.py get_sigmas): N times evenly from timestep(sigma_max) = 1 down to
    timestep(sigma_min), where sigma_min is its shifted first training level shift(1/1000), and shifted again."""
    low = shifted_flow_sigma(shift, 1.0 / train_steps)
    return [1.0 + (low - 1.0) * k / (steps - 1) for k in range(steps)] if steps > 1 else [1.0]


def shifted_flow_sigma(shift, t):
    return shift * t / (1.0 + (shift - 1.0) * t)


def flow_preset_sigmas(family, steps):
    """SIGMAS of a flow preset: its published times at its distillation shift, then 0 (float32, on the CPU)."""
    sigmas = [shifted_flow_sigma(family.shift, t) for t in family.timesteps(steps)]
    return torch.tensor(sigmas + [0.0], dtype=torch.float32)


class Family:
    """How one distilled family is sampled: published timesteps per step count, TCD gamma (0 = DDIM/Euler,
    1 = consistency re-noising), the prediction it needs, the model-sampling patch it wants and the CFG scale it was
    distilled for (1: the host skips the unconditional pass). Flow presets (`shift` set) publish flow times in
    (0, 1] at that time shift instead of discrete timesteps."""

    def __init__(self, title, steps, timesteps, gamma, prediction, patch=None, pure_noise_steps=(), note="",
                 cfg=1.0, shift=None):
        self.title, self.steps, self.timesteps, self.gamma = title, steps, timesteps, gamma
        self.prediction, self.patch, self.pure_noise_steps, self.note = prediction, patch, pure_noise_steps, note
        self.cfg, self.shift = cfg, shift


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
    "flow_distilled": Family("Flow-distilled (any, on its own schedule)", (1, 2, 4, 8), None, 0.0, "flow",
                             note="the model's own flow schedule, Euler; cfg 1."),
    # The checkpoints people run now, each as its authors sample it: Euler (TCD at gamma 0) on their published times
    # and shift, CFG-distilled (cfg 1: one model pass per step).
    # Wan: ModelTC/LightX2V configs/distill/wan21/wan_t2v_distill_model_4step_cfg.json and
    # configs/wan22/wan_moe_t2v_distill.json: denoising_step_list [1000, 750, 500, 250], sample_shift 5,
    # enable_cfg false; Wan 2.2 A14B switches from the high-noise to the low-noise expert at boundary_step_index 2;
    # the sigmas are lightx2v's models/schedulers/wan/step_distill/scheduler.py (shifted t = step / 1000).
    "wan_lightning": Family("Wan 2.1 / 2.2 Lightning (lightx2v)", (4,), even_flow_times, 0.0, "flow", shift=5.0,
                            note="1000/750/500/250 at shift 5, cfg 1; Wan 2.2 A14B: steps 1-2 on the high-noise "
                                 "expert, 3-4 on the low-noise one (Split Sigmas at 2)."),
    # ModelTC/Qwen-Image-Lightning generate_with_diffusers.py: FlowMatchEulerDiscreteScheduler with exponential time
    # shift at mu = log 3 for every size ("We use shift=3 in distillation"), 8 steps (or the 4-step LoRA), true_cfg
    # 1; diffusers' pipeline_qwenimage.py spaces the times as linspace(1, 1/N, N).
    "qwen_image_lightning": Family("Qwen-Image-Lightning", (4, 8), even_flow_times, 0.0, "flow", shift=3.0,
                                   note="shift 3 at every size, cfg 1."),
    # Tongyi-MAI/Z-Image README: Z-Image-Turbo, num_inference_steps=9 ("8 DiT forwards"), guidance_scale=0.0; its
    # scheduler config shift 3.0 without dynamic shifting; diffusers' ZImagePipeline sets sigma_min 0, so the 9
    # times are linspace(1, 0, 9) and the last (t = 0) makes no call.
    "z_image_turbo": Family("Z-Image-Turbo", (8,), even_flow_times, 0.0, "flow", shift=3.0,
                            note="8 model calls at shift 3, cfg 1 (guidance 0 in diffusers)."),
    # black-forest-labs/flux src/flux/cli.py: schnell defaults to 4 steps and calls get_schedule(..., shift=False)
    # (src/flux/sampling.py: linspace(1, 0, N + 1), unshifted); schnell has no guidance input.
    "flux_schnell": Family("FLUX.1-schnell", (4,), even_flow_times, 0.0, "flow", shift=1.0,
                           note="1, 0.75, 0.5, 0.25 unshifted, cfg 1."),
    # Stability-AI/sd3.5 sd3_infer.py: sd3.5_large_turbo {shift 3.0, cfg 1.0, steps 4, sampler euler}, times from
    # its get_sigmas (sd3_normal_flow_times).
    "sd35_turbo": Family("SD3.5 Large Turbo", (4,), sd3_normal_flow_times, 0.0, "flow", shift=3.0,
                         note="shift 3, Stability's own spacing (last call at sigma 0.009), cfg 1."),
}
