"""ODE solvers in the k-diffusion convention: sample_xxx(model, x, sigmas, extra_args=None, callback=None,
disable=None, **options).

Families and the drivers they share:
- slope samplers (Euler, Heun/EDM): x_t = x_s + (sigma_t - sigma_s) * slope, the slope coming from
  `interval_slope` (this hook is what PFDiff reuses), with optional marginal-preserving churn.
- multistep samplers (DPM-Solver++ 2M/3M, UniPC, DEIS, iPNDM, iPNDM-v): one model call per step, driven by
  `run_multistep`.  A multistep sampler is a *predictor* `predict(frame, x, sigma_t, history, order) -> x_t`; the
  driver also accepts a *corrector* `correct(frame, x_s, step, sigmas, history, new_denoised, n_steps) -> x_t`,
  called right after the model output at the predicted point arrives and before it joins the history.  Every
  multistep sampler takes that hook as its `corrector` option (marked `supports_corrector`): that is how
  `with_unic` (wrappers.py) adds UniC to any of them at no extra model call.
- singlestep samplers (DPM-Solver-2/-3, DPM-Solver++ 2S): `order` model calls per interval, `run_singlestep`.
The final interval to sigma = 0 is x = D(x, sigma_{N-1}) (spec 0.5), and every driver stops there; multistep
samplers also offer a second-order final step and, for few-step budgets, two ways to save a model call
(`first_step`, `final_step`: see `run_multistep`).
"""
import math

import numpy as np
import torch

from .common import Run, check_choice, check_float, check_int, step_order
from .frame import frame_of

_HISTORY_KEPT = 4                 # highest multistep order of any sampler here (iPNDM order 4)
_GAUSS_LEGENDRE = np.polynomial.legendre.leggauss(8)   # exact for the degree <= 3 Adams polynomials in sigma

# Fixed-step Adams-Bashforth coefficients of iPNDM, newest direction first.
_IPNDM_COEFFICIENTS = {1: [1.0], 2: [1.5, -0.5], 3: [23 / 12, -16 / 12, 5 / 12],
                       4: [55 / 24, -59 / 24, 37 / 24, -9 / 24]}


def combine(ratio, x, weights, tensors):
    """ratio * x + sum_j weights_j * tensors_j (float64 scalars applied in the state dtype)."""
    out = x * ratio
    for weight, tensor in zip(weights, tensors):
        if weight != 0.0:
            out = out + weight * tensor
    return out


def supports_corrector(sampler):
    """Mark a multistep sampler whose `corrector` option plugs a corrector into `run_multistep`."""
    sampler.supports_corrector = True
    return sampler


def with_validation(validator):
    """Attach the option validator (called with the sampler's options; raises ValueError)."""
    def mark(sampler):
        sampler.validate = validator
        return sampler
    return mark


FIRST_STEPS = ("model", "analytic", "auto")
FINAL_STEPS = ("denoised", "ab2", "extrapolate")


def _check_common(lower_order_final=True, stats=None, corrector=None, final_step="denoised", first_step="model"):
    check_choice("lower_order_final", lower_order_final, (True, False))
    check_choice("final_step", final_step, FINAL_STEPS)
    check_choice("first_step", first_step, FIRST_STEPS)
    if stats is not None and not isinstance(stats, dict):
        raise ValueError(f"option stats must be a dict or None, got {type(stats).__name__}")
    if corrector is not None and not callable(corrector):
        raise ValueError(f"option corrector must be callable or None, got {corrector!r}")


# ================================================ multistep driver ==================================================
class History:
    """The last few model outputs, newest first: sigma, D and the ODE direction d at the evaluated point."""

    def __init__(self):
        self.sigmas, self.denoised, self.directions = [], [], []

    def push(self, sigma, denoised, direction):
        for store, value in ((self.sigmas, sigma), (self.denoised, denoised), (self.directions, direction)):
            store.insert(0, value)
            del store[_HISTORY_KEPT:]

    def __len__(self):
        return len(self.sigmas)


def resolve_first_step(first_step, frame, sigmas):
    """"auto": the analytic first step exactly where the start state holds no information about the data (flow
    sigma = 1, lambda = -inf: D(x, 1) is the data mean for every x), else the model call."""
    if first_step != "auto":
        return first_step
    return "analytic" if frame.lam(sigmas[0]) == -math.inf else "model"


def run_multistep(run, predict, max_order, lower_order_final, corrector=None, final_step="denoised",
                  first_step="model"):
    """One model call per step, predictor (+ optional corrector) on the history of outputs.

    `final_step`, the jump to sigma = 0: x = D ("denoised"); variable-step AB2 on d in sigma over the two newest
    outputs ("ab2"; spec 0.5: helps few-step flow schedules whose last nonzero sigma is large); or "extrapolate":
    no model call at the last nonzero sigma, the AB2 extrapolation of the two newest directions d carries x to 0
    (the "no denoise to zero" of DPM-Solver/EDM and AFS's code, with the last jump extrapolated instead of
    dropped: its error is sigma_{N-1} times the extrapolation error of d, so it saves a call where sigma_{N-1} is
    small).
    `first_step="analytic"`: the analytic first step (AFS, Zhou et al. CVPR 2024) saves the call at sigma_0: the
    first step is taken with D = 0 (AFS's zero-mean guess), then, unlike AFS, redone with the model output at
    sigma_1 in place of D(x_0, sigma_0) (the UniC idea: the output at the predicted point corrects that point), so
    a non-zero data mean does not leak into the trajectory.  Sound where D barely changes over the first interval
    (from flow sigma = 1, where D(x, 1) is the data mean for every x); not from SD's sigma_max = 14.6.
    `first_step="auto"` takes the analytic first step where it is sound (`resolve_first_step`).  "extrapolate" has
    no "auto": it won on the oracle but not on the trained digit model (README), so it is the user's explicit choice.
    """
    frame = frame_of(run.denoiser.model)
    sigmas, x, x_before = run.sigmas, run.x, None
    analytic_start = resolve_first_step(first_step, frame, sigmas) == "analytic" and sigmas[1] > 0.0
    if analytic_start:
        first_ratio, first_weight = frame.finite_for(sigmas[:1]).first_order(sigmas[0], sigmas[1])
    history = History()
    for i in run.steps():
        if i == 0 and analytic_start:
            x_before = x
            x = x * first_ratio                                 # the first-order step with D = 0
            continue
        if sigmas[i + 1] == 0.0 and final_step == "extrapolate" and len(history) > 0:
            x = combine(1.0, x, adams_weights(sigmas[i], 0.0, history.sigmas[:2]), history.directions)
            continue
        denoised, direction = run.denoiser.d(x, sigmas[i])
        if i == 1 and analytic_start:
            x = first_ratio * x_before + first_weight * denoised
            direction = (x - denoised) / sigmas[i]
        elif corrector is not None and i > 0:
            # the output at the predicted point corrects that point; it stays the history value (UniPC design)
            x = corrector(frame, x_before, i - 1, sigmas, history, denoised, run.n_steps)
        history.push(sigmas[i], denoised, direction)
        run.report(i, x, denoised)
        if sigmas[i + 1] == 0.0:
            if final_step == "ab2" and len(history) >= 2:
                history.directions[0] = (x - denoised) / sigmas[i]     # at the (possibly corrected) state
                x = combine(1.0, x, adams_weights(sigmas[i], 0.0, history.sigmas[:2]), history.directions)
            else:
                x = denoised
            continue
        order = step_order(max_order, i, run.n_steps, len(history), lower_order_final)
        x_before = x
        x = predict(frame, x, sigmas[i + 1], history, order)
    return run.finish(x)


# ----- predictors -------------------------------------------------------------------------------------------------
def dpmpp_predictor(midpoint):
    def predict(frame, x, sigma_t, history, order):
        stencil = history.sigmas[:order]
        ratio, weights = frame.finite_for(stencil).taylor_weights(stencil[0], sigma_t, stencil, midpoint)
        return combine(ratio, x, weights, history.denoised)
    return predict


def _unip_predictor(variant):
    def predict(frame, x, sigma_t, history, order):
        stencil = history.sigmas[:order]
        ratio, weights = frame.finite_for(stencil).unipc_weights(stencil[0], sigma_t, stencil, variant, False)
        return combine(ratio, x, weights, history.denoised)
    return predict


class UniC:
    """UniC corrector (Zhao et al. 2023) for `run_multistep`: order p uses the p newest outputs up to sigma_s and the
    new output m_t, raising the predictor's order by one; it never calls the model."""

    def __init__(self, order=3, variant="bh2", lower_order_final=True):
        check_int("unic_order", order, 1, 3)
        check_choice("unic_variant", variant, ("bh1", "bh2"))
        self.order, self.variant, self.lower_order_final = order, variant, lower_order_final

    def __call__(self, frame, x_s, step, sigmas, history, new_denoised, n_steps):
        order = step_order(self.order, step, n_steps, len(history), self.lower_order_final)
        stencil = history.sigmas[:order]
        ratio, weights = frame.finite_for(stencil).unipc_weights(stencil[0], sigmas[step + 1], stencil,
                                                                 self.variant, True)
        return combine(ratio, x_s, weights, history.denoised[:order] + [new_denoised])


def _deis_time(sigma):
    """DEIS tAB time tau(sigma): VP time of the linear-beta schedule fitted to EDM defaults (ComfyUI deis.py)."""
    eps_s, sigma_min, sigma_max = 1e-3, 0.002, 80.0
    beta_d = 2 * (math.log(sigma_min ** 2 + 1) / eps_s - math.log(sigma_max ** 2 + 1)) / (eps_s - 1)
    beta_min = math.log(sigma_max ** 2 + 1) - 0.5 * beta_d
    return (math.sqrt(beta_min ** 2 + 2 * beta_d * math.log(sigma ** 2 + 1)) - beta_min) / beta_d


def adams_weights(sigma_s, sigma_t, node_sigmas, time_of=None):
    """C_j = int_{sigma_s}^{sigma_t} l_j(tau(sigma)) dsigma: variable-step Adams-Bashforth weights of the
    directions d_j at node_sigmas, with the Lagrange basis l_j in the time tau (identity: rhoAB / iPNDM-v; DEIS tAB:
    `_deis_time`).  Gauss-Legendre quadrature in float64."""
    time_of = time_of or (lambda s: s)
    points, gauss_weights = _GAUSS_LEGENDRE
    half = 0.5 * (sigma_t - sigma_s)
    quad_sigmas = sigma_s + half * (points + 1.0)
    quad_taus = np.array([time_of(float(s)) for s in quad_sigmas])
    node_taus = [time_of(s) for s in node_sigmas]
    weights = []
    for j, tau_j in enumerate(node_taus):
        basis = np.ones_like(quad_taus)
        for m, tau_m in enumerate(node_taus):
            if m != j:
                basis *= (quad_taus - tau_m) / (tau_j - tau_m)
        weights.append(float(half * np.dot(gauss_weights, basis)))
    return weights


def _adams_predictor(time_of=None):
    def predict(frame, x, sigma_t, history, order):
        stencil = history.sigmas[:order]
        return combine(1.0, x, adams_weights(stencil[0], sigma_t, stencil, time_of), history.directions)
    return predict


def _ipndm_predict(frame, x, sigma_t, history, order):
    step = sigma_t - history.sigmas[0]
    return combine(1.0, x, [step * c for c in _IPNDM_COEFFICIENTS[order]], history.directions)


# ----- multistep samplers -----------------------------------------------------------------------------------------
def _check_dpmpp(order=2, solver_type="midpoint", **common):
    check_int("order", order, 1, 3)
    check_choice("solver_type", solver_type, ("midpoint", "taylor"))
    _check_common(**common)


@with_validation(_check_dpmpp)
@supports_corrector
def sample_dpmpp_multistep(model, x, sigmas, extra_args=None, callback=None, disable=None, order=2,
                           solver_type="midpoint", lower_order_final=True, corrector=None, final_step="denoised",
                           first_step="model", stats=None):
    """DPM-Solver++ multistep (data prediction), order 1-3, in the model's true log-SNR frame (Frame B)."""
    _check_dpmpp(order, solver_type, lower_order_final=lower_order_final, stats=stats, corrector=corrector,
                 final_step=final_step, first_step=first_step)
    run = Run(model, x, sigmas, extra_args, callback, disable, stats)
    return run_multistep(run, dpmpp_predictor(solver_type == "midpoint"), order, lower_order_final, corrector,
                         final_step, first_step)


@with_validation(_check_dpmpp)
@supports_corrector
def sample_dpmpp_2m(model, x, sigmas, extra_args=None, callback=None, disable=None, **options):
    """DPM-Solver++(2M)."""
    return sample_dpmpp_multistep(model, x, sigmas, extra_args, callback, disable, **{"order": 2, **options})


@with_validation(_check_dpmpp)
@supports_corrector
def sample_dpmpp_3m(model, x, sigmas, extra_args=None, callback=None, disable=None, **options):
    """DPM-Solver++(3M) (the ODE that ComfyUI only offers as dpmpp_3m_sde with eta=0)."""
    return sample_dpmpp_multistep(model, x, sigmas, extra_args, callback, disable, **{"order": 3, **options})


def _check_unipc(order=3, variant="bh2", use_corrector=True, **common):
    check_int("order", order, 1, 3)
    check_choice("variant", variant, ("bh1", "bh2"))
    check_choice("use_corrector", use_corrector, (True, False))
    _check_common(**common)


@with_validation(_check_unipc)
def sample_unipc(model, x, sigmas, extra_args=None, callback=None, disable=None, order=3, variant="bh2",
                 use_corrector=True, lower_order_final=True, final_step="denoised", first_step="model", stats=None):
    """UniPC: UniP-p predictor + UniC-p corrector (data prediction, Frame B).  The corrector reuses the next step's
    model output, so NFE = steps; it is skipped after the final step (no output comes after it)."""
    _check_unipc(order, variant, use_corrector, lower_order_final=lower_order_final, stats=stats,
                 final_step=final_step, first_step=first_step)
    run = Run(model, x, sigmas, extra_args, callback, disable, stats)
    corrector = UniC(order, variant, lower_order_final) if use_corrector else None
    return run_multistep(run, _unip_predictor(variant), order, lower_order_final, corrector, final_step, first_step)


@with_validation(_check_unipc)
def sample_unipc_bh1(model, x, sigmas, extra_args=None, callback=None, disable=None, **options):
    return sample_unipc(model, x, sigmas, extra_args, callback, disable, **{"variant": "bh1", **options})


@with_validation(_check_unipc)
def sample_unipc_bh2(model, x, sigmas, extra_args=None, callback=None, disable=None, **options):
    return sample_unipc(model, x, sigmas, extra_args, callback, disable, **{"variant": "bh2", **options})


def _check_deis(max_order=3, mode="tab", **common):
    check_int("max_order", max_order, 1, 3)
    check_choice("mode", mode, ("tab", "rhoab"))
    _check_common(**common)


@with_validation(_check_deis)
@supports_corrector
def sample_deis(model, x, sigmas, extra_args=None, callback=None, disable=None, max_order=3, mode="tab",
                lower_order_final=True, corrector=None, final_step="denoised", first_step="model", stats=None):
    """DEIS: Adams-Bashforth on d with the Lagrange polynomial in tau (tAB: ComfyUI's EDM-fitted VP time; rhoAB:
    tau = sigma)."""
    _check_deis(max_order, mode, lower_order_final=lower_order_final, stats=stats, corrector=corrector,
                final_step=final_step, first_step=first_step)
    run = Run(model, x, sigmas, extra_args, callback, disable, stats)
    predict = _adams_predictor(_deis_time if mode == "tab" else None)
    return run_multistep(run, predict, max_order, lower_order_final, corrector, final_step, first_step)


def _check_ipndm(max_order=4, **common):
    check_int("max_order", max_order, 1, 4)
    _check_common(**common)


@with_validation(_check_ipndm)
@supports_corrector
def sample_ipndm(model, x, sigmas, extra_args=None, callback=None, disable=None, max_order=4,
                 lower_order_final=True, corrector=None, final_step="denoised", first_step="model", stats=None):
    """iPNDM: fixed-coefficient Adams-Bashforth on d in sigma (meant for near-uniform steps)."""
    _check_ipndm(max_order, lower_order_final=lower_order_final, stats=stats, corrector=corrector,
                 final_step=final_step, first_step=first_step)
    run = Run(model, x, sigmas, extra_args, callback, disable, stats)
    return run_multistep(run, _ipndm_predict, max_order, lower_order_final, corrector, final_step, first_step)


@with_validation(_check_ipndm)
@supports_corrector
def sample_ipndm_v(model, x, sigmas, extra_args=None, callback=None, disable=None, max_order=4,
                   lower_order_final=True, corrector=None, final_step="denoised", first_step="model", stats=None):
    """iPNDM-v: variable-step Adams-Bashforth on d in sigma (coefficients from the actual sigma gaps)."""
    _check_ipndm(max_order, lower_order_final=lower_order_final, stats=stats, corrector=corrector,
                 final_step=final_step, first_step=first_step)
    run = Run(model, x, sigmas, extra_args, callback, disable, stats)
    return run_multistep(run, _adams_predictor(), max_order, lower_order_final, corrector, final_step, first_step)


# ================================================ singlestep solvers ================================================
def run_singlestep(run, step):
    """Each interval: D at sigma_s (reported), then `step(denoiser, frame, x, sigma_s, sigma_t, D_s)`; the final
    interval to sigma = 0 is x = D."""
    frame = frame_of(run.denoiser.model)
    sigmas, x = run.sigmas, run.x
    for i in run.steps():
        denoised = run.denoiser(x, sigmas[i])
        run.report(i, x, denoised)
        if sigmas[i + 1] == 0.0:
            x = denoised
        else:
            # a stage at flow sigma = 1 has lambda = -inf: such an interval runs in Frame A (spec 0.5)
            x = step(run.denoiser, frame.finite_for([sigmas[i]]), x, sigmas[i], sigmas[i + 1], denoised)
    return run.finish(x)


def _dpm_solver_2_step(denoiser, frame, x, sigma_s, sigma_t, denoised_s):
    """DPM-Solver-2 (noise prediction, r1 = 1/2)."""
    lam_s = frame.lam(sigma_s)
    sigma_mid = frame.sigma(0.5 * (lam_s + frame.lam(sigma_t)))
    eps_s = frame.eps(x, denoised_s, sigma_s)
    ratio, weights, _ = frame.noise_weights(sigma_s, sigma_mid, 1)
    u = ratio * x + weights[0] * eps_s
    eps_mid = frame.eps(u, denoiser(u, sigma_mid), sigma_mid)
    ratio, weights, _ = frame.noise_weights(sigma_s, sigma_t, 1)
    return ratio * x + weights[0] * eps_mid


def _dpm_solver_3_step(denoiser, frame, x, sigma_s, sigma_t, denoised_s):
    """DPM-Solver-3 (noise prediction, r1 = 1/3, r2 = 2/3); (eps_b - eps_s)/r_b estimates h*eps'."""
    r1, r2 = 1.0 / 3.0, 2.0 / 3.0
    lam_s = frame.lam(sigma_s)
    h = frame.lam(sigma_t) - lam_s
    sigma_1, sigma_2 = frame.sigma(lam_s + r1 * h), frame.sigma(lam_s + r2 * h)
    eps_s = frame.eps(x, denoised_s, sigma_s)
    ratio, weights, _ = frame.noise_weights(sigma_s, sigma_1, 1)
    u1 = ratio * x + weights[0] * eps_s
    eps_1 = frame.eps(u1, denoiser(u1, sigma_1), sigma_1)
    ratio, weights, _ = frame.noise_weights(sigma_s, sigma_2, 2)
    # over the sub-interval of length r2*h the derivative term is (r2*h) eps' = (r2/r1) (eps_1 - eps_s)
    u2 = ratio * x + weights[0] * eps_s + weights[1] * (r2 / r1) * (eps_1 - eps_s)
    eps_2 = frame.eps(u2, denoiser(u2, sigma_2), sigma_2)
    ratio, weights, _ = frame.noise_weights(sigma_s, sigma_t, 2)
    return ratio * x + weights[0] * eps_s + weights[1] * (eps_2 - eps_s) / r2


def _dpmpp_2s_step(denoiser, frame, x, sigma_s, sigma_t, denoised_s):
    """DPM-Solver++(2S) (data prediction, r = 1/2): x_t = first-order step with D at the lambda midpoint."""
    sigma_mid = frame.sigma(0.5 * (frame.lam(sigma_s) + frame.lam(sigma_t)))
    ratio, weight = frame.first_order(sigma_s, sigma_mid)
    u = ratio * x + weight * denoised_s
    ratio, weight = frame.first_order(sigma_s, sigma_t)
    return ratio * x + weight * denoiser(u, sigma_mid)


_SINGLESTEP = {"dpm_solver_2": (_dpm_solver_2_step, 2), "dpm_solver_3": (_dpm_solver_3_step, 3),
               "dpmpp_2s": (_dpmpp_2s_step, 2)}


def singlestep_nfe(sigmas, method):
    """Model calls of a singlestep sampler on this schedule: `order` per interval, 1 for a final jump to 0."""
    order = _SINGLESTEP[method][1]
    n_steps = len(sigmas) - 1
    return order * n_steps - (order - 1) * int(float(sigmas[-1]) == 0.0)


def _make_singlestep(method, doc):
    step = _SINGLESTEP[method][0]

    @with_validation(_check_common)
    def sampler(model, x, sigmas, extra_args=None, callback=None, disable=None, stats=None):
        _check_common(stats=stats)
        return run_singlestep(Run(model, x, sigmas, extra_args, callback, disable, stats), step)
    sampler.__name__ = sampler.__qualname__ = f"sample_{method}"
    sampler.__doc__ = doc + " Costs `order` NFE per interval (see singlestep_nfe)."
    return sampler


sample_dpm_solver_2 = _make_singlestep("dpm_solver_2", "DPM-Solver-2 singlestep (noise prediction, Frame B).")
sample_dpm_solver_3 = _make_singlestep("dpm_solver_3", "DPM-Solver-3 singlestep (noise prediction, Frame B).")
sample_dpmpp_2s = _make_singlestep("dpmpp_2s", "DPM-Solver++(2S) singlestep (data prediction, Frame B).")


# ================================================ slope samplers (Euler, Heun/EDM) ==================================
def _euler_slope(denoiser, x, sigma_s, sigma_t):
    """(slope, D) over [sigma_s, sigma_t]: the direction d(x, sigma_s); 1 NFE."""
    return tuple(reversed(denoiser.d(x, sigma_s)))


def _heun_slope(denoiser, x, sigma_s, sigma_t):
    """(slope, D): the trapezoid average of d at both ends (2 NFE); Euler when landing on sigma = 0."""
    denoised, direction = denoiser.d(x, sigma_s)
    if sigma_t == 0.0:
        return direction, denoised
    _, direction_t = denoiser.d(x + (sigma_t - sigma_s) * direction, sigma_t)
    return 0.5 * (direction + direction_t), denoised


def default_noise_sampler(x, seed):
    """Seeded standard-normal draws shaped like x (same role as ComfyUI's default_noise_sampler)."""
    generator = torch.Generator(device=x.device).manual_seed(int(seed))
    return lambda: torch.randn(x.shape, generator=generator, device=x.device, dtype=torch.float32).to(x.dtype)


def _check_churn(s_churn=0.0, s_tmin=0.0, s_tmax=math.inf, s_noise=1.0, noise_sampler=None, stats=None):
    check_float("s_churn", s_churn, 0.0)
    check_float("s_tmin", s_tmin, 0.0)
    if not (isinstance(s_tmax, (int, float)) and s_tmax >= s_tmin):
        raise ValueError(f"option s_tmax must be a number >= s_tmin ({s_tmin}), got {s_tmax!r}")
    check_float("s_noise", s_noise, 0.0)
    _check_common(stats=stats)


def run_slope_sampler(run, slope, s_churn, s_tmin, s_tmax, s_noise, noise_sampler):
    """EDM Algorithm 2 with a pluggable slope.  Churn raises the noise level by gamma in Frame-B VE units
    (sigma~ = sigma/alpha, so s_tmin/s_tmax are VE thresholds and flow sigma_hat stays < 1) and re-noises with the
    marginal-preserving formula of spec 0.4."""
    frame = frame_of(run.denoiser.model)
    sigmas, x = run.sigmas, run.x
    if s_churn > 0 and noise_sampler is None:
        noise_sampler = default_noise_sampler(x, run.denoiser.extra_args.get("seed", 0))
    for i in run.steps():
        sigma, sigma_hat = sigmas[i], sigmas[i]
        ve_sigma = frame.ve_sigma(sigma)
        if s_churn > 0 and s_tmin <= ve_sigma <= s_tmax and math.isfinite(ve_sigma):
            gamma = min(s_churn / run.n_steps, math.sqrt(2.0) - 1.0)
            sigma_hat = frame.from_ve_sigma(ve_sigma * (1.0 + gamma))
            x = frame.renoise(x, sigma, sigma_hat, s_noise * noise_sampler())
        direction, denoised = slope(run.denoiser, x, sigma_hat, sigmas[i + 1])
        run.report(i, x, denoised, sigma, sigma_hat)
        x = x + (sigmas[i + 1] - sigma_hat) * direction
    return run.finish(x)


def _make_slope_sampler(name, slope, doc):
    @with_validation(_check_churn)
    def sampler(model, x, sigmas, extra_args=None, callback=None, disable=None, s_churn=0.0, s_tmin=0.0,
                s_tmax=math.inf, s_noise=1.0, noise_sampler=None, stats=None):
        _check_churn(s_churn, s_tmin, s_tmax, s_noise, noise_sampler, stats)
        run = Run(model, x, sigmas, extra_args, callback, disable, stats)
        return run_slope_sampler(run, slope, s_churn, s_tmin, s_tmax, s_noise, noise_sampler)
    sampler.__name__ = sampler.__qualname__ = f"sample_{name}"
    sampler.__doc__ = doc
    sampler.interval_slope = slope    # the per-interval direction that PFDiff reuses
    return sampler


sample_euler = _make_slope_sampler("euler", _euler_slope, "Euler in sigma (= DDIM), optional churn; 1 NFE/step.")
sample_heun = _make_slope_sampler("heun", _heun_slope,
                                  "Heun / EDM Algorithm 2 with CONST-correct churn; 2 NFE/step, 1 on the last jump "
                                  "to 0.")
