"""The one place for exponential-integrator algebra: alpha(sigma), half log-SNR lambda(sigma), its inverse, phi
functions and the step weights every exponential integrator (DPM-Solver family, UniPC/UniC) uses.

Two frames (spec 0.3).  Frame B (true log-SNR) is the model's own: alpha = 1 for EPS/V models (VE-scaled state
x = x0 + sigma*eps) and alpha = 1 - sigma for CONST (flow) models (x = (1-sigma)*x0 + sigma*eps).  Frame A treats
every model as VE (alpha = 1, lambda = -log sigma); it integrates the same ODE dx/dsigma = (x - D)/sigma exactly
in variation-of-constants form, so it is a valid frame for flow models too.  lambda is -inf at sigma = 1 on a flow
model; a step whose stencil touches such a sigma is taken in Frame A (`Frame.finite_for`), the second option of
spec 0.5, which keeps the model call at the true sigma = 1 (no offset).

Every update is written as  x_t = ratio * x_s + sum_j weight_j * D_j  (data prediction) with scalar weights
computed here in float64 (python floats) and applied by the caller in the state dtype (fp32).  The sigmas may also
be 0-dim float64 tensors: the weights are then tensors differentiable in the sigmas, which is how the schedule
optimizers back-propagate through the very samplers that run (samplers/schedules.py `sample_ode`).
"""
import math

import numpy as np
import torch

_SERIES_BELOW = 0.5     # |z| under which phi_k(z) is summed as a power series (the recurrence cancels there)
_SERIES_TERMS = 30


def _math(value):
    """The function namespace for a python float (math) or a tensor (torch): one formula serves both."""
    return torch if torch.is_tensor(value) else math


def phi(k, z):
    """phi_k(z) = sum_{j>=0} z^j / (j+k)!  (phi_0 = e^z, phi_{k+1}(z) = (phi_k(z) - 1/k!) / z), float64.

    z may be -inf (lambda step h = +inf): phi_k(-inf) = 0 for every k >= 0.
    """
    if z == -math.inf:
        return 0.0
    if abs(z) < _SERIES_BELOW:
        return sum(z ** j / float(math.factorial(j + k)) for j in range(_SERIES_TERMS))
    if k == 0:
        return _math(z).exp(z)
    value = _math(z).expm1(z) / z                     # phi_1 in its expm1 form
    for m in range(1, k):
        value = (value - 1.0 / math.factorial(m)) / z
    return value


def data_kernel(k, h):
    """c_k(h) = h * phi_{k+1}(-h): the weight of h^k D^(k)(lambda_s) in the exact data-prediction integral.

    sigma_t * int_{lambda_s}^{lambda_t} e^lambda (lambda - lambda_s)^k / k! dlambda = alpha_t * h^k * c_k(h).
    c_0(h) = 1 - e^{-h}; at h = +inf (a step that lands on sigma = 0 or starts at flow sigma = 1), c_k = 1/k!.
    """
    if h == math.inf:
        return 1.0 / math.factorial(k)
    return h * phi(k + 1, -h)


class Frame:
    """alpha / lambda algebra of one frame.  `flow=True` is Frame B of a CONST model; `flow=False` is VE (EPS/V
    models in either frame, and Frame A of a flow model)."""

    def __init__(self, flow):
        self.flow = bool(flow)

    def __repr__(self):
        return f"Frame(flow={self.flow})"

    def alpha(self, sigma):
        return 1.0 - sigma if self.flow else 1.0

    def lam(self, sigma):
        """Half log-SNR log(alpha/sigma); +inf at sigma = 0, -inf at sigma = 1 for flow."""
        if sigma <= 0.0:
            return math.inf
        alpha = self.alpha(sigma)
        if alpha <= 0.0:
            return -math.inf
        return _math(sigma).log(alpha / sigma)

    def sigma(self, lam):
        """Inverse of `lam`: exp(-lambda) for VE, sigmoid(-lambda) for flow."""
        if lam == math.inf:
            return 0.0
        if self.flow:
            return 1.0 / (1.0 + _math(lam).exp(lam))
        return _math(lam).exp(-lam)

    def finite_for(self, sigmas):
        """This frame when lambda is finite at every positive sigma of a step's stencil, else Frame A."""
        if self.flow and any(s >= 1.0 for s in sigmas):
            return VE_FRAME
        return self

    # ----- data-prediction (DPM-Solver++ / UniPC) weights -------------------------------------------------------
    def first_order(self, sigma_s, sigma_t):
        """(ratio, weight) of the DDIM step x_t = ratio*x_s + weight*D(x_s); exact limits at sigma_t = 0 (x = D)
        and flow sigma_s = 1 (h = inf)."""
        h = self.lam(sigma_t) - self.lam(sigma_s)
        return sigma_t / sigma_s, self.alpha(sigma_t) * data_kernel(0, h)

    def taylor_weights(self, sigma_s, sigma_t, history_sigmas, midpoint=False):
        """Multistep data-prediction step of order p = len(history_sigmas) (DPM-Solver++ pM, Taylor form).

        history_sigmas[0] = sigma_s, then older sigmas.  The polynomial through (lambda_j, D_j) is expanded at
        lambda_s and integrated exactly against e^lambda.  Returns (ratio, weights over the history D's).
        `midpoint=True` uses the official 2M "midpoint" coefficient c_0/2 for the first-derivative term.
        """
        ratio, _ = self.first_order(sigma_s, sigma_t)
        lam_s, alpha_t = self.lam(sigma_s), self.alpha(sigma_t)
        h = self.lam(sigma_t) - lam_s
        order = len(history_sigmas)
        if order == 1 or h == math.inf:
            return ratio, [alpha_t * data_kernel(0, h)] + [0.0] * (order - 1)
        kernels = [data_kernel(k, h) * math.factorial(k) for k in range(order)]
        if midpoint and order == 2:
            kernels[1] = 0.5 * data_kernel(0, h)
        # Taylor coefficients a_k (P(tau) = sum a_k tau^k, so h^k D^(k) = k! a_k) are inverse-Vandermonde rows;
        # float64 torch either way, so tensor sigmas keep their gradient.
        taus = _stack([(self.lam(s) - lam_s) / h for s in history_sigmas])
        inv_vandermonde = torch.linalg.inv(torch.stack([taus ** k for k in range(order)], 1))
        weights = alpha_t * (_stack(kernels) @ inv_vandermonde)
        if torch.is_tensor(h):
            return ratio, list(weights.unbind())
        return ratio, [float(w) for w in weights]

    def unipc_weights(self, sigma_s, sigma_t, history_sigmas, variant, corrector):
        """UniP (predictor) or UniC (corrector) step of order p = len(history_sigmas), B(h) variant bh1/bh2.

        history_sigmas[0] = sigma_s, then older ones.  Returns (ratio, weights): weights cover the history D's and,
        for the corrector, a last weight for the new output m_t = D(x_t^P, sigma_t).  Follows UniPC's
        R rho = b system (Zhao et al. 2023); g_i = hh*phi_{i+1}(hh) replaces the cancelling recurrence.
        """
        ratio, weight_0 = self.first_order(sigma_s, sigma_t)
        lam_s, alpha_t = self.lam(sigma_s), self.alpha(sigma_t)
        h = self.lam(sigma_t) - lam_s
        order = len(history_sigmas)
        n_points = order + 1 if corrector else order
        weights = [weight_0] + [0.0] * (n_points - 1)
        if (order == 1 and not corrector) or h == math.inf:
            return ratio, weights
        hh = -h
        b_of_h = hh if variant == "bh1" else math.expm1(hh)
        rks = [(self.lam(s) - lam_s) / h for s in history_sigmas[1:]] + ([1.0] if corrector else [])
        size = len(rks)
        b = np.array([hh * phi(i + 1, hh) * math.factorial(i) / b_of_h for i in range(1, size + 1)])
        if size == 1 and (corrector or order == 2):
            rhos = np.array([0.5])                 # UniPC's fixed rho for p = 1 (UniC) and p = 2 (UniP)
        else:
            vandermonde = np.array([[rk ** (i - 1) for rk in rks] for i in range(1, size + 1)])
            rhos = np.linalg.solve(vandermonde, b)
        # x_t = x_base - alpha_t B(h) sum_k rho_k (m_k - m_0) / r_k, with m_k the point at relative lambda r_k.
        for k, (rho, rk) in enumerate(zip(rhos, rks)):
            coefficient = -alpha_t * b_of_h * float(rho) / rk
            weights[k + 1] += coefficient
            weights[0] -= coefficient
        return ratio, weights

    # ----- noise-prediction (DPM-Solver) helpers -----------------------------------------------------------------
    def noise_weights(self, sigma_s, sigma_t, n_terms):
        """(ratio, weights, h) of  x_t = ratio*x_s + sum_k weight_k * h^k eps^(k)(lambda_s)  (noise prediction):
        the exact integral -sigma_t int e^{-lambda} eps dlambda of the Taylor terms, weight_k = -sigma_t h phi_{k+1}(h).
        Needs finite lambdas (use `finite_for`) and sigma_t > 0."""
        h = self.lam(sigma_t) - self.lam(sigma_s)
        weights = [-sigma_t * h * phi(k + 1, h) for k in range(n_terms)]
        return self.alpha(sigma_t) / self.alpha(sigma_s), weights, h

    def eps(self, x, denoised, sigma):
        """Noise prediction eps = (x - alpha D)/sigma (the ComfyUI `d` in Frame A)."""
        return (x - self.alpha(sigma) * denoised) / sigma

    # ----- forward re-noising -------------------------------------------------------------------------------------
    def renoise(self, x, sigma_from, sigma_to, noise):
        """Move a state at sigma_from to the higher level sigma_to, preserving the marginal (spec 0.4)."""
        scale = self.alpha(sigma_to) / self.alpha(sigma_from)
        variance = sigma_to ** 2 - (scale * sigma_from) ** 2
        return scale * x + math.sqrt(max(variance, 0.0)) * noise

    def ve_sigma(self, sigma):
        """sigma~ = sigma/alpha, the VE noise level of Frame B (used for thresholds taken from VE papers)."""
        if not self.flow:
            return sigma
        return sigma / self.alpha(sigma) if sigma < 1.0 else math.inf

    def from_ve_sigma(self, ve_sigma):
        return ve_sigma / (1.0 + ve_sigma) if self.flow else ve_sigma


VE_FRAME = Frame(flow=False)


def _stack(values):
    return torch.stack([torch.as_tensor(v, dtype=torch.float64) for v in values])


def model_sampling_of(model):
    """The host's model_sampling object, found as ComfyUI's own samplers do; None outside the host."""
    patcher = getattr(getattr(model, "inner_model", None), "model_patcher", None)
    get_model_object = getattr(patcher, "get_model_object", None)
    if get_model_object is None:
        return None
    try:
        return get_model_object("model_sampling")
    except (AttributeError, KeyError):
        return None


def is_flow(model_sampling):
    """Duck-typed isinstance(model_sampling, comfy.model_sampling.CONST): samplers/ cannot import comfy."""
    return model_sampling is not None and any(cls.__name__ == "CONST" for cls in type(model_sampling).__mro__)


def frame_of(model):
    """Frame B of the model: its own `frame` attribute where it has one (a plain-torch denoiser wrapped by the
    optimizers, which have no host model_sampling), else from the host's model_sampling (VE when none is found)."""
    own = getattr(model, "frame", None)
    if isinstance(own, Frame):
        return own
    return Frame(flow=is_flow(model_sampling_of(model)))
