"""Shared sampler plumbing: the counted model call, sigma/option validation, order warm-up, progress and stats."""
import math

import torch

try:
    from tqdm.auto import trange
except ImportError:     # tqdm ships with ComfyUI; plain range keeps samplers/ usable without it
    def trange(n, disable=None):
        return range(n)

LOWER_ORDER_FINAL_BELOW = 10   # official DPM-Solver: lower the order near the end only for fewer steps than this


def validate_sigmas(sigmas):
    """Raise ValueError unless sigmas is a 1-D, finite, non-negative, strictly decreasing list of >= 2 values."""
    sigmas = torch.as_tensor(sigmas)
    if sigmas.dim() != 1:
        raise ValueError(f"sigmas must be 1-D, got shape {tuple(sigmas.shape)}")
    if sigmas.numel() < 2:
        raise ValueError(f"sigmas needs at least 2 values (one step), got {sigmas.numel()}")
    values = sigmas.double()
    if not torch.isfinite(values).all():
        raise ValueError(f"sigmas must be finite, got {values.tolist()}")
    if (values < 0).any():
        raise ValueError(f"sigmas must be non-negative, got {values.tolist()}")
    if not (values[1:] < values[:-1]).all():
        raise ValueError(f"sigmas must be strictly decreasing, got {values.tolist()}")


def check_int(name, value, low, high):
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"option {name} must be an integer in [{low}, {high}], got {value!r}")


def check_float(name, value, low=-math.inf, high=math.inf, low_open=False):
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low) and value <= high
    if not ok:
        bound = f"({low}, {high}]" if low_open else f"[{low}, {high}]"
        raise ValueError(f"option {name} must be a finite number in {bound}, got {value!r}")


def check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"option {name} must be one of {sorted(choices)}, got {value!r}")


def step_order(max_order, step, n_steps, available, lower_order_final):
    """Order of step `step` (0-based): capped by the usable history (warm-up) and, for short runs, by the steps
    left (lower_order_final)."""
    order = min(max_order, available)
    if lower_order_final and n_steps < LOWER_ORDER_FINAL_BELOW:
        order = min(order, n_steps - step)
    return max(order, 1)


class Denoiser:
    """The sampler's view of the model: D(x, sigma) in the state dtype, one call = one NFE.

    `sigma` is a float (broadcast over the batch) or a 1-D tensor with one sigma per batch element.
    """

    def __init__(self, model, extra_args):
        self.model = model
        self.extra_args = {} if extra_args is None else extra_args
        self.nfe = 0

    def __call__(self, x, sigma):
        if not torch.is_tensor(sigma):
            sigma = x.new_full((x.shape[0],), float(sigma))
        self.nfe += 1
        # fp16/bf16 models return low-precision outputs; the state and all arithmetic stay in x's dtype (fp32)
        return self.model(x, sigma, **self.extra_args).to(x.dtype)

    def d(self, x, sigma):
        """(D, d) with d = (x - D)/sigma, the ODE direction dx/dsigma (ComfyUI `to_d`)."""
        denoised = self(x, sigma)
        return denoised, (x - denoised) / sigma


class Run:
    """Per-call set-up shared by every sampler: fp32 state, python-float sigmas, counted model, callback, stats."""

    def __init__(self, model, x, sigmas, extra_args, callback, disable, stats):
        validate_sigmas(sigmas)
        self.input_dtype = x.dtype
        self.x = x.to(torch.promote_types(x.dtype, torch.float32))
        sigmas = torch.as_tensor(sigmas).double()
        # Sigmas that require grad stay 0-dim tensors (frame.py's algebra takes both): the schedule optimizers
        # back-propagate through the sampler itself.
        self.sigmas = list(sigmas.unbind()) if sigmas.requires_grad else [float(s) for s in sigmas]
        self.n_steps = len(self.sigmas) - 1
        self.denoiser = Denoiser(model, extra_args)
        self.callback = callback
        self.disable = disable
        self.stats = stats

    def steps(self):
        return trange(self.n_steps, disable=self.disable)

    def report(self, i, x, denoised, sigma=None, sigma_hat=None):
        if self.callback is not None:
            sigma = self.sigmas[i] if sigma is None else sigma
            sigma_hat = sigma if sigma_hat is None else sigma_hat
            self.callback({"x": x, "i": i, "sigma": torch.tensor(sigma), "sigma_hat": torch.tensor(sigma_hat),
                           "denoised": denoised})

    def finish(self, x, **extra_stats):
        if self.stats is not None:
            self.stats.update(nfe=self.denoiser.nfe, steps=self.n_steps, **extra_stats)
        return x.to(self.input_dtype)
