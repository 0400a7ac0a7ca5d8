"""A few-step multistep solver learned for the user's model: its time steps and its per-step coefficients.

The sampler (`sample_learned`) is a multistep data-prediction solver with free weights: one model call per nonzero
sigma, and step i is

    x_{i+1} = (sigma_{i+1} / sigma_i) * x_i + sum_j w_ij * D_{i-j}        (D newest first, j < len(w_i))

which is DPM-Solver++ (order len(w_i), the model's own frame, frame.py) when w_i are its weights, and x = D at the
final jump to sigma = 0.  What is learned (`learn_solver`), in the spirit of S4S-Alt (Frankel et al., ICML 2025:
alternate between the time steps and the solver coefficients) and of Bespoke / EPD solvers (a few coefficients
per step, distilled from the model's own trajectories):
- coefficients, for given time steps, in closed form: one pass of the sampler over the training noises, each step's
  weights fitted by least squares so the step lands on the teacher's state at its target sigma (the final step on
  the teacher's end point), along the student's own trajectory (so earlier errors are seen by later steps), ridge
  towards the DPM-Solver++ weights, and iteratively re-weighted per noise (Huber) so the few noises whose teacher
  and student end in different modes do not steer the fit;
- time steps: a pattern search over the teacher's grid nodes (where the teacher's states are known exactly) on the
  robust final error of the training noises, each candidate with its own fitted coefficients;
- early stopping and the choice of the result on held-out validation noises: the result is the best on validation
  among everything evaluated, the initial DPM-Solver++ on the initial time steps included, so it is never worse
  than that initialization on validation.
Unlike the published S4S-Alt and Bespoke solvers it needs no gradient of the model (host models run under
inference mode): every model call is a plain sampling call.

Plain torch; `denoise_fn(x, sigma)` returns D(x, sigma) with sigma a 0-dim float64 tensor (schedules.py convention).
"""
import math
import time

import torch

from .common import Run, check_choice, step_order
from .frame import Frame
from .schedules import FrameDenoiser, teacher_states
from .solvers import combine, with_validation

MAX_ORDER = 4            # the longest history a step may combine
ROBUST_TRIM = 0.1        # share of the worst noises the selection error leaves out


class LearnedSolver:
    """Time steps (N nonzero sigmas, then 0) and per-step weights, newest model output first."""

    def __init__(self, sigmas, coefficients, flow):
        self.sigmas = [float(s) for s in sigmas]
        self.coefficients = [[float(w) for w in step] for step in coefficients]
        self.flow = bool(flow)

    @property
    def nfe(self):
        return len(self.sigmas) - 1

    def options(self):
        """The sampler options of `sample_learned`."""
        return {"coefficients": self.coefficients, "learned_sigmas": self.sigmas}

    def to_dict(self):
        return {"sigmas": self.sigmas, "coefficients": self.coefficients, "flow": self.flow}

    @classmethod
    def from_dict(cls, record):
        solver = cls(record["sigmas"], record["coefficients"], record["flow"])
        check_solver_options(**solver.options())
        return solver


def check_solver_options(coefficients=None, learned_sigmas=None, stats=None):
    if not isinstance(coefficients, (list, tuple)) or not isinstance(learned_sigmas, (list, tuple)):
        raise ValueError("options coefficients and learned_sigmas are required (lists from Optimize Solver)")
    if len(coefficients) != len(learned_sigmas) - 1:
        raise ValueError(f"option coefficients has {len(coefficients)} steps, learned_sigmas "
                         f"{len(learned_sigmas) - 1}")
    for i, step in enumerate(coefficients):
        if not 1 <= len(step) <= min(i + 1, MAX_ORDER) or not all(math.isfinite(float(w)) for w in step):
            raise ValueError(f"option coefficients: step {i} needs 1 to {min(i + 1, MAX_ORDER)} finite weights, "
                             f"got {step!r}")
    if stats is not None and not isinstance(stats, dict):
        raise ValueError(f"option stats must be a dict or None, got {type(stats).__name__}")


@with_validation(check_solver_options)
def sample_learned(model, x, sigmas, extra_args=None, callback=None, disable=None, coefficients=None,
                   learned_sigmas=None, stats=None):
    """The learned multistep solver (module docstring); it runs only on the sigmas it was learned for."""
    check_solver_options(coefficients, learned_sigmas, stats)
    check_sigmas_match(sigmas, learned_sigmas)
    run = Run(model, x, sigmas, extra_args, callback, disable, stats)
    x, outputs = run.x, []
    for i in run.steps():
        denoised = run.denoiser(x, run.sigmas[i])
        outputs.insert(0, denoised)
        del outputs[MAX_ORDER:]
        run.report(i, x, denoised)
        x = combine(run.sigmas[i + 1] / run.sigmas[i], x, coefficients[i], outputs)
    return run.finish(x)


def check_sigmas_match(sigmas, learned_sigmas):
    """The coefficients hold only on the sigmas they were learned for: raise ValueError for any others."""
    given = torch.as_tensor(sigmas).detach().double().cpu().flatten()
    learned = torch.tensor(learned_sigmas, dtype=torch.float64)
    if given.shape != learned.shape or not torch.allclose(given, learned, rtol=1e-4, atol=1e-6):
        raise ValueError(f"sigmas {[round(float(s), 5) for s in given]} are not the ones this solver was learned "
                         f"for {[round(float(s), 5) for s in learned]} (connect the Optimize Solver node's SIGMAS)")


def dpm_solver_weights(frame, sigmas, step, count):
    """DPM-Solver++ weights (order `count`, midpoint 2M form) of step `step` over the `count` newest outputs: the
    coefficients a learned solver starts from and is pulled towards."""
    stencil = [float(s) for s in sigmas][step::-1][:count]
    return frame.finite_for(stencil).taylor_weights(stencil[0], float(sigmas[step + 1]), stencil, True)[1]


def history_sizes(nfe, order):
    """How many outputs each step combines: DPM-Solver++'s order (warm-up, lowered before the end as qs_dpmpp_2m /
    3m do), so the initial solver is exactly that sampler; the final step (to sigma = 0, a plain combination, no
    model call) may use one more."""
    return [step_order(order, i, nfe, i + 1, True) for i in range(nfe - 1)] + [min(order + 1, nfe, MAX_ORDER)]


def per_sample_rms(a, b):
    return (a - b).flatten(1).to(torch.float64).pow(2).mean(1).sqrt()


def robust_error(rms):
    """Mean per-noise RMS error without the worst ROBUST_TRIM of the noises (at least one from 4 noises up): the
    few noises that switch mode under any few-step solver do not decide which solver is best."""
    left_out = max(1, int(ROBUST_TRIM * rms.numel())) if rms.numel() >= 4 else 0
    return float(rms.sort().values[:rms.numel() - left_out].mean())


def _fit_step(target, moving, features, base, ridge, reweighting=3):
    """base + delta minimising sum_n w_n ||target_n - moving_n - sum_j (base_j + delta_j) F_jn||^2
    + ridge * tr(G)/K * ||delta||^2, with Huber weights w_n re-estimated from the per-noise residuals."""
    count, batch = len(features), target.shape[0]
    F = torch.stack([f.flatten(1).to(torch.float64) for f in features])            # [K, B, P]
    base_step = torch.einsum("k,kbp->bp", torch.tensor(base, dtype=torch.float64), F)
    y = (target - moving).flatten(1).to(torch.float64) - base_step
    w = torch.ones(batch, dtype=torch.float64)
    delta = torch.zeros(count, dtype=torch.float64)
    for _ in range(reweighting):
        gram = torch.einsum("kbp,lbp,b->kl", F, F, w)
        rhs = torch.einsum("kbp,bp,b->k", F, y, w)
        gram = gram + ridge * float(torch.trace(gram)) / count * torch.eye(count, dtype=torch.float64)
        delta = torch.linalg.solve(gram, rhs)
        rms = (y - torch.einsum("k,kbp->bp", delta, F)).pow(2).mean(1).sqrt()
        w = torch.clamp(2.0 * rms.median() / rms.clamp(min=1e-30), max=1.0)
    return [b + float(d) for b, d in zip(base, delta)]


class _Trainer:
    """The teacher's states on the grid, and the two operations of the search: fit coefficients for a path of grid
    nodes (one sampler pass over the training noises), evaluate a solver on the validation noises."""

    def __init__(self, denoise_fn, x_start, n_train, grid, flow, order, ridge, progress):
        self.denoise_fn, self.grid, self.frame, self.flow = denoise_fn, grid, Frame(flow), flow
        self.order, self.ridge = order, ridge
        self.x_start, self.n_train = x_start, n_train
        states, _ = teacher_states(denoise_fn, x_start, grid, progress, None, flow)
        self.train_states = [s[:n_train] for s in states]
        self.valid_target = states[-1][n_train:]
        self.fits = self.evaluations = 0

    def sigmas(self, path):
        return [float(self.grid[p]) for p in path]

    def fit(self, path):
        """(LearnedSolver, robust training error) with coefficients fitted along the student's own trajectory."""
        sigmas, nfe = self.sigmas(path), len(path) - 1
        x, outputs, coefficients = self.x_start[:self.n_train], [], []
        with torch.no_grad():
            for i, count in enumerate(history_sizes(nfe, self.order)):
                outputs.insert(0, self.denoise_fn(x, torch.tensor(sigmas[i], dtype=torch.float64)))
                del outputs[MAX_ORDER:]
                base = dpm_solver_weights(self.frame, sigmas, i, count)
                ratio = sigmas[i + 1] / sigmas[i]
                weights = _fit_step(self.train_states[path[i + 1]], ratio * x, outputs[:count], base, self.ridge)
                if not all(math.isfinite(w) for w in weights):
                    raise FloatingPointError(f"non-finite solver coefficients at step {i} (sigma {sigmas[i]:.4g})")
                coefficients.append(weights)
                x = combine(ratio, x, weights, outputs)
            if not torch.isfinite(x).all():
                raise FloatingPointError("the learned solver produced NaN/inf on the training noises")
        self.fits += 1
        return LearnedSolver(sigmas, coefficients, self.flow), robust_error(per_sample_rms(x, self.train_states[-1]))

    def base_solver(self, path):
        sigmas = self.sigmas(path)
        sizes = history_sizes(len(path) - 1, self.order)
        sizes[-1] = 1                                 # DPM-Solver++ ends with x = D
        return LearnedSolver(sigmas, [dpm_solver_weights(self.frame, sigmas, i, k) for i, k in enumerate(sizes)],
                             self.flow)

    def validation_rms(self, solver):
        """Per-noise RMS error of `solver` on the validation noises, run by sample_learned itself (the sampler that
        samples) on the whole batch: a host model cuts per-row conditioning to the batch from the front, so the
        validation rows keep theirs only in place."""
        with torch.no_grad():
            out = sample_learned(FrameDenoiser(self.denoise_fn, self.flow), self.x_start,
                                 torch.tensor(solver.sigmas, dtype=torch.float64), disable=True, **solver.options())
        if not torch.isfinite(out).all():
            raise FloatingPointError("the learned solver produced NaN/inf on the validation noises")
        self.evaluations += 1
        return per_sample_rms(out[self.n_train:], self.valid_target)


def snap_to_grid(grid, sigmas):
    """Strictly increasing grid indices nearest (in log sigma) to the nonzero `sigmas`, then the grid's last node;
    None where they do not fit (more sigmas near the end than grid nodes)."""
    log_grid = torch.log(grid[:-1].clamp(min=1e-12))
    path = []
    for s in sigmas:
        if float(s) <= 0:
            continue
        index = int(torch.argmin((log_grid - math.log(float(s))).abs()))
        path.append(max(index, path[-1] + 1 if path else 0))
    path.append(grid.shape[0] - 1)
    return path if path[-2] < path[-1] else None


def learn_solver(denoise_fn, x_start, n_train, grid, nfe, flow=False, init=None, order=3, ridge=1e-3,
                 max_fits=40, patience=4, progress=None):
    """Learn time steps and coefficients of an `nfe`-call solver (module docstring) and return (LearnedSolver, info).

    ``grid``: the teacher's sigmas, strictly decreasing from the model's sigma_max and ending with 0 (qs_dpmpp_2m on
    it is the reference); the learned steps are grid nodes.  ``x_start``: start states at grid[0], the first
    ``n_train`` for training, the others for validation; ``denoise_fn`` sees either all of them or the training
    ones (the leading rows), so per-row conditioning cut from the front stays with its rows.
    ``init``: candidate starting schedules (nfe nonzero sigmas + 0); the one whose DPM-Solver++ has the lowest
    robust training error is the initialization (default: the grid's own nodes, evenly spaced).
    ``max_fits``: training passes (each nfe model calls on the training noises) the search may spend;
    ``patience``: accepted moves without a validation gain before it stops.  ``progress(i, total)`` may raise to
    interrupt.
    """
    started = time.perf_counter()
    grid = torch.as_tensor(grid, dtype=torch.float64).flatten().cpu()
    if float(grid[-1]) != 0.0 or not (grid[1:] < grid[:-1]).all():
        raise ValueError("the teacher grid must be strictly decreasing and end with 0")
    if not 2 <= nfe <= grid.shape[0] - 2:
        raise ValueError(f"nfe = {nfe}: a learned solver needs 2 to {grid.shape[0] - 2} model calls on a teacher "
                         f"grid of {grid.shape[0] - 1} steps")
    check_choice("order", order, tuple(range(1, MAX_ORDER)))
    if n_train < 2 or x_start.shape[0] - n_train < 1:
        raise ValueError(f"{n_train} training and {x_start.shape[0] - n_train} validation noises: need >= 2 and "
                         ">= 1")
    total = grid.shape[0] - 1 + max_fits + 2
    done = [grid.shape[0] - 1]

    def tick():
        done[0] += 1
        if progress is not None:
            progress(min(done[0], total), total)

    candidates = init if init is not None else [grid[torch.linspace(0, grid.shape[0] - 1, nfe + 1).round().long()]]
    paths = [p for p in (snap_to_grid(grid, c) for c in candidates) if p is not None]
    if any(len(p) != nfe + 1 for p in paths):
        raise ValueError(f"every starting schedule must have {nfe} nonzero sigmas")
    if not paths:
        raise ValueError(f"no starting schedule of {nfe} steps fits on the teacher's {grid.shape[0] - 1} steps; use "
                         "more teacher steps")
    trainer = _Trainer(denoise_fn, x_start, n_train, grid, flow, order, ridge,
                       None if progress is None else lambda i, _total: progress(i, total))

    def base_train_error(path):
        with torch.no_grad():
            out = sample_learned(FrameDenoiser(denoise_fn, flow), x_start[:n_train],
                                 torch.tensor(trainer.sigmas(path), dtype=torch.float64), disable=True,
                                 **trainer.base_solver(path).options())
        return robust_error(per_sample_rms(out, trainer.train_states[-1]))
    path = min(paths, key=base_train_error) if len(paths) > 1 else paths[0]
    initial = trainer.base_solver(path)
    initial_rms = trainer.validation_rms(initial)
    chosen, chosen_rms = initial, initial_rms
    solver, train_error = trainer.fit(path)
    tick()
    history = [(list(path), train_error, None)]

    def consider(candidate):
        nonlocal chosen, chosen_rms
        rms = trainer.validation_rms(candidate)
        history[-1] = (*history[-1][:2], robust_error(rms))
        if robust_error(rms) < robust_error(chosen_rms):
            chosen, chosen_rms = candidate, rms
            return True
        return False
    consider(solver)
    stride = max(1, (grid.shape[0] - 1) // (2 * nfe))
    stale, stop = 0, ""
    while not stop:
        improved = False
        for k in range(1, nfe):
            for move in (stride, -stride):
                trial = list(path)
                trial[k] += move
                if not (trial[k - 1] < trial[k] < trial[k + 1]):
                    continue
                if trainer.fits >= max_fits:
                    stop = f"spent max_fits = {max_fits} training passes"
                    break
                candidate, error = trainer.fit(trial)
                tick()
                if error < train_error:
                    path, train_error, improved = trial, error, True
                    history.append((list(path), error, None))
                    stale = 0 if consider(candidate) else stale + 1
                    if stale >= patience:
                        stop = f"no validation gain in {patience} accepted moves"
                        break
            if stop:
                break
        if not improved and not stop:
            if stride == 1:
                stop = "converged (no single-node move lowers the training error)"
            stride = max(1, stride // 2)
    if progress is not None:
        progress(total, total)
    return chosen, {"method": "learned-solver", "objective": "robust validation RMS error vs teacher",
                    "objective_before": robust_error(initial_rms), "objective_after": robust_error(chosen_rms),
                    "mean_before": float(initial_rms.mean()), "mean_after": float(chosen_rms.mean()),
                    "initial_sigmas": initial.sigmas, "fits": trainer.fits, "stopped": stop, "history": history,
                    "wall_time_s": time.perf_counter() - started}
