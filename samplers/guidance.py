"""Restoration guidance samplers (spec group 5) in the k-diffusion convention, with no gradient through the network.

    fn(model, x, sigmas, extra_args=None, callback=None, disable=None, operator=..., measurement=..., **options)

`model(x, sigma * s_in, **extra_args)` returns the denoised x0; `operator` is a samplers.operators.LinearOperator
acting on the sampler's own state space (pixel-space models: the image itself) and `measurement` is y = A x + n.

Methods (all need A^+ in closed form; none back-propagates through the denoiser, so they run under the host's
torch.inference_mode with no autograd, cost one model call per step and keep no graph):

  ddnm     DDNM / DDNM+ (range-null-space decomposition).  Each step replaces the range-space part of the x0
           estimate by the measurement, x0' = x0 + lambda * A^+(y - A x0), then takes a DDIM-eta step whose
           direction is recomputed from x0'.  With sigma_y > 0 (the operator's noise level) lambda and the fresh
           noise gamma follow DDNM+: c = DDIM-eta noise std, a = x0-coefficient of the step;
           c >= a sigma_y: lambda = 1, gamma^2 = c^2 - (a sigma_y)^2;  else lambda = c / (a sigma_y), gamma = 0.
           sigma_y here is the noise std of A^+ y: the operator's sigma_y times the largest gain of A^+
           (`pinv_noise_gain`: 1 for masks, SR and grayscale; 1/cutoff for the blur, a conservative bound).
  repaint  RePaint-style projection of the *state*: an ancestral (eta) step for the whole image, then the range
           component A^+A of the new state is replaced by the forward-noised measurement A^+y + sigma' z (for a
           mask that is exactly RePaint's known-region blend; for SR/blur it is CCDF's data-consistency step).

Both accept time travel / RePaint resampling: after every `jump_length` steps the state is re-noised back up
`jump_length` steps (marginal-preserving, spec 0.4) and those steps are redone, `resample_count` times in all
(resample_count = 1: no travel).  NFE = steps * resample_count (roughly).

CCDF = any of these started from the forward-diffused pseudo-inverse at a level t0 (`ccdf_start`): in a graph, the
pseudo-inverse latent from the restoration nodes plus a scheduler with denoise = t0.

DPS and PiGDM need a vector-Jacobian product through the denoiser (or the "Jacobian = identity" approximation, which
for PiGDM reduces to a partial DDNM correction); they are not implemented here.

Frames: the update is written in the VE variables of the model's own frame (x_ve = x / alpha(sigma), sigma_ve =
sigma / alpha), so eps/v models (alpha = 1) and flow models (alpha = 1 - sigma) share one code path; a flow start at
sigma = 1 (sigma_ve = inf) is handled by its limit.  A non-finite state stops the run with a GuidanceDiverged error
naming the method and the step.
"""
import math

import torch

from .common import check_choice, check_float, check_int
from .frame import frame_of
from .operators import LinearOperator, OperatorError

METHODS = ("ddnm", "repaint")
METHOD_LABELS = {"ddnm": "DDNM+", "repaint": "RePaint"}


class GuidanceDiverged(FloatingPointError):
    pass


def validate(operator=None, measurement=None, method="ddnm", eta=0.85, jump_length=1, resample_count=1, seed=None):
    if not isinstance(operator, LinearOperator):
        raise ValueError(f"option operator must be a Quickstep degradation operator, got {type(operator).__name__}")
    if not torch.is_tensor(measurement) or measurement.dim() != 4:
        raise ValueError("option measurement must be a [B, C, H, W] tensor, got "
                         f"{getattr(measurement, 'shape', type(measurement).__name__)}")
    if not torch.isfinite(measurement).all():
        raise ValueError("option measurement holds NaN or inf values")
    check_choice("method", method, METHODS)
    if not operator.has_pinv:
        raise ValueError(f"method {method} needs a pseudo-inverse, and the operator {operator.name} has none")
    check_float("eta", eta, 0.0, 1.0)
    check_int("jump_length", jump_length, 1, 1000)
    check_int("resample_count", resample_count, 1, 100)


def travel_plan(n_steps, jump_length=1, resample_count=1):
    """The sequence of moves: ("step", i) takes step i (sigmas[i] -> sigmas[i+1]); ("renoise", a, b) re-noises the
    state from sigmas[a] back up to sigmas[b] (a > b)."""
    plan, start = [], 0
    while start < n_steps:
        end = min(start + jump_length, n_steps)
        for repeat in range(resample_count):
            plan.extend(("step", i) for i in range(start, end))
            if repeat < resample_count - 1:
                plan.append(("renoise", end, start))
        start = end
    return plan


def _ve(frame, sigma):
    return frame.ve_sigma(sigma) if sigma < 1.0 or not frame.flow else math.inf


def sample_restoration(model, x, sigmas, extra_args=None, callback=None, disable=None, operator=None,
                       measurement=None, method="ddnm", eta=0.85, jump_length=1, resample_count=1, seed=None):
    extra_args = {} if extra_args is None else extra_args
    label = METHOD_LABELS.get(method, method)
    operator.check_measurement(tuple(measurement.shape), tuple(x.shape))
    y = measurement.to(device=x.device, dtype=x.dtype)
    if y.shape[0] != x.shape[0]:
        y = y.expand(x.shape[0], *y.shape[1:])
    frame = frame_of(model)
    # the noise A^+ y carries: sigma_y times A^+'s largest gain (1 for masks, block averages, grayscale)
    sigma_y = operator.sigma_y * operator.pinv_noise_gain
    y_pinv = operator.pinv(y)
    seed = extra_args.get("seed", 0) if seed is None else seed
    generator = torch.Generator(device=x.device).manual_seed(int(seed) + 7919)

    def noise():
        return torch.randn(x.shape, generator=generator, device=x.device, dtype=torch.float32).to(x.dtype)

    s_in = x.new_ones([x.shape[0]])
    sig = [float(s) for s in sigmas]

    plan = travel_plan(len(sig) - 1, jump_length, resample_count)
    for move_index, move in enumerate(plan):
        if move[0] == "renoise":
            _, a, b = move
            x = frame.renoise(x, sig[a], sig[b], noise())
            continue
        i = move[1]
        sigma, sigma_next = sig[i], sig[i + 1]
        x0 = model(x, sigma * s_in, **extra_args)
        s, n = _ve(frame, sigma), _ve(frame, sigma_next)
        ratio = 0.0 if math.isinf(s) else n / s
        c = eta * n * math.sqrt(max(1.0 - ratio ** 2, 0.0))          # DDIM-eta noise std (VE)
        keep = math.sqrt(max(n ** 2 - c ** 2, 0.0))                    # coefficient of eps in the step
        a = 1.0 - (0.0 if math.isinf(s) else keep / s)                 # coefficient of x0 (VE: x = x0 + s eps)
        alpha, alpha_next = frame.alpha(sigma), frame.alpha(sigma_next)
        if method == "ddnm":
            if sigma_y > 0 and c < a * sigma_y:
                lam, gamma = c / (a * sigma_y), 0.0
            else:
                lam, gamma = 1.0, math.sqrt(max(c ** 2 - (a * sigma_y) ** 2, 0.0))
            x0 = x0 + lam * operator.pinv(y - operator.forward(x0))
            eps = (x - alpha * x0) / sigma
            x_ve = x0 + keep * eps + (gamma * noise() if gamma > 0 else 0.0)
        else:
            eps = (x - alpha * x0) / sigma
            x_ve = x0 + keep * eps + (c * noise() if c > 0 else 0.0)
            known = y_pinv + n * noise() if n > 0 else y_pinv
            x_ve = x_ve + operator.pinv(operator.forward(known) - operator.forward(x_ve))
        x = alpha_next * x_ve if sigma_next > 0 else x_ve
        if not torch.isfinite(x).all():
            raise GuidanceDiverged(f"{label} guidance diverged at step {i} (sigma {sigma:.4g} -> {sigma_next:.4g}, "
                                   f"move {move_index + 1} of {len(plan)}): the state holds NaN/inf; check the "
                                   f"measurement scale and the operator, or lower eta / sigma_y")
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": x0})
    return x


sample_restoration.validate = validate


def ccdf_sigmas(sigmas, t0):
    """CCDF: the tail of a full schedule holding the last round(t0 * steps) steps (at least one)."""
    if not (0.0 < t0 <= 1.0):
        raise ValueError(f"t0 = {t0!r} must be in (0, 1]")
    steps = len(sigmas) - 1
    keep = max(1, round(t0 * steps))
    return sigmas[steps - keep:]


def ccdf_start(operator, measurement, sigmas, t0, noise, flow=False):
    """CCDF start: (x_start, tail sigmas).  x_start is the pseudo-inverse restoration A^+ y forward-diffused to the
    first sigma of the tail: alpha * A^+ y + sigma * noise (noise shaped like the image)."""
    tail = ccdf_sigmas(sigmas, t0)
    estimate = operator.pinv(measurement)
    sigma = float(tail[0])
    alpha = 1.0 - sigma if flow else 1.0
    return alpha * estimate + sigma * noise.to(estimate), tail


__all__ = ["METHODS", "GuidanceDiverged", "OperatorError", "sample_restoration", "travel_plan", "ccdf_sigmas",
           "ccdf_start", "validate"]
