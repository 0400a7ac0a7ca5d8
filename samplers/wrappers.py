"""Sampler wrappers: each takes a base sampler function and returns a sampler function with the usual signature.

- with_unic(base, order=3, variant="bh2"): UniC corrector over any multistep sampler (marked `supports_corrector`:
  dpmpp_2m/3m, deis, ipndm, ipndm_v); the base's driver calls the corrector with the model output it computes
  anyway, so the NFE is unchanged.
- with_pfdiff(base, k=2, h=1): PFDiff timestep skipping (arXiv 2408.08822) over a slope sampler (one exposing
  `interval_slope`: euler = first order, 1 NFE per evaluation; heun = second order, 2 NFE per evaluation).
- with_restart(base, restart=..., s_noise=1.0): Restart sampling (Xu et al. 2023) with any base sampler.
- with_defaults(base, name, **defaults): `base` under another name with other default options (a preset).
"""
import math

import torch

from .common import Run, check_float, check_int, trange
from .frame import frame_of
from .schedules import karras_sigmas
from .solvers import UniC, _check_common, default_noise_sampler, sample_euler, sample_heun, with_validation


# ================================================ UniC ==============================================================
def with_unic(base, order=3, variant="bh2"):
    """`base` with the UniC corrector of the given order (1-3) and B(h) variant; options of the returned sampler:
    the base's, plus unic_order / unic_variant overriding these defaults."""
    if not getattr(base, "supports_corrector", False):
        raise ValueError(f"with_unic needs a multistep sampler that accepts a corrector, got "
                         f"{getattr(base, '__name__', base)!r}")
    UniC(order, variant)    # validates the defaults now, not at the first sampling call

    def sampler(model, x, sigmas, extra_args=None, callback=None, disable=None, unic_order=order,
                unic_variant=variant, **options):
        corrector = UniC(unic_order, unic_variant, options.get("lower_order_final", True))
        return base(model, x, sigmas, extra_args, callback, disable, corrector=corrector, **options)

    def validate(unic_order=order, unic_variant=variant, **options):
        UniC(unic_order, unic_variant)
        base.validate(**options)

    sampler.__name__ = sampler.__qualname__ = f"{base.__name__}_unic"
    sampler.__doc__ = f"{base.__name__} + UniC corrector (no extra model call)."
    sampler.validate = validate
    return sampler


# ================================================ presets ===========================================================
def with_defaults(base, name, **defaults):
    """`base` named `name` whose options default to `defaults` (the caller's options still win)."""
    base.validate(**defaults)

    def sampler(model, x, sigmas, extra_args=None, callback=None, disable=None, **options):
        return base(model, x, sigmas, extra_args, callback, disable, **{**defaults, **options})

    sampler.__name__ = sampler.__qualname__ = f"sample_{name}"
    sampler.__doc__ = f"{base.__name__} with {defaults}."
    sampler.validate = lambda **options: base.validate(**{**defaults, **options})
    if getattr(base, "supports_corrector", False):
        sampler.supports_corrector = True
    return sampler


# ================================================ PFDiff ============================================================
def _check_pfdiff(k=2, h=1, stats=None):
    check_int("k", k, 1, 3)
    check_int("h", h, 1, k)
    _check_common(stats=stats)


def _pfdiff_iterations(n_intervals, k, h):
    """(springboard, landing) index pairs after the first full step; springboard == start means a plain step."""
    plan, n = [], 1
    while n < n_intervals:
        land = min(n + k + 1, n_intervals)
        plan.append((n, min(n + h, land - 1), land))
        n = land
    return plan


def pfdiff_fine_steps(evaluations, k):
    """Fine intervals F = M(k+1) - k that M slope evaluations cover (M = NFE for a first-order base): build the
    schedule with F steps (F + 1 sigmas) for an M-evaluation budget."""
    check_int("evaluations", evaluations, 1, 10 ** 6)
    check_int("k", k, 1, 3)
    return evaluations * (k + 1) - k


def pfdiff_nfe(sigmas, k=2, h=1, base=sample_euler):
    """Model calls PFDiff makes on this schedule: one slope evaluation on the first interval, then one per
    iteration; an evaluation costs 1 NFE for euler, 2 for heun except the landing on sigma = 0 (1 NFE)."""
    _check_pfdiff(k, h)
    sigmas = [float(s) for s in sigmas]
    evaluations = [(0, 1)] + [(j, land) for _, j, land in _pfdiff_iterations(len(sigmas) - 1, k, h)]
    second_order = base.interval_slope is sample_heun.interval_slope
    return sum(2 if second_order and sigmas[land] > 0 else 1 for _, land in evaluations)


def with_pfdiff(base=sample_euler, k=2, h=1):
    """PFDiff over a slope sampler.  Each iteration at fine index n: springboard x~ = x_n + (s_j - s_n) Q with the
    past slope Q (0 NFE, j = n + h), future slope Q = slope(x~, s_j -> s_m) (the base's model calls), then
    x_m = x_n + (s_m - s_n) Q from the CURRENT state, m = n + k + 1: one evaluation covers k + 1 intervals.
    Slopes are directions d (epsilon / velocity), as in the reference; Frame A, so flow models work unchanged."""
    slope = getattr(base, "interval_slope", None)
    if slope is None:
        raise ValueError(f"with_pfdiff needs a slope sampler (euler, heun), got {getattr(base, '__name__', base)!r}")
    _check_pfdiff(k, h)

    @with_validation(_check_pfdiff)
    def sampler(model, x, sigmas, extra_args=None, callback=None, disable=None, k=k, h=h, stats=None):
        _check_pfdiff(k, h, stats)
        run = Run(model, x, sigmas, extra_args, callback, disable, stats)
        sig, x = run.sigmas, run.x
        direction, denoised = slope(run.denoiser, x, sig[0], sig[1])     # the first step is a real evaluation
        run.report(0, x, denoised)
        x = x + (sig[1] - sig[0]) * direction
        plan = _pfdiff_iterations(run.n_steps, k, h)
        for iteration in trange(len(plan), disable=disable):
            start, springboard, land = plan[iteration]
            x_springboard = x + (sig[springboard] - sig[start]) * direction
            direction, denoised = slope(run.denoiser, x_springboard, sig[springboard], sig[land])
            run.report(iteration + 1, x, denoised, sig[start], sig[springboard])
            x = x + (sig[land] - sig[start]) * direction
        return run.finish(x, iterations=len(plan) + 1)

    sampler.__name__ = sampler.__qualname__ = f"sample_pfdiff_{base.__name__.removeprefix('sample_')}"
    sampler.__doc__ = with_pfdiff.__doc__
    return sampler


# ================================================ Restart ===========================================================
# Restart intervals as in the reference (SD v1.5, CFG 5-8): {t_min: (n_restart, repeats, t_max)}, sigmas in
# Frame-B VE units (sigma~ = sigma/alpha), so the same numbers serve flow models.
DEFAULT_RESTART = {0.1: (10, 2, 2.0)}


def _check_restart(restart=None, s_noise=1.0, stats=None, **base_options):
    restart = DEFAULT_RESTART if restart is None else restart
    if not isinstance(restart, dict):
        raise ValueError(f"option restart must be a dict {{t_min: (n_restart, repeats, t_max)}}, got {restart!r}")
    for t_min, spec in restart.items():
        check_float("restart t_min", t_min, 0.0, low_open=True)
        if not (isinstance(spec, (tuple, list)) and len(spec) == 3):
            raise ValueError(f"option restart[{t_min}] must be (n_restart, repeats, t_max), got {spec!r}")
        n_restart, repeats, t_max = spec
        check_int("restart n_restart", n_restart, 2, 1000)
        check_int("restart repeats", repeats, 0, 100)
        check_float("restart t_max", t_max, t_min, low_open=True)
    check_float("s_noise", s_noise, 0.0)
    _check_common(stats=stats)


def with_restart(base=sample_heun, restart=None, s_noise=1.0):
    """Restart sampling around `base`.  The main schedule runs in segments; at the main sigma nearest each t_min
    the state is re-noised to t_max (marginal-preserving, spec 0.4) and re-solved back with `base` on a Karras
    (rho = 7) grid of n_restart sigmas, `repeats` times.  Extra options go to `base`."""
    restart = DEFAULT_RESTART if restart is None else restart
    _check_restart(restart, s_noise)

    def sampler(model, x, sigmas, extra_args=None, callback=None, disable=None, restart=restart, s_noise=s_noise,
                noise_sampler=None, stats=None, **base_options):
        _check_restart(restart, s_noise, stats)
        run = Run(model, x, sigmas, extra_args, callback, disable, None)   # validation, fp32 state, dtype
        frame, sig = frame_of(model), run.sigmas
        positive = [i for i, s in enumerate(sig) if s > 0]
        plan = {}                                   # main index -> (restart sigmas, repeats)
        for t_min, (n_restart, repeats, t_max) in restart.items():
            index = min(positive, key=lambda i: abs(frame.ve_sigma(sig[i]) - t_min))
            grid = [frame.from_ve_sigma(s) for s in karras_sigmas(n_restart, frame.ve_sigma(sig[index]), t_max)[:-1].tolist()]
            if repeats > 0 and grid[0] > sig[index] and index > 0:
                grid[-1] = sig[index]               # land exactly on the main schedule
                plan[index] = (grid, repeats)
        noise_sampler = noise_sampler or default_noise_sampler(run.x, run.denoiser.extra_args.get("seed", 0))
        counts = {"nfe": 0, "restarts": 0}

        def run_base(x, segment, offset):
            sub_stats = {}
            report = None if callback is None else (lambda info: callback({**info, "i": info["i"] + offset}))
            x = base(model, x, torch.tensor(segment), extra_args, report, True, stats=sub_stats, **base_options)
            counts["nfe"] += sub_stats["nfe"]
            return x

        x, start = run.x, 0
        for stop in sorted(plan) + [run.n_steps]:
            if stop > start:
                x = run_base(x, sig[start:stop + 1], start)
            if stop in plan:
                grid, repeats = plan[stop]
                for _ in range(repeats):
                    x = frame.renoise(x, sig[stop], grid[0], s_noise * noise_sampler())
                    x = run_base(x, grid, stop)
                    counts["restarts"] += 1
            start = stop
        if stats is not None:
            stats.update(steps=run.n_steps, **counts)
        return x.to(run.input_dtype)

    sampler.validate = _check_restart
    sampler.__name__ = sampler.__qualname__ = f"sample_restart_{base.__name__.removeprefix('sample_')}"
    sampler.__doc__ = with_restart.__doc__
    return sampler
