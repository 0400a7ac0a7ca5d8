"""Restoration guidance samplers (spec group 5) in the k-diffusion convention.

    fn(model, x, sigmas, extra_args=None, callback=None, disable=None, operator=..., measurement=..., **options)

`model(x, sigma * s_in, **extra_args)` returns the denoised x0; `operator` is a samplers.operators.Operator and
`measurement` is y = A(x) + n.  Without a `decoder` the operator acts on the sampler's own state space (pixel-space
models: the image itself).  With a `decoder` (a differentiable map latent -> pixels in [-1, 1], e.g. TAESD) the
operator acts on the decoded image: y = A(Dec(x0)) + n; only the gradient methods accept one.

Methods and what one step costs:

  ddnm     DDNM / DDNM+ (range-null-space).  x0' = x0 + lambda * A^+(y - A x0), then a DDIM-eta step from x0'.  With
           sigma_y > 0, lambda and the fresh noise gamma follow DDNM+ (c = DDIM-eta noise std, a = x0-coefficient
           of the step): c >= a sigma_y: lambda = 1, gamma^2 = c^2 - (a sigma_y)^2; else lambda = c / (a sigma_y),
           gamma = 0.  sigma_y here is the noise std of A^+ y: the operator's sigma_y times A^+'s largest gain.
           One model call, no autograd.
  diffpir  DiffPIR (Zhu et al. 2023, half-quadratic splitting): the data proximal step in closed form,
           x0' = argmin_z ||y - A z||^2 / sigma_y^2 + lambda ||z - x0||^2 / s^2 = x0 + A^T (A A^T + rho I)^{-1}
           (y - A x0), rho = lambda sigma_y^2 / s^2 (the operator's gram_solve; sigma_y = 0 gives the projection
           x0 + A^+(y - A x0)), then x' = x0' + s' (sqrt(1 - zeta) eps' + sqrt(zeta) z), eps' = (x - x0') / s the
           noise implied by x0' and z fresh noise.  lambda here is in one unit system; the reference code measures
           sigma_y on [0, 1] images and s on [-1, 1], so its lambda = 1 is lambda = 0.25 here.  Unlike the reference
           code, the data step is also taken on the last step (exact consistency for sigma_y = 0).  Known weakness:
           with sigma_y > 0 and an operator whose spectrum nears 0 (Gaussian blur) rho is tiny at high noise and the
           step amplifies the measurement noise up to 1 / (2 sqrt(rho)): measured 6.2 dB on noisy deblurring of the
           digits, where the truncated pseudo-inverse gives 16.6.  One model call, no autograd.
  repaint  RePaint-style projection of the *state*: an ancestral (eta) step, then the range component A^+A of the
           new state is replaced by the forward-noised measurement A^+y + sigma' z (for a mask: RePaint's blend; for
           SR/blur: CCDF's data-consistency step).  One model call, no autograd.
  pigdm    PiGDM with p(x0 | x) ~ N(x0_hat, r^2 I), r^2 = s^2 / (1 + s^2) (s the VE sigma): a DDIM-eta step from
           x0_hat, then x' += w r^2 J^T A^T (r^2 A A^T + sigma_y^2 I)^{-1} (y - A x0_hat), J = dx0_hat/dx_ve by
           one vector-Jacobian product through the denoiser (and the decoder).  Without noise the vector is
           J^T A^+ (y - A x0_hat): NVlabs' noiseless form, whose VP weight sqrt(abar_s abar_t) w is w in the VE
           frame.  (The full Tweedie weight s^2 instead of r^2 overshoots: a trained eps network's Jacobian at
           high noise is far from the Gaussian prior's r^2 / s^2, measured 0.86 at s = 14.6 on the digit model.)
           One model call + one backward pass.
  dps      DPS: an ancestral (eta) step from x0, then x' -= zeta_VE grad_x ||y - A(x0(x))|| (unsquared norm per
           image), zeta_VE = zeta sqrt((1 + s^2)(1 + s'^2)) (the VP-paper step converted to the VE frame).  Works
           with nonlinear A (JPEG).  One model call + one backward pass.
  daps     DAPS (Zhang et al. 2024, "Improving diffusion inverse problem solving with decoupled noise annealing"):
           each step decouples the state from the last one.  x0_hat = D(x, s) (one model call: the one-step
           ODE solve); then a sample x0_y of p(x0 | x0_hat, y) ~ N(x0; x0_hat, r^2 I) N(y; A x0, tau^2 I); then
           x' = x0_y + s' z (fresh noise: x' does not remember x).  r^2 = s^2 / (1 + s^2 / c^2), c = DAPS_PRIOR_STD
           (the paper's r = s, bounded by the data's scale c so that a flow start at s = inf stays finite);
           tau = max(sigma_y, DAPS_TAU).  For a linear operator without a decoder the Gaussian step is sampled
           exactly (Matheron's rule: z = x0_hat + r e1, x0_y = z + r^2 A^T (r^2 A A^T + tau^2 I)^{-1}
           (y + tau e2 - A z), the operator's gram_solve) instead of the paper's Langevin chain; otherwise
           (JPEG, a decoder) `daps_langevin_steps` Langevin steps on U = ||y - A(Dec(x0))||^2 / (2 tau^2)
           + ||x0 - x0_hat||^2 / (2 r^2), step `strength` * 0.5 min(tau^2 / ||J||^2, r^2) per image, ||J|| the
           gain of x0 -> A(Dec(x0)) of that image at x0_hat (power iteration, tracked from step to step; back-
           propagating through A and the decoder only).
           The last step returns the posterior mean (no sampling noise: what PSNR rewards).  One model call per
           step, no autograd through the model.
  reddiff  RED-diff: Adam on an image mu (init A^+ y; y itself for JPEG; the first denoised estimate with a
           decoder) over the descending sigmas: L = 1/2 mean(||y - A(mu)||^2)
           + lambda s mean(sg(eps_hat - eps) * mu), eps_hat from x = mu + s eps.  One model call, the backward
           pass only through A (and the decoder): never through the denoiser.  Returns mu.

`strength` multiplies each method's own strength (DPS zeta = DPS_ZETA, PiGDM w = 1, RED-diff lambda = 0.25); it is
ignored by ddnm and repaint.  Gradient methods run under torch.inference_mode(False) + enable_grad (the host runs
nodes in inference mode, spec 0.5): the state is cloned into a normal tensor each step and the graph is freed after
the step's backward pass, so memory does not grow with the step count.

`particles` = K > 1 (every method) runs K chains side by side in the batch (the extra ones from fresh noise at the
first sigma) and returns the mean of their results: an estimate of E[x0 | y], the PSNR-optimal answer, where one
chain gives one sample of a posterior that is wide when much is unknown (half a digit); each step then costs K model
evaluations per image (the host batches them), so at a fixed budget each chain gets 1/K of the steps.

Step methods accept time travel / RePaint resampling: after every `jump_length` steps the state is re-noised back up
`jump_length` steps (marginal-preserving, spec 0.4) and those steps are redone, `resample_count` times in all.

CCDF = any of these started from the forward-diffused pseudo-inverse at a level t0 (`ccdf_start`): in a graph, the
pseudo-inverse latent plus a scheduler with denoise = t0.

Frames: updates are written in the VE variables of the model's own frame (x_ve = x / alpha(sigma), s = sigma / alpha)
so eps/v and flow models share one path; a flow start at sigma = 1 (s = inf) is handled by its limit (the gradient
methods skip guidance there: the denoised estimate at pure noise does not depend on x).  A non-finite state,
denoised estimate or guidance gradient stops the run with GuidanceDiverged naming the method, the step and sigma.
"""
import contextlib
import math

import torch

from .common import check_choice, check_float, check_int
from .frame import frame_of
from .operators import Inpaint, LinearOperator, Operator, OperatorError

METHODS = ("ddnm", "diffpir", "repaint", "pigdm", "dps", "reddiff", "daps")
METHOD_LABELS = {"ddnm": "DDNM+", "diffpir": "DiffPIR", "repaint": "RePaint", "pigdm": "PiGDM", "dps": "DPS",
                 "reddiff": "RED-diff", "daps": "DAPS"}
NEEDS_PINV = ("ddnm", "diffpir", "repaint", "pigdm")
ACCEPTS_DECODER = ("pigdm", "dps", "reddiff", "daps")
DPS_ZETA = 3.0          # tuned on the digit model at 30 ancestral steps (the paper's 0.3-1.0 is for 1000 steps)
DIVERGED_RMS = 1e3      # a VE state whose RMS exceeds this plus 10 sigma has left any image's range: guidance blew up
REDDIFF_LAMBDA = 0.25
REDDIFF_LR = 0.1
DIFFPIR_LAMBDA = 0.25   # the reference code's lambda = 1 (its sigma_y on [0, 1] images: 1/4 of this unit system's)
DIFFPIR_ZETA = 0.3      # the reference configs use 0.1-0.25 (SR, deblur) and 1.0 (inpainting)
DAPS_TAU = 0.01         # the reference configs' tau (likelihood std floor: y is trusted to this much)
DAPS_PRIOR_STD = 1.0    # c in r^2 = s^2 / (1 + s^2 / c^2): the spread of p(x0 | x) at high noise, data units
DAPS_LANGEVIN_STEPS = 20


class GuidanceDiverged(FloatingPointError):
    pass


def validate(operator=None, measurement=None, method="ddnm", eta=0.85, jump_length=1, resample_count=1, seed=None,
             strength=1.0, learning_rate=REDDIFF_LR, decoder=None, diffpir_lambda=DIFFPIR_LAMBDA,
             diffpir_zeta=DIFFPIR_ZETA, daps_tau=DAPS_TAU, daps_prior_std=DAPS_PRIOR_STD,
             daps_langevin_steps=DAPS_LANGEVIN_STEPS, particles=1):
    if not isinstance(operator, Operator):
        raise ValueError(f"option operator must be a Quickstep degradation operator, got {type(operator).__name__}")
    if not torch.is_tensor(measurement) or measurement.dim() != 4:
        raise ValueError("option measurement must be a [B, C, H, W] tensor, got "
                         f"{getattr(measurement, 'shape', type(measurement).__name__)}")
    if not torch.isfinite(measurement).all():
        raise ValueError("option measurement holds NaN or inf values")
    check_choice("method", method, METHODS)
    if method in NEEDS_PINV and not (isinstance(operator, LinearOperator) and operator.has_pinv):
        raise ValueError(f"method {method} needs a pseudo-inverse, and the operator {operator.name} has none "
                         f"(use dps or reddiff)")
    if decoder is not None and method not in ACCEPTS_DECODER:
        raise ValueError(f"method {method} works on the latent itself and cannot use a VAE decoder; use one of "
                         f"{', '.join(ACCEPTS_DECODER)} with a decoder, or no decoder (a latent-space operator)")
    if decoder is not None and not callable(decoder):
        raise ValueError(f"option decoder must be callable, got {type(decoder).__name__}")
    check_float("eta", eta, 0.0, 1.0)
    check_int("jump_length", jump_length, 1, 1000)
    check_int("resample_count", resample_count, 1, 100)
    check_float("strength", strength, 0.0, 1000.0)
    check_float("learning_rate", learning_rate, 0.0, 10.0, low_open=True)
    check_float("diffpir_lambda", diffpir_lambda, 0.0, 1e6, low_open=True)
    check_float("diffpir_zeta", diffpir_zeta, 0.0, 1.0)
    check_float("daps_tau", daps_tau, 0.0, 10.0)
    check_float("daps_prior_std", daps_prior_std, 0.0, 1e3, low_open=True)
    check_int("daps_langevin_steps", daps_langevin_steps, 1, 1000)
    check_int("particles", particles, 1, 64)


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


@contextlib.contextmanager
def _autograd():
    """Autograd on, even inside the host's torch.inference_mode (tensors made here are normal tensors)."""
    with torch.inference_mode(False), torch.enable_grad():
        yield


def _image_norms(t):
    """The L2 norm of each image of a batch, shaped to broadcast over it ([B, 1, ...])."""
    return t.flatten(1).norm(dim=1).view(-1, *([1] * (t.dim() - 1)))


def _normal(t):
    """A tensor autograd may save: inference tensors (made under the host's inference mode) are cloned."""
    return t.clone() if t.is_inference() else t


def _normal_alias(t):
    """A normal tensor over the same memory as the inference tensor `t` (no copy); a tensor subclass (a host's
    quantized weight, whose storage is not its values) is copied instead."""
    if type(t) not in (torch.Tensor, torch.nn.Parameter):
        return t.clone()
    return torch.empty(0, dtype=t.dtype, device=t.device).set_(t.untyped_storage(), t.storage_offset(), t.shape,
                                                              t.stride())


@contextlib.contextmanager
def autograd_weights(*modules):
    """For the duration of the block, the inference tensors among the modules' parameters and buffers (weights
    loaded while the host runs nodes under inference mode, which autograd cannot save for a backward pass) are
    replaced by normal tensors over the same memory (no copy of the model).  On exit, even on an error or
    interrupt, every original tensor object is put back where our alias still stands, so the model is exactly
    what it was (the host's weight patching keeps references to those objects).  None entries are skipped."""
    swapped = []
    try:
        with torch.inference_mode(False):
            for module in modules:
                for sub in module.modules() if module is not None else ():
                    for table in (sub._parameters, sub._buffers):
                        for name, t in list(table.items()):
                            if t is None or not t.is_inference():
                                continue
                            alias = _normal_alias(t)
                            if isinstance(t, torch.nn.Parameter):
                                alias = torch.nn.Parameter(alias, requires_grad=False)
                            table[name] = alias
                            swapped.append((table, name, t, alias))
        yield len(swapped)
    finally:
        for table, name, original, alias in reversed(swapped):
            if table.get(name) is alias:      # a weight the host re-patched meanwhile is the host's to restore
                table[name] = original


def host_module(model):
    """The torch module behind a host sampler's model (inner_model.model_patcher.model), or None outside the host."""
    module = getattr(getattr(getattr(model, "inner_model", None), "model_patcher", None), "model", None)
    return module if isinstance(module, torch.nn.Module) else None


class _Guide:
    """y, the operator, the optional decoder and the divergence checks of one run."""

    def __init__(self, operator, y, decoder, label):
        self.operator, self.decoder, self.label = operator, decoder, label
        self.y = y
        self.checked = decoder is None      # without a decoder the measurement was checked against the state

    def pixels(self, x0):
        if self.decoder is None:
            return x0
        pixels = self.decoder(x0)
        if not self.checked:                # the decoded size is known only now
            self.operator.check_measurement(tuple(self.y.shape), tuple(pixels.shape))
            self.checked = True
        return pixels

    def check(self, what, tensor, i, sigma, sigma_next=None, hint="", bound=math.inf):
        """Raise GuidanceDiverged on NaN/inf, or when the RMS of `tensor` exceeds `bound`."""
        finite = bool(torch.isfinite(tensor).all())
        if finite and float(tensor.float().pow(2).mean().sqrt()) <= bound:
            return
        where = f"sigma {sigma:.4g}" + (f" -> {sigma_next:.4g}" if sigma_next is not None else "")
        state = "holds NaN/inf" if not finite else f"left any image's range (RMS > {bound:.3g})"
        raise GuidanceDiverged(f"{self.label} guidance diverged at step {i} ({where}): the {what} {state}; "
                               f"{hint or 'check the measurement scale and the operator, or lower the strength'}")

    def gradient_step(self, method, model, x, sigma, s_in, extra_args, s_ve, i):
        """(x0, gradient): PiGDM J^T v or DPS grad_x ||r||, from one forward and one backward pass (graph freed)."""
        with _autograd():
            x_in = x.detach().clone().requires_grad_(True)
            x0 = model(x_in, sigma * s_in, **extra_args)
            pixels = self.pixels(x0)
            y = _normal(self.y)
            residual = y - self.operator.forward(pixels)
            if method == "dps":
                objective = residual.flatten(1).norm(dim=1).sum()
                (grad,) = torch.autograd.grad(objective, x_in)
            else:
                r2 = s_ve ** 2 / (1.0 + s_ve ** 2)
                v = self.operator.gram_solve(residual.detach(), r2, self.operator.sigma_y ** 2)
                (grad,) = torch.autograd.grad(pixels, x_in, grad_outputs=v.to(pixels.dtype))
        x0, grad = x0.detach(), grad.detach()
        self.check("denoised estimate", x0, i, sigma)
        self.check(f"{self.label} gradient", grad, i, sigma)
        return x0, grad


def sample_restoration(model, x, sigmas, extra_args=None, callback=None, disable=None, method="ddnm", **options):
    """The restoration sampler; PiGDM and DPS back-propagate through the host's model (see autograd_weights)."""
    with autograd_weights(host_module(model) if method in ("pigdm", "dps") else None):
        return _restore(model, x, sigmas, extra_args, callback, disable, method=method, **options)


def _restore(model, x, sigmas, extra_args=None, callback=None, disable=None, operator=None,
             measurement=None, method="ddnm", eta=0.85, jump_length=1, resample_count=1, seed=None,
             strength=1.0, learning_rate=REDDIFF_LR, decoder=None, diffpir_lambda=DIFFPIR_LAMBDA,
             diffpir_zeta=DIFFPIR_ZETA, daps_tau=DAPS_TAU, daps_prior_std=DAPS_PRIOR_STD,
             daps_langevin_steps=DAPS_LANGEVIN_STEPS, particles=1):
    extra_args = {} if extra_args is None else extra_args
    label = METHOD_LABELS.get(method, method)
    if decoder is None:
        operator.check_measurement(tuple(measurement.shape), tuple(x.shape))
    y = measurement.to(device=x.device, dtype=x.dtype)
    if y.shape[0] != x.shape[0]:
        y = y.expand(x.shape[0], *y.shape[1:])
    frame = frame_of(model)
    seed = extra_args.get("seed", 0) if seed is None else seed
    generator = torch.Generator(device=x.device).manual_seed(int(seed) + 7919)

    if particles > 1:       # K chains side by side: the batch and the measurement grow K-fold
        if isinstance(operator, Inpaint) and operator.mask.shape[0] == x.shape[0] > 1:
            operator = Inpaint(operator.mask.repeat(particles, 1, 1, 1), operator.sigma_y)
        y = y.repeat(particles, *([1] * (y.dim() - 1)))
        fresh = torch.randn(((particles - 1) * x.shape[0], *x.shape[1:]), generator=generator, device=x.device,
                            dtype=torch.float32).to(x.dtype)
        x = torch.cat([x, fresh * float(sigmas[0])])     # the extra chains start from pure noise at the first sigma

    def noise(shape=x.shape):
        return torch.randn(shape, generator=generator, device=x.device, dtype=torch.float32).to(x.dtype)

    guide = _Guide(operator, y, decoder, label)
    s_in = x.new_ones([x.shape[0]])
    sig = [float(s) for s in sigmas]
    if method == "reddiff":
        out = _red_diff(model, x, sig, extra_args, callback, guide, frame, noise, s_in, strength, learning_rate)
    elif method == "daps":
        posterior = _DapsPosterior(guide, max(operator.sigma_y, daps_tau), daps_prior_std, daps_langevin_steps,
                                   strength, noise)
        out = _daps(model, x, sig, sigmas, extra_args, callback, guide, frame, noise, s_in, posterior)
    else:
        out = _steps(model, x, sig, sigmas, extra_args, callback, guide, frame, noise, s_in, method, eta,
                     jump_length, resample_count, strength, diffpir_lambda, diffpir_zeta)
    return out.unflatten(0, (particles, -1)).mean(0)


def _steps(model, x, sig, sigmas, extra_args, callback, guide, frame, noise, s_in, method, eta, jump_length,
           resample_count, strength, diffpir_lambda, diffpir_zeta):
    """The one-call-per-step methods (DDNM+, DiffPIR, RePaint, PiGDM, DPS) with time travel."""
    operator, y = guide.operator, guide.y

    # the noise A^+ y carries: sigma_y times A^+'s largest gain (1 for masks, block averages, grayscale)
    sigma_y = operator.sigma_y * operator.pinv_noise_gain if method in ("ddnm", "repaint") else 0.0
    y_pinv = operator.pinv(y) if method == "repaint" else None
    plan = travel_plan(len(sig) - 1, jump_length, resample_count)
    for move in plan:
        if move[0] == "renoise":
            _, a, b = move
            x = frame.renoise(x, sig[a], sig[b], noise())
            continue
        i = move[1]
        sigma, sigma_next = sig[i], sig[i + 1]
        s, n = _ve(frame, sigma), _ve(frame, sigma_next)
        ratio = 0.0 if math.isinf(s) else n / s
        c = eta * n * math.sqrt(max(1.0 - ratio ** 2, 0.0))          # DDIM-eta noise std (VE)
        keep = math.sqrt(max(n ** 2 - c ** 2, 0.0))                    # coefficient of eps in the step
        a = 1.0 - (0.0 if math.isinf(s) else keep / s)                 # coefficient of x0 (VE: x = x0 + s eps)
        alpha, alpha_next = frame.alpha(sigma), frame.alpha(sigma_next)
        gamma = c
        if method in ("pigdm", "dps") and not math.isinf(s) and strength > 0:
            x0, grad = guide.gradient_step(method, model, x, sigma, s_in, extra_args, s, i)
        else:
            x0, grad = model(x, sigma * s_in, **extra_args), None
            guide.check("denoised estimate", x0, i, sigma)
        if method == "ddnm":
            if sigma_y > 0 and c < a * sigma_y:
                lam, gamma = c / (a * sigma_y), 0.0
            else:
                lam, gamma = 1.0, math.sqrt(max(c ** 2 - (a * sigma_y) ** 2, 0.0))
            x0 = x0 + lam * operator.pinv(y - operator.forward(x0))
        elif method == "diffpir":
            rho = 0.0 if math.isinf(s) else diffpir_lambda * operator.sigma_y ** 2 / s ** 2
            x0 = x0 + operator.gram_solve(y - operator.forward(x0), 1.0, rho)
            keep, gamma = n * math.sqrt(1.0 - diffpir_zeta), n * math.sqrt(diffpir_zeta)
        eps = (x - alpha * x0) / sigma
        x_ve = x0 + keep * eps + (gamma * noise() if gamma > 0 else 0.0)
        if method == "repaint":
            known = y_pinv + n * noise() if n > 0 else y_pinv
            x_ve = x_ve + operator.pinv(operator.forward(known) - operator.forward(x_ve))
        elif method == "pigdm" and grad is not None:
            # grad = J_x^T v; x0 as a function of x_ve = x / alpha has Jacobian alpha * J_x
            x_ve = x_ve + (strength * s ** 2 / (1.0 + s ** 2) * alpha) * grad
        elif method == "dps" and grad is not None:
            # zeta_VE grad_{x_ve} = zeta sqrt(1 + s^2) sqrt(1 + n^2) alpha grad_x = zeta sqrt(alpha^2 + sigma^2) ...
            x_ve = x_ve - (strength * DPS_ZETA * math.sqrt(alpha ** 2 + sigma ** 2) * math.sqrt(1.0 + n ** 2)) * grad
        x = alpha_next * x_ve if sigma_next > 0 else x_ve
        guide.check("state", x_ve, i, sigma, sigma_next,
                    "lower the strength (or eta / sigma_y); check the measurement scale and the operator",
                    bound=DIVERGED_RMS + 10.0 * (n if math.isfinite(n) else 0.0))
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": x0})
    return x


def _red_diff(model, x, sig, extra_args, callback, guide, frame, noise, s_in, strength, learning_rate):
    """RED-diff (spec 5.7): Adam on mu over the positive sigmas, one model call each, no backprop through D."""
    operator = guide.operator
    if guide.decoder is None and isinstance(operator, LinearOperator) and operator.has_pinv:
        start = operator.pinv(guide.y)
    elif guide.decoder is None and guide.y.shape == x.shape:     # JPEG: the decoded measurement is an image
        start = guide.y
    else:
        start = model(x, sig[0] * s_in, **extra_args)
        guide.check("denoised estimate", start, 0, sig[0])
    lam = strength * REDDIFF_LAMBDA
    with _autograd():
        mu = start.detach().clone().to(torch.float32).requires_grad_(True)
        y = _normal(guide.y).float()
        optimizer = torch.optim.Adam([mu], lr=learning_rate, betas=(0.9, 0.99))
        for i, sigma in enumerate(sig[:-1]):
            s, alpha = _ve(frame, sigma), frame.alpha(sigma)
            eps = noise().float()
            with torch.no_grad():
                x_t = (alpha * mu + sigma * eps).to(x.dtype)
                x0 = model(x_t, sigma * s_in, **extra_args).float()
                guide.check("denoised estimate", x0, i, sigma)
                eps_hat = (x_t.float() - alpha * x0) / sigma
            loss = 0.5 * (y - operator.forward(guide.pixels(mu))).pow(2).mean()
            if not math.isinf(s) and lam > 0:     # at flow sigma = 1 eps_hat = eps: no regulariser signal
                loss = loss + lam * s * ((eps_hat - eps) * mu).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            guide.check("estimate mu", mu.detach(), i, sigma, hint="lower the learning rate or the strength",
                        bound=DIVERGED_RMS)
            if callback is not None:
                callback({"x": mu.detach().to(x.dtype), "i": i, "sigma": sig[i], "sigma_hat": sig[i],
                          "denoised": x0.to(x.dtype)})
        return mu.detach().to(x.dtype)


class _DapsPosterior:
    """DAPS's inner step: a draw (or, on the last step, the mean) of p(x0 | x0_hat, y) ~ N(x0; x0_hat, r^2 I)
    N(y; A(Dec(x0)), tau^2 I)."""

    def __init__(self, guide, tau, prior_std, langevin_steps, strength, noise):
        self.guide, self.tau, self.prior_std = guide, tau, prior_std
        self.langevin_steps, self.strength, self.noise = langevin_steps, strength, noise
        op = guide.operator
        self.exact = guide.decoder is None and isinstance(op, LinearOperator) and op.has_pinv
        self.direction = None       # the power iteration's vectors, carried from call to call

    def r2(self, s):
        return self.prior_std ** 2 if math.isinf(s) else s ** 2 / (1.0 + (s / self.prior_std) ** 2)

    def __call__(self, x0_hat, s, mean_only, i, sigma):
        r2 = self.r2(s)
        if self.exact:      # Matheron's rule: perturb the prior mean and the measurement, then condition exactly
            op, y = self.guide.operator, self.guide.y
            z = x0_hat if mean_only else x0_hat + math.sqrt(r2) * self.noise()
            y_drawn = y if mean_only or self.tau == 0 else y + self.tau * self.noise(y.shape)
            return z + r2 * op.gram_solve(y_drawn - op.forward(z), r2, self.tau ** 2)
        return self._langevin(x0_hat, r2, mean_only, i, sigma)

    def _measure(self, x):
        return self.guide.operator.forward(self.guide.pixels(x).float())

    def _gain2(self, x0_hat):
        """||J||^2 of x0 -> A(Dec(x0)) at x0_hat, per image [B, 1, ...]: the Langevin step must shrink with it (a VAE
        decoder spreads one latent value over many pixels). Power iteration on J^T J, both products by autograd (J v
        as the derivative of J^T u in u); J is block-diagonal over the batch, so each image's vector is normalised
        on its own and each image gets its own gain. One step size for the batch (its largest gain) made DAPS depend
        on the batch: on the SDXL digit model one image read 12 where the rest read under 1, and x4 SR of 10 digits
        at once left every digit 10x further from its measurement than in batches of 5. Re-measured at every call:
        the gain at the first x0_hat (the model's guess from pure noise) was 2-30x the gain on real latents; the
        vector carries over, so one iteration per call follows it (three at the first). Not by a finite difference:
        the JPEG codec rounds in its forward pass, and a difference across a rounding step reads a gain hundreds of
        times too large."""
        with _autograd():
            x = _normal(x0_hat).detach().float().requires_grad_(True)
            measured = self._measure(x)
            u = torch.zeros_like(measured, requires_grad=True)
            (jt_u,) = torch.autograd.grad(measured, x, grad_outputs=u, create_graph=True)
            v = self.direction
            iterations = 1
            if v is None or v.shape != x.shape:
                v, iterations = torch.randn(x.shape, generator=torch.Generator().manual_seed(0)).to(x), 3
            for _ in range(iterations):
                v = v / _image_norms(v).clamp_min(1e-12)
                (jv,) = torch.autograd.grad(jt_u, u, grad_outputs=v, retain_graph=True)
                (v,) = torch.autograd.grad(measured, x, grad_outputs=jv, retain_graph=True)
        self.direction = v.detach()
        return _image_norms(self.direction).clamp_min(1e-6)

    def _langevin(self, x0_hat, r2, mean_only, i, sigma):
        """Langevin steps on U(x0) = ||y - A(Dec(x0))||^2 / (2 tau^2) + ||x0 - x0_hat||^2 / (2 r^2), the step
        `strength` * 0.5 min(tau^2 / ||J||^2, r^2): stable on both quadratic terms."""
        tau2 = max(self.tau, 1e-4) ** 2
        step = self.strength * 0.5 * (tau2 / self._gain2(x0_hat)).clamp_max(r2)
        with _autograd():
            x = x0_hat.detach().clone().float().requires_grad_(True)
            anchor = _normal(x0_hat).float()
            y = _normal(self.guide.y).float()
            for _ in range(self.langevin_steps):
                misfit = (y - self._measure(x)).pow(2).sum() / (2 * tau2)
                (grad,) = torch.autograd.grad(misfit, x)
                with torch.no_grad():
                    x -= step * (grad + (x - anchor) / r2)
                    if not mean_only:
                        x += (2 * step).sqrt() * self.noise().float()
            self.guide.check("DAPS posterior sample", x.detach(), i, sigma, hint="lower the strength (the Langevin "
                             "step) or raise daps_tau", bound=DIVERGED_RMS)
            return x.detach().to(x0_hat.dtype)


def _daps(model, x, sig, sigmas, extra_args, callback, guide, frame, noise, s_in, posterior):
    """DAPS (see the module docstring): denoise, draw x0 from the measurement-conditioned Gaussian, re-noise."""
    for i in range(len(sig) - 1):
        sigma, sigma_next = sig[i], sig[i + 1]
        x0_hat = model(x, sigma * s_in, **extra_args)
        guide.check("denoised estimate", x0_hat, i, sigma)
        x0 = posterior(x0_hat, _ve(frame, sigma), sigma_next == 0, i, sigma)
        n = _ve(frame, sigma_next)
        x = frame.alpha(sigma_next) * (x0 + n * noise()) if sigma_next > 0 else x0
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


__all__ = ["METHODS", "GuidanceDiverged", "OperatorError", "autograd_weights", "host_module", "sample_restoration",
           "travel_plan", "ccdf_sigmas", "ccdf_start", "validate"]
