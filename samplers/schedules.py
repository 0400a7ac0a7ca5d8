"""Timestep (sigma schedule) optimisers: DMN, GITS, OSS, LD3 and an AYS-style KLUB optimiser.

Plain torch / numpy / scipy; importable without ComfyUI.  Every public optimiser returns
``(sigmas, info)`` where ``sigmas`` is a strictly decreasing 1-D float32 CPU tensor of ``nfe + 1`` values that
ends with 0 (ComfyUI's SIGMAS convention: step i maps sigmas[i] -> sigmas[i+1], the last step lands on 0 and is
x = D(x, sigma_{N-1})), and ``info`` is a dict with at least ``objective_before``, ``objective_after``,
``iterations`` and ``wall_time_s``.

Sigma space is the host's: EPS / V models use the VE-scaled state x = x0 + sigma*eps, flow (CONST) models use
x = (1 - sigma)*x0 + sigma*eps with sigma in (0, 1].  A ``denoise_fn(x, sigma)`` returns the x0 estimate; sigma is
passed as a 0-dim float64 tensor (it may require grad inside ``ld3_sigmas``).

Start states (``x_batch``) are the states at the first sigma of the grid / at sigma_max, already scaled as the
host does it (EPS full denoise: noise * sqrt(1 + sigma_max**2); flow at sigma = 1: the noise itself).

Conventions used for ``nfe``: an N-NFE schedule has N nonzero sigmas and a final 0.
 * dmn_sigmas and ld3_sigmas keep sigma_0 = sigma_max and optimise the other N - 1 nonzero sigmas; the final
   jump to 0 is the x = D step every host sampler takes.
 * gits_sigmas, oss_sigmas and ays_sigmas pick N + 1 nodes of a fine grid.  If the grid ends with 0 the DP
   accounts for the real final x = D step; if it ends at sigma_min > 0 (AYS/GITS table style) the last node is
   replaced by 0 afterwards, as the host's AlignYourSteps / GITS nodes do.

Progress: every optimiser accepts ``progress(i, total)``; it is called from the optimisation loop and any
exception it raises propagates unchanged (the node layer uses that for interrupts).

AYS note.  The exact Align-Your-Steps estimator (importance-sampled KLUB over a dataset, iterative 1-D search) is
not reproduced; ``ays_sigmas`` implements a cheap, documented variant of the same objective: the data samples are
the endpoints of the model's own teacher ODE trajectories (ComfyUI users have no dataset), each sample is
forward-diffused along ONE Brownian path on the fine grid (the correct joint law of (x_t, x_{t_i}) along a path),
and the KLUB sum_i int dsigma/sigma^3 E||D(x_sigma) - D(x_{sigma_i})||^2 (VE frame; flow via sigma~ = sigma/(1-sigma))
is additive over intervals, so it is minimised exactly over grid nodes by dynamic programming.  Cost: about
2 x grid_size NFE per sample.  It is the KLUB of the *stochastic* linearised sampler; how well it transfers to
ODE solvers is measured in tests/test_schedules.py, not assumed.
"""
import math
import time

import numpy as np
import torch

from .frame import Frame
from .solvers import History, dpmpp_predictor, sample_dpmpp_2m, sample_euler

__all__ = [
    "karras_sigmas", "flow_shift_sigmas", "interpolate_sigmas", "sample_ode",
    "dmn_sigmas", "dmn_objective", "gits_sigmas", "oss_sigmas", "ld3_sigmas", "ays_sigmas",
]

SOLVERS = ("euler", "dpmpp_2m")
_SOLVERS = {"euler": sample_euler, "dpmpp_2m": sample_dpmpp_2m}
LD3_SEARCHES = ("adam", "derivative-free")
_MIN_NFE = {"euler": 2, "dpmpp_2m": 3}
_FLOW_SNR_OFFSET = 1e-4   # sigma = 1 has lambda = -inf in the true-log-SNR frame; nudge as the host does


# ----------------------------------------------------------------------------------------------------------------
# validation and small helpers

def _check_bounds(sigma_max, sigma_min, flow):
    for name, v in (("sigma_max", sigma_max), ("sigma_min", sigma_min)):
        try:
            fv = float(v)
        except (TypeError, ValueError):
            raise ValueError(f"{name}={v!r} is not a number") from None
        if not math.isfinite(fv) or fv <= 0.0:
            raise ValueError(f"{name}={v!r} must be finite and > 0")
    if float(sigma_max) <= float(sigma_min):
        raise ValueError(f"sigma_max={sigma_max!r} must be greater than sigma_min={sigma_min!r}")
    if flow and float(sigma_max) > 1.0:
        raise ValueError(f"sigma_max={sigma_max!r} > 1 is invalid for a flow (CONST) model, whose sigma is in (0, 1]")
    return float(sigma_max), float(sigma_min)


def _check_nfe(nfe, minimum, what):
    if isinstance(nfe, bool) or not isinstance(nfe, (int, np.integer)):
        raise ValueError(f"nfe={nfe!r} must be an integer")
    if nfe < minimum:
        raise ValueError(f"nfe={nfe} is smaller than {what} can use (needs nfe >= {minimum})")
    return int(nfe)


def _check_solver(solver):
    if solver not in SOLVERS:
        raise ValueError(f"solver={solver!r} is not one of {SOLVERS}")
    return solver


def _check_grid(sigma_grid, nfe, flow):
    g = torch.as_tensor(sigma_grid, dtype=torch.float64).flatten().cpu()
    if g.numel() < 2 or not torch.isfinite(g).all():
        raise ValueError(f"sigma_grid must be a finite 1-D sequence of at least 2 values, got {g.numel()} values")
    if not (g[1:] < g[:-1]).all():
        raise ValueError("sigma_grid must be strictly decreasing")
    if g[-1] < 0:
        raise ValueError(f"sigma_grid ends at {float(g[-1])!r} < 0")
    if flow and g[0] > 1.0:
        raise ValueError(f"sigma_grid[0]={float(g[0])!r} > 1 is invalid for a flow (CONST) model")
    if g.numel() < nfe + 1:
        raise ValueError(f"nfe={nfe} needs a sigma_grid of at least nfe + 1 = {nfe + 1} values, got {g.numel()}")
    return g


def _progress(progress, i, total):
    if progress is not None:
        progress(i, total)


def _finish(sig):
    """float32 CPU tensor, strictly decreasing, exact 0 at the end (asserted, never silently repaired)."""
    s = torch.as_tensor(sig, dtype=torch.float64).detach().cpu().clone()
    s[-1] = 0.0
    out = s.to(torch.float32)
    if not torch.isfinite(out).all() or not (out[1:] < out[:-1]).all():
        raise RuntimeError(f"internal error: schedule is not strictly decreasing and finite: {out.tolist()}")
    return out


def _strict_f32(s):
    s = torch.as_tensor(s).detach().to(torch.float32)
    return bool(torch.isfinite(s).all() and (s[1:] < s[:-1]).all())


def karras_sigmas(n, sigma_min, sigma_max, rho=7.0):
    """Karras et al. rho schedule with n nonzero sigmas and a final 0 (same as the host's karras scheduler)."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    s = (hi + ramp * (lo - hi)) ** rho
    return torch.cat([s, s.new_zeros(1)])


def flow_shift_sigmas(n, shift=3.0):
    """Uniform-t flow schedule with the SD3/Flux time shift: sigma = shift*t / (1 + (shift-1)*t), t = 1 .. 0."""
    t = torch.linspace(1.0, 0.0, n + 1, dtype=torch.float64)
    return shift * t / (1 + (shift - 1) * t)


def interpolate_sigmas(sigmas, steps):
    """Log-linear resampling of a saved schedule to another step count (the host's AYS ``loglinear_interp``).

    If ``sigmas`` ends with 0 (this module's output), its nonzero part is resampled to ``steps`` values and 0 is
    appended.  If it ends with a positive sigma_min (an AYS/GITS-style table), it is resampled to ``steps + 1``
    values and the last is set to 0, exactly as the host's AlignYourStepsScheduler does.
    """
    s = torch.as_tensor(sigmas, dtype=torch.float64).flatten().cpu()
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps={steps!r} must be an integer >= 1")
    steps = int(steps)
    if s.numel() < 2 or not torch.isfinite(s).all() or not (s[1:] < s[:-1]).all() or s[-1] < 0:
        raise ValueError("sigmas must be a finite, strictly decreasing sequence of >= 2 values ending at >= 0")
    pos = s[:-1] if s[-1] == 0 else s
    count = steps if s[-1] == 0 else steps + 1
    if pos.numel() == 1:
        if count != 1:
            raise ValueError("cannot interpolate a schedule with a single nonzero sigma to more steps")
        return _finish(torch.cat([pos, pos.new_zeros(1)]))
    xs = np.linspace(0, 1, pos.numel())
    ys = np.log(pos.numpy()[::-1])
    new = np.exp(np.interp(np.linspace(0, 1, count), xs, ys))[::-1].copy()
    new = torch.from_numpy(new)
    if s[-1] == 0:
        new = torch.cat([new, new.new_zeros(1)])
    else:
        new[-1] = 0.0
    return _finish(new)


# ----------------------------------------------------------------------------------------------------------------
# the students: the pack's own samplers (solvers.py), driven with a plain denoise_fn

class FrameDenoiser:
    """A plain ``denoise_fn(x, sigma)`` as the sampler-side model of solvers.py, carrying the model's Frame B
    (``frame_of`` finds it), so the optimizers run, and differentiate through, exactly the qs_ sampler that samples."""

    def __init__(self, denoise_fn, flow):
        self.denoise_fn, self.frame = denoise_fn, Frame(flow)

    def __call__(self, x, sigma, **extra_args):
        # the sampler passes one sigma for the whole batch: a 0-dim tensor (possibly requiring grad) or a batch row
        return self.denoise_fn(x, sigma if sigma.dim() == 0 else sigma[0].double())


def sample_ode(denoise_fn, x, sigmas, solver="euler", flow=False, return_states=False):
    """Integrate the PF-ODE over ``sigmas`` (decreasing, may end at 0) with the pack's qs_euler or qs_dpmpp_2m
    (DPM-Solver++(2M) in the model's own frame: true log-SNR on flow models, Frame A for a step touching sigma = 1),
    exactly the sampler a workflow runs.  Differentiable w.r.t. ``sigmas`` (when they require grad) and ``x``.
    ``return_states``: also the states x_i at every sigma_i (then the result) and the outputs D(x_i, sigma_i)."""
    _check_solver(solver)
    states, dens = [], []

    def collect(step):
        states.append(step["x"])
        dens.append(step["denoised"])
    out = _SOLVERS[solver](FrameDenoiser(denoise_fn, flow), x, sigmas, disable=True,
                           callback=collect if return_states else None)
    if return_states:
        return out, states + [out], dens
    return out


def student_step(frame, z, den, s, t, solver, previous=None):
    """One step s -> t of the student sampler from state z with D(z, s) = den; ``previous``: (sigma, D) of the step
    before (DPM-Solver++(2M) only).  The predictor is the one solvers.py runs, so OSS's dynamic programme scores the
    sampler that samples."""
    if float(t) == 0.0:
        return den
    if solver == "euler":
        return z + (t - s) * (z - den) / s
    history = History()
    if previous is not None:
        history.push(previous[0], previous[1], None)
    history.push(s, den, None)
    return dpmpp_predictor(True)(frame, z, t, history, len(history))


def _rms_err(a, b):
    """Per-sample RMS difference, averaged over the batch (float)."""
    d = (a - b).reshape(a.shape[0], -1).to(torch.float64)
    return float(d.pow(2).mean(1).sqrt().mean())


# ----------------------------------------------------------------------------------------------------------------
# DMN (Xue et al., CVPR 2024): data-free optimisation in log-SNR

def _H(h):
    e = np.exp(h)
    h0 = np.expm1(h)
    h1 = h * e - h0
    h2 = h * h * e - 2 * h1
    return h0, h1, h2


def dmn_objective(lams, order=2, latent=True, trunc=None, lower_order_final=False):
    """DMN error bound for nodes lams[0] < ... < lams[M] (half log-SNR, VP), M = number of intervals."""
    lams = np.asarray(lams, dtype=np.float64)
    M = lams.shape[0] - 1
    if trunc is None:
        trunc = 3 if M + 1 <= 7 else 0
    hv = np.diff(lams)
    if np.any(hv <= 0):
        return np.inf
    el = np.exp(lams)
    a_vp = 1.0 / np.sqrt(1.0 + np.exp(-2 * lams))
    s_vp = 1.0 / np.sqrt(1.0 + np.exp(2 * lams))
    w = s_vp ** 2 / a_vp if latent else s_vp / a_vp
    res = 0.0
    c = np.zeros(M + 1)
    for s in range(M):
        k = min(order, s + 1)
        if lower_order_final:
            k = min(k, M - s)
        H0, H1, H2 = _H(hv[s])
        if k == 1:
            res += abs(w[s] * el[s] * H0)
            continue
        if k == 2:
            hp = hv[s - 1]
            J = {s - 1: -el[s] * H1 / hp, s: el[s] * (H1 + hp * H0) / hp}
        else:
            h2, h1 = hv[s - 2], hv[s - 1]
            J = {s - 2: el[s] * (H2 + h1 * H1) / (h2 * (h2 + h1)),
                 s - 1: -el[s] * (H2 + (h2 + h1) * H1) / (h2 * h1),
                 s: el[s] * (H2 + (2 * h1 + h2) * H1 + h1 * (h2 + h1) * H0) / (h1 * (h2 + h1))}
        if s >= trunc:
            for n, v in J.items():
                c[n] += w[n] * v
        else:
            res += math.sqrt(sum((w[n] * v) ** 2 for n, v in J.items()))
    return res + np.abs(c).sum()


def _to_lambda(sig, flow):
    sig = np.asarray(sig, dtype=np.float64)
    if flow:
        sig = np.minimum(sig, 1.0 - _FLOW_SNR_OFFSET)
        return np.log1p(-sig) - np.log(sig)
    return -np.log(sig)


def _from_lambda(lam, flow):
    lam = np.asarray(lam, dtype=np.float64)
    if flow:
        return 1.0 / (1.0 + np.exp(lam))
    return np.exp(-lam)


def dmn_sigmas(nfe, order=2, sigma_max=14.614642, sigma_min=0.0291675, flow=False, latent=True, trunc=None,
               init=None, lower_order_final=False, maxiter=4000, progress=None):
    """DMN: minimise the data-free DMN error bound over the log-SNR time steps.

    ``order``: order of the multistep data-prediction solver the schedule is meant for (1 = Euler/DDIM,
    2 = DPM-Solver++(2M), 3 = 3M/UniPC); step s uses order min(order, s+1) (host samplers do not lower the order
    before the final x = D step; pass ``lower_order_final=True`` for the official DPM-Solver behaviour).
    The N - 1 intervals between sigma_max and sigma_min are optimised (interior nodes in lambda, parametrised by
    softmax increments so they stay ordered), the final jump to 0 is the host's x = D step.  Flow models use the
    true log-SNR lambda = log((1 - sigma)/sigma) (sigma_max = 1 nudged by 1e-4 for lambda only; sigma_0 stays
    sigma_max).  ``latent`` picks the latent-model error weight sigma_VP^2/alpha_VP (else sigma_VP/alpha_VP).
    ``trunc``: the reference's truncNum; default 3 when nfe <= 7 else 0.  ``init``: "karras" (default for EPS),
    "shift3" (default for flow), "loglinear", "uniform" or an explicit sigma sequence of nfe + 1 values.
    """
    from scipy.optimize import minimize

    t0 = time.perf_counter()
    if order not in (1, 2, 3):
        raise ValueError(f"order={order!r} must be 1, 2 or 3")
    nfe = _check_nfe(nfe, max(3, order + 1), f"DMN with order {order}")
    sigma_max, sigma_min = _check_bounds(sigma_max, sigma_min, flow)
    M = nfe - 1
    if trunc is None:
        trunc = 3 if nfe <= 7 else 0
    if init is None:
        init = "shift3" if flow else "karras"
    if isinstance(init, str):
        if init == "karras":
            s0 = karras_sigmas(M + 1, sigma_min, sigma_max).numpy()[:-1]
        elif init == "loglinear":
            s0 = np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), M + 1))
        elif init == "uniform":
            s0 = np.linspace(sigma_max, sigma_min, M + 1)
        elif init == "shift3":
            t = np.linspace(1.0, 0.0, M + 1)
            s = 3 * t / (1 + 2 * t)
            s0 = sigma_min + (sigma_max - sigma_min) * s
        else:
            raise ValueError(f"init={init!r} is not one of karras, shift3, loglinear, uniform or a sigma sequence")
    else:
        s0 = torch.as_tensor(init, dtype=torch.float64).flatten().numpy()
        s0 = s0[s0 > 0]
        if s0.shape[0] != M + 1 or not np.all(np.diff(s0) < 0):
            raise ValueError(f"init must hold nfe = {M + 1} strictly decreasing positive sigmas, got {s0.tolist()}")
        s0 = s0.copy()
        s0[0], s0[-1] = sigma_max, sigma_min
    lam_T, lam_e = float(_to_lambda(sigma_max, flow)), float(_to_lambda(sigma_min, flow))
    span = lam_e - lam_T
    lam0 = _to_lambda(s0, flow)
    lam0[0], lam0[-1] = lam_T, lam_e
    inc0 = np.clip(np.diff(lam0) / span, 1e-9, None)
    u0 = np.log(inc0)

    def lams_of(u):
        p = np.exp(u - u.max())
        p = p / p.sum()
        return lam_T + span * np.concatenate([[0.0], np.cumsum(p)])

    def f(u):
        v = dmn_objective(lams_of(u), order, latent, trunc, lower_order_final)
        return v if np.isfinite(v) else 1e30

    before = f(u0)
    count = [0]

    def cb(*_a, **_k):
        count[0] += 1
        _progress(progress, min(count[0], maxiter), maxiter)

    best_u, best_v = u0, before
    for method in ("Powell", "Nelder-Mead"):
        r = minimize(f, best_u, method=method, callback=cb,
                     options={"maxiter": maxiter, "xtol": 1e-7, "ftol": 1e-12} if method == "Powell"
                     else {"maxiter": maxiter, "xatol": 1e-7, "fatol": 1e-12, "adaptive": True})
        if r.fun < best_v:
            best_u, best_v = r.x, float(r.fun)
    _progress(progress, maxiter, maxiter)
    lam = lams_of(best_u)
    sig = _from_lambda(lam, flow)
    sig[0], sig[-1] = sigma_max, sigma_min
    sig = np.concatenate([sig, [0.0]])
    out = _finish(sig)
    return out, {"method": "dmn", "objective_before": float(before), "objective_after": float(best_v),
                 "iterations": count[0], "wall_time_s": time.perf_counter() - t0, "order": order, "trunc": trunc,
                 "init": init if isinstance(init, str) else "custom"}


# ----------------------------------------------------------------------------------------------------------------
# teacher trajectories and the grid DPs (GITS, OSS, AYS-KLUB)

def teacher_states(denoise_fn, x, grid, progress, total, flow):
    """qs_dpmpp_2m over the fine grid; returns states X[a] and denoised D[a] at every grid node a."""
    X, Ds = [], []

    def collect(step):
        X.append(step["x"])
        Ds.append(step["denoised"])
        _progress(progress, step["i"] + 1, total)
    with torch.no_grad():
        x = _SOLVERS["dpmpp_2m"](FrameDenoiser(denoise_fn, flow), x, grid, disable=True, callback=collect)
        X.append(x)
        Ds.append(denoise_fn(x, grid[-1]) if float(grid[-1]) > 0 else x)
    return X, Ds


def _dp_path(cost, K, gamma=1.0):
    """Min-cost path 0 -> G-1 with exactly K jumps over an upper-triangular cost matrix (a < b).

    V[k][a] = cost of reaching the end from a with k jumps; V[k][a] = min_b c(a,b) + gamma * V[k-1][b].
    """
    G = cost.shape[0]
    INF = float("inf")
    V = np.full((K + 1, G), INF)
    arg = np.full((K + 1, G), -1, dtype=np.int64)
    V[0, G - 1] = 0.0
    for k in range(1, K + 1):
        for a in range(G - 1):
            cand = cost[a, a + 1:] + gamma * V[k - 1, a + 1:]
            j = int(np.argmin(cand))
            V[k, a] = cand[j]
            arg[k, a] = a + 1 + j
    path, a = [0], 0
    for k in range(K, 0, -1):
        a = int(arg[k, a])
        path.append(a)
    return path, float(V[K, 0])


def _path_cost(cost, path):
    return float(sum(cost[a, b] for a, b in zip(path[:-1], path[1:])))


def _uniform_path(G, K):
    return [int(round(v)) for v in np.linspace(0, G - 1, K + 1)]


def gits_sigmas(denoise_fn, x_batch, sigma_grid, nfe, coeff=1.15, metric="l2", flow=False, progress=None):
    """GITS computed on the fly for the user's model.

    Teacher: DPM-Solver++(2M) over ``sigma_grid`` (fine, strictly decreasing; e.g. 61 Karras nodes, ending with 0 or
    at sigma_min) from the start states ``x_batch`` at sigma_grid[0].  Cost c(a, b) = batch mean of the per-sample
    l2 (or l1) norm of X_a + (sigma_b - sigma_a) d_a - X_b, a one-step Euler/DDIM jump from the teacher state (no
    extra NFE).  DP: V[a][k] = min_b c(a,b) + coeff * V[b][k-1], K = nfe jumps from the first to the last node.
    Cost: (grid size - 1) NFE per sample.  objective_before is the cost of the grid-uniform path.
    """
    t0 = time.perf_counter()
    nfe = _check_nfe(nfe, 1, "GITS")
    grid = _check_grid(sigma_grid, nfe, flow)
    if metric not in ("l1", "l2"):
        raise ValueError(f"metric={metric!r} must be 'l1' or 'l2'")
    if not math.isfinite(coeff) or coeff <= 0:
        raise ValueError(f"coeff={coeff!r} must be finite and > 0")
    G = grid.shape[0]
    X, Ds = teacher_states(denoise_fn, x_batch, grid, progress, G, flow)
    B = x_batch.shape[0]
    Xf = torch.stack([v.reshape(B, -1).to(torch.float64) for v in X])          # (G, B, F)
    Df = torch.stack([v.reshape(B, -1).to(torch.float64) for v in Ds])
    cost = np.full((G, G), np.inf)
    for a in range(G - 1):
        sa = float(grid[a])
        d = (Xf[a] - Df[a]) / sa
        sb = grid[a + 1:].reshape(-1, 1, 1)
        pred = Xf[a][None] + (sb - sa) * d[None]
        diff = pred - Xf[a + 1:]
        norm = diff.abs().sum(-1) if metric == "l1" else diff.pow(2).sum(-1).sqrt()
        cost[a, a + 1:] = norm.mean(-1).numpy()
    _progress(progress, G, G)
    path, _ = _dp_path(cost, nfe, coeff)
    base = _uniform_path(G, nfe)
    out = _finish(grid[path])
    return out, {"method": "gits", "objective_before": _path_cost(cost, base),
                 "objective_after": _path_cost(cost, path), "iterations": 1, "nfe_used": B * (G - 1),
                 "grid_indices": path, "wall_time_s": time.perf_counter() - t0}


def oss_sigmas(denoise_fn, x_batch, sigma_grid, nfe, solver="euler", flow=False, progress=None):
    """OSS-style optimal steps: DP against a many-step teacher trajectory, propagating the student's own states.

    Teacher: DPM-Solver++(2M) over ``sigma_grid`` (fine, e.g. 100+ nodes, ideally ending with 0).
    dp[k][j] = min_{i<j} mean ||step(z_i^{k-1}, sigma_i -> sigma_j) - X_j||^2, where z_i^{k-1} is the student state
    on the best (k-1)-step path to grid node i and ``step`` is the chosen solver (Euler, or DPM-Solver++(2M) with the
    previous denoised value of that path).  The batch-mean cost is used (one shared path) instead of the
    reference's per-sample DP + median.  Cost: about nfe x grid size NFE per sample.
    """
    t0 = time.perf_counter()
    _check_solver(solver)
    nfe = _check_nfe(nfe, 1, f"OSS with solver {solver}")
    grid = _check_grid(sigma_grid, nfe, flow)
    G = grid.shape[0]
    total = G + nfe * G
    X, _ = teacher_states(denoise_fn, x_batch, grid, progress, total, flow)
    frame = Frame(flow)
    B = x_batch.shape[0]

    def mse(a, b):
        return float((a - b).reshape(B, -1).to(torch.float64).pow(2).mean())

    # states[j] = (z, (sigma, D) of the step before, path) for the best path with k jumps ending at node j
    states = {0: (x_batch, None, [0])}
    done = G
    best_cost = {}
    with torch.no_grad():
        for k in range(1, nfe + 1):
            new, costs = {}, {}
            targets = [G - 1] if k == nfe else range(k, G - (nfe - k))
            for i, (z, previous, path) in sorted(states.items()):
                s = grid[i]
                den = denoise_fn(z, s)
                done += 1
                _progress(progress, done, total)
                for j in targets:
                    if j <= i:
                        continue
                    zn = student_step(frame, z, den, float(s), float(grid[j]), solver, previous)
                    c = mse(zn, X[j])
                    if c < costs.get(j, float("inf")):
                        costs[j] = c
                        new[j] = (zn, (float(s), den), path + [j])
            states = new
            best_cost = costs
    path = states[G - 1][2]
    final = best_cost[G - 1]
    # objective before: the grid-uniform path with the same solver
    base = grid[_uniform_path(G, nfe)].clone()
    with torch.no_grad():
        before = mse(sample_ode(denoise_fn, x_batch, base, solver, flow), X[-1])
    _progress(progress, total, total)
    out = _finish(grid[path])
    return out, {"method": "oss", "solver": solver, "objective_before": before, "objective_after": final,
                 "iterations": nfe, "grid_indices": path, "nfe_used": done * B,
                 "wall_time_s": time.perf_counter() - t0}


def ays_sigmas(denoise_fn, x_batch, sigma_grid, nfe, flow=False, seed=0, progress=None):
    """AYS-style schedule: minimise a KL upper bound (KLUB) of the linearised sampler over grid nodes.

    See the module docstring for the estimator (self-generated data, one Brownian forward path per sample, exact
    DP).  ``sigma_grid`` must end at sigma_min > 0 (the KLUB weight 1/sigma^3 diverges at 0); the chosen last node
    (sigma_min) is replaced by 0, as in the host's AYS tables.  Cost: 2 x (grid size) NFE per sample.
    """
    t0 = time.perf_counter()
    nfe = _check_nfe(nfe, 1, "AYS")
    grid = _check_grid(sigma_grid, nfe, flow)
    if float(grid[-1]) <= 0:
        raise ValueError("sigma_grid for ays_sigmas must end at sigma_min > 0, not 0 (the KLUB weight diverges at 0)")
    G = grid.shape[0]
    total = 2 * G
    X, _ = teacher_states(denoise_fn, x_batch, torch.cat([grid, grid.new_zeros(1)]), progress, total, flow)
    x0 = X[-1].to(torch.float64)
    B = x0.shape[0]
    # VE frame: sigma~ = sigma / alpha, x~ = x0 + W(sigma~^2), flow state x = alpha * x~
    alpha = (1 - grid) if flow else torch.ones_like(grid)
    st = grid / torch.clamp(alpha, min=1e-12)
    g = torch.Generator().manual_seed(seed)
    var = (st ** 2).flip(0)                                           # increasing variances
    incs = torch.cat([var[:1], var[1:] - var[:-1]])
    noise = torch.randn((G,) + tuple(x0.shape), generator=g, dtype=torch.float64)
    W = torch.cumsum(incs.sqrt().reshape(-1, *([1] * x0.dim())) * noise, 0).flip(0)   # W at grid order
    Dg = []
    with torch.no_grad():
        for a in range(G):
            xa = alpha[a] * (x0 + W[a])
            Dg.append(denoise_fn(xa.to(x_batch.dtype), grid[a]).reshape(B, -1).to(torch.float64))
            _progress(progress, G + a + 1, total)
    Dg = torch.stack(Dg)                                              # (G, B, F)
    wcell = 0.5 * (1 / st[1:] ** 2 - 1 / st[:-1] ** 2)                # int_{st[g+1]}^{st[g]} dsigma / sigma^3
    cost = np.full((G, G), np.inf)
    for a in range(G - 1):
        e = (Dg[a:] - Dg[a][None]).pow(2).sum(-1).mean(-1)            # E||D_g - D_a||^2, g = a..G-1
        cell = 0.5 * (e[:-1] + e[1:]) * wcell[a:]
        cost[a, a + 1:] = torch.cumsum(cell, 0).numpy()
    path, _ = _dp_path(cost, nfe, 1.0)
    base = _uniform_path(G, nfe)
    out = _finish(grid[path])
    return out, {"method": "ays_klub", "objective_before": _path_cost(cost, base),
                 "objective_after": _path_cost(cost, path), "iterations": 1, "grid_indices": path,
                 "nfe_used": 2 * G * B, "wall_time_s": time.perf_counter() - t0}


# ----------------------------------------------------------------------------------------------------------------
# LD3: teacher-student learning of the steps with the relaxed (soft-ball) loss

def _ld3_schedule(xi, log_hi, log_lo):
    """Softmax increments in log-sigma: sigma_0 = sigma_max, nfe - 1 free nonzero sigmas above sigma_lo, then 0."""
    p = torch.softmax(xi, 0)
    c = torch.cumsum(p, 0)[:-1]
    logs = torch.cat([xi.new_tensor([log_hi]), log_hi - (log_hi - log_lo) * c])
    return torch.cat([torch.exp(logs), xi.new_zeros(1)])


def _ld3_parameters(sigmas, sigma_max, sigma_min):
    """The inverse of `_ld3_schedule`: the parameters xi of the nonzero `sigmas` (sigma_0 taken as sigma_max)."""
    ls = torch.log(sigmas.clamp(min=sigma_min * (1 + 1e-6), max=sigma_max))
    ls[0] = math.log(sigma_max)
    incs = torch.cat([ls[:-1] - ls[1:], (ls[-1] - math.log(sigma_min)).reshape(1)]).clamp(min=1e-6)
    return torch.log(incs / incs.sum())


def _ld3_search_without_gradients(xi0, log_hi, log_lo, train_err, valid_err, initial, iters, diverge_factor,
                                  progress, history):
    """Nelder-Mead over LD3's schedule parameters on the training loss, keeping the best schedule on validation."""
    from scipy.optimize import minimize

    v0, sig0 = initial
    state = {"best": (v0, sig0.clone(), 0), "it": 0, "stop": ""}

    def objective(v):
        err = train_err(_ld3_schedule(torch.as_tensor(v, dtype=torch.float64), log_hi, log_lo))
        return err if math.isfinite(err) else float("inf")

    def after_iteration(v):
        state["it"] += 1
        sig = _ld3_schedule(torch.as_tensor(v, dtype=torch.float64), log_hi, log_lo)
        err = valid_err(sig)
        history.append((state["it"], None, err))
        if not math.isfinite(err) or err > diverge_factor * v0:
            state["stop"] = f"validation error {err!r} exceeded {diverge_factor} x initial {v0!r}"
            raise StopIteration
        if _strict_f32(sig[:-1]) and err < state["best"][0]:
            state["best"] = (err, sig.clone(), state["it"])
        _progress(progress, state["it"] + 1, iters + 2)

    try:
        minimize(objective, xi0.numpy(), method="Nelder-Mead", callback=after_iteration,
                 options={"maxiter": iters, "xatol": 1e-4, "fatol": 1e-9})
    except StopIteration:
        pass
    best_v, best_sig, best_it = state["best"]
    return best_v, best_sig, best_it, state["it"], bool(state["stop"]), state["stop"]


def _ld3_initial_sigmas(init, nfe):
    s = torch.as_tensor(init, dtype=torch.float64).flatten()
    s = s[s > 0]
    if s.shape[0] != nfe or not (s[1:] < s[:-1]).all():
        raise ValueError(f"init must hold nfe = {nfe} strictly decreasing positive sigmas (+ optional 0)")
    return s


def ld3_sigmas(denoise_fn, x_batch, nfe, sigma_max, sigma_min, flow=False, solver="dpmpp_2m",
               x_valid=None, valid_fraction=0.25, targets=None, valid_targets=None, teacher_steps=100,
               init=None, iters=150, lr=0.05, slack=True, slack_radius=None, slack_lr=0.5, valid_every=5,
               diverge_factor=20.0, seed=0, search="adam", progress=None):
    """LD3: learn the nfe - 1 free sigmas by back-propagating through the student solver (Adam).

    ``search="derivative-free"`` minimises the same teacher-student loss (without slack) by a Nelder-Mead search
    over the schedule parameters instead: for models that cannot be differentiated, such as a host model whose
    weights were loaded under torch.inference_mode (every ComfyUI node runs under it).

    Schedule parametrisation: xi in R^nfe -> softmax -> cumulative increments in log sigma from sigma_max down to
    sigma_min; sigma_0 = sigma_max fixed, sigma_{N-1} free (> sigma_min), final 0.  Always strictly decreasing.
    Loss: batch mean of ||student(x_T + delta_n) - teacher(x_T)||^2 / dim with LD3's slack: each training sample's
    start may move within a ball ||delta_n|| <= r (gradient step then projection), r = 0.001 * dim / nfe^2 in noise
    units (the reference default) scaled by the RMS of x_batch; ``slack=False`` gives the plain loss.
    Teacher targets: ``targets`` / ``valid_targets`` if given, else DPM-Solver++(2M) with ``teacher_steps`` Karras
    steps (rho 7) between sigma_max and sigma_min, then 0.
    ``init``: the starting schedule, or a list of candidate schedules (e.g. the model's stock ones) of which the one
    with the lowest training error is taken; default Karras (EPS) or shift-3 (flow).
    Validation: ``x_valid`` (held-out start states) or the last ``valid_fraction`` of a seeded permutation of
    x_batch; the schedule with the lowest validation RMS error seen (including the initial one) is returned.
    Divergence (non-finite loss/gradient/parameters, or validation error above ``diverge_factor`` x the initial one)
    stops training; info["diverged"] is True and info["reason"] says why; the best valid schedule is returned.
    """
    t0 = time.perf_counter()
    _check_solver(solver)
    if search not in LD3_SEARCHES:
        raise ValueError(f"search={search!r} must be one of {LD3_SEARCHES}")
    slack = slack and search == "adam"
    nfe = _check_nfe(nfe, _MIN_NFE[solver], f"LD3 with solver {solver}")
    sigma_max, sigma_min = _check_bounds(sigma_max, sigma_min, flow)
    for name, v in (("lr", lr), ("slack_lr", slack_lr)):
        if not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise ValueError(f"{name}={v!r} must be finite and > 0")
    if isinstance(iters, bool) or not isinstance(iters, (int, np.integer)) or iters < 0:
        raise ValueError(f"iters={iters!r} must be an integer >= 0")
    iters = int(iters)
    g = torch.Generator().manual_seed(seed)
    xb = x_batch.detach()
    if x_valid is None:
        if xb.shape[0] < 2:
            raise ValueError(f"x_batch has {xb.shape[0]} samples; LD3 needs >= 2 to hold some out for validation")
        perm = torch.randperm(xb.shape[0], generator=g)
        nv = max(1, int(round(valid_fraction * xb.shape[0])))
        xv, xt = xb[perm[:nv]], xb[perm[nv:]]
        if targets is not None:
            tv_, tt_ = targets[perm[:nv]], targets[perm[nv:]]
            targets, valid_targets = tt_, tv_
    else:
        xt, xv = xb, x_valid.detach()
    total = iters + 2
    if targets is None or valid_targets is None:
        tgrid = karras_sigmas(teacher_steps, sigma_min, sigma_max)
        with torch.no_grad():
            if targets is None:
                targets = sample_ode(denoise_fn, xt, tgrid, "dpmpp_2m", flow)
            if valid_targets is None:
                valid_targets = sample_ode(denoise_fn, xv, tgrid, "dpmpp_2m", flow)
    _progress(progress, 1, total)

    def run(x, sig):
        return sample_ode(denoise_fn, x, sig, solver, flow)

    def valid_err(sig):
        with torch.no_grad():
            return _rms_err(run(xv, sig), valid_targets)

    def train_err(sig):
        with torch.no_grad():
            return _rms_err(run(xt, sig), targets)

    log_hi, log_lo = math.log(sigma_max), math.log(sigma_min)
    if init is None:
        init = flow_shift_sigmas(nfe, 3.0) * sigma_max if flow else karras_sigmas(nfe, sigma_min, sigma_max)
    candidates = [_ld3_initial_sigmas(c, nfe) for c in (init if isinstance(init, (list, tuple)) else [init])]
    # Start from the candidate with the lowest *training* error (validation stays untouched for the final choice):
    # the search then never starts worse than the best stock schedule it was offered.
    init_errors = [train_err(torch.cat([c, c.new_zeros(1)])) for c in candidates]
    init_index = min(range(len(candidates)), key=lambda i: init_errors[i])
    s_init = candidates[init_index]
    xi = _ld3_parameters(s_init, sigma_max, sigma_min).clone().requires_grad_(True)

    dim = xt[0].numel()
    scale = float(xt.to(torch.float64).pow(2).mean().sqrt())
    radius = (0.001 * dim / nfe ** 2) * scale if slack_radius is None else float(slack_radius)
    delta = torch.zeros_like(xt, dtype=torch.float64).requires_grad_(slack)
    opt = torch.optim.Adam([xi], lr=lr)

    sig0 = _ld3_schedule(xi.detach(), log_hi, log_lo)
    v0 = valid_err(sig0)
    best_v, best_sig, best_it = v0, sig0.clone(), 0
    before_train = train_err(sig0)
    diverged, reason, it_done = False, "", 0
    history = []
    if search == "derivative-free":
        best_v, best_sig, best_it, it_done, diverged, reason = _ld3_search_without_gradients(
            xi.detach(), log_hi, log_lo, train_err, valid_err, (v0, sig0), iters, diverge_factor, progress, history)
    else:
        for it in range(1, iters + 1):
            opt.zero_grad()
            if delta.grad is not None:
                delta.grad = None
            sig = _ld3_schedule(xi, log_hi, log_lo)
            x_in = xt + delta.to(xt.dtype) if slack else xt
            out = run(x_in, sig)
            loss = (out - targets).reshape(out.shape[0], -1).to(torch.float64).pow(2).mean()
            if not torch.isfinite(loss):
                diverged, reason = True, f"non-finite training loss at iteration {it}"
                break
            loss.backward()
            if not torch.isfinite(xi.grad).all():
                diverged, reason = True, f"non-finite gradient at iteration {it}"
                break
            opt.step()
            if slack:
                with torch.no_grad():
                    gd = delta.grad
                    gn = gd.reshape(gd.shape[0], -1).norm(dim=1).clamp(min=1e-30).reshape(-1, *([1] * (gd.dim() - 1)))
                    delta -= slack_lr * radius * gd / gn
                    dn = delta.reshape(delta.shape[0], -1).norm(dim=1).reshape(-1, *([1] * (gd.dim() - 1)))
                    delta *= torch.clamp(radius / dn.clamp(min=1e-30), max=1.0)
            it_done = it
            if not torch.isfinite(xi).all():
                diverged, reason = True, f"non-finite schedule parameters at iteration {it}"
                break
            if it % valid_every == 0 or it == iters:
                s_now = _ld3_schedule(xi.detach(), log_hi, log_lo)
                if not _strict_f32(s_now[:-1]) or float(s_now[-2]) <= 0:
                    diverged, reason = True, f"schedule collapsed (not strictly decreasing in float32) at iteration {it}"
                    break
                v = valid_err(s_now)
                history.append((it, loss.item(), v))
                if not math.isfinite(v) or v > diverge_factor * v0:
                    diverged, reason = True, f"validation error {v!r} exceeded {diverge_factor} x initial {v0!r} at iteration {it}"
                    break
                if v < best_v:
                    best_v, best_sig, best_it = v, s_now.clone(), it
            _progress(progress, it + 1, total)
    _progress(progress, total, total)
    out = _finish(best_sig)
    return out, {"method": "ld3", "solver": solver, "objective_before": v0, "objective_after": best_v,
                 "objective": "validation RMS error vs teacher", "train_before": before_train,
                 "train_after": train_err(best_sig), "best_iteration": best_it, "iterations": it_done,
                 "diverged": diverged, "reason": reason, "slack_radius": radius if slack else 0.0,
                 "history": history, "init_index": init_index, "wall_time_s": time.perf_counter() - t0}
