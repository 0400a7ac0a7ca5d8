"""Feature caching in plain torch: forecasters, the residual-change skip policy, cache schedules and per-run state.

Nothing here imports the host. nodes/caching.py plugs these pieces into ComfyUI's extension points.

Time is the model's own time (sigma), never a call counter, so uneven schedules and samplers that call the model
several times per step stay right.

Forecasters (chosen by name, see FORECASTERS) predict a cached tensor at a new sigma from the last K computed
values. Every one of them is a *linear combination of the stored tensors with scalar weights*, so a prediction is
K multiply-adds over the cached tensors and the weights are solved in float64 on K scalars:

- "reuse": the last computed value (DeepCache / FBCache / EasyCache behaviour).
- "taylor1", "taylor2": Newton's divided-difference polynomial of order 1 or 2 through the last 2 or 3 computed
  points, in sigma. On an even grid this is TaylorSeer's finite-difference Taylor series; on an uneven grid it stays
  exact for polynomials of that order.
- "chebyshev": ridge-regularised least squares over the last K points (K >= 3) with a Chebyshev basis of degree
  min(2, K-1) on sigma mapped to [-1, 1] over the history span (the Spectrum idea, kept small). Least squares
  smooths the noise that makes high-order interpolation overshoot.
The history is bounded (K tensors per cache site and per batch group) and reported in bytes.
"""
import math
from dataclasses import dataclass, field

import torch

FORECASTERS = ("reuse", "taylor1", "taylor2", "chebyshev")
SCHEDULES = ("uniform", "non-uniform")


def forecast_weights(name, times, t):
    """Scalar weights w (len(times)) such that sum_i w_i F(times_i) forecasts F(t). `times` oldest first."""
    n = len(times)
    if n == 0:
        raise ValueError("forecast needs at least one computed point")
    if name not in FORECASTERS:
        raise ValueError(f"forecaster {name!r} is not one of {', '.join(FORECASTERS)}")
    if name == "reuse" or n == 1:
        return [0.0] * (n - 1) + [1.0]
    if name in ("taylor1", "taylor2"):
        order = min(1 if name == "taylor1" else 2, n - 1)
        pts = [float(x) for x in times[-(order + 1):]]
        if len(set(pts)) < len(pts):           # repeated sigma (e.g. two evaluations at one step): reuse
            return [0.0] * (n - 1) + [1.0]
        # Lagrange form of the interpolating polynomial == Newton's divided differences.
        w = []
        for i, ti in enumerate(pts):
            num = 1.0
            for j, tj in enumerate(pts):
                if j != i:
                    num *= (t - tj) / (ti - tj)
            w.append(num)
        return [0.0] * (n - len(pts)) + w
    # chebyshev least squares
    pts = torch.tensor([float(x) for x in times], dtype=torch.float64)
    lo, hi = float(pts.min()), float(pts.max())
    if hi - lo <= 0:
        return [0.0] * (n - 1) + [1.0]
    degree = min(2, n - 1)
    u = 2 * (pts - lo) / (hi - lo) - 1
    ut = torch.tensor([2 * (t - lo) / (hi - lo) - 1], dtype=torch.float64)

    def basis(x):
        cols = [torch.ones_like(x), x]
        while len(cols) < degree + 1:
            cols.append(2 * x * cols[-1] - cols[-2])
        return torch.stack(cols[:degree + 1], dim=1)

    V, vt = basis(u), basis(ut)
    ridge = 1e-4 * torch.eye(degree + 1, dtype=torch.float64)
    ridge[0, 0] = 0.0                          # do not shrink the constant term
    w = vt @ torch.linalg.solve(V.T @ V + ridge, V.T)
    return [float(x) for x in w[0]]


class Forecaster:
    """Bounded history of (sigma, tensor) at computed steps; predict(sigma) by the named forecaster."""

    def __init__(self, name="reuse", history=3):
        if name not in FORECASTERS:
            raise ValueError(f"forecaster {name!r} is not one of {', '.join(FORECASTERS)}")
        need = {"reuse": 1, "taylor1": 2, "taylor2": 3, "chebyshev": 3}[name]
        self.name, self.size = name, max(int(history), need)
        self.times, self.values = [], []
        self.points_used = 0

    def push(self, sigma, value):
        if self.times and float(sigma) == self.times[-1]:
            self.times.pop()
            self.values.pop()
        self.times.append(float(sigma))
        self.values.append(value)
        if len(self.times) > self.size:
            del self.times[0], self.values[0]

    def __len__(self):
        return len(self.times)

    def predict(self, sigma):
        w = forecast_weights(self.name, self.times, float(sigma))
        self.points_used = sum(1 for x in w if x != 0.0)
        out = None
        for wi, v in zip(w, self.values):
            if wi == 0.0:
                continue
            out = v * wi if out is None else out.add(v, alpha=wi)
        return out

    def nbytes(self):
        return sum(v.numel() * v.element_size() for v in self.values if torch.is_tensor(v))

    def clear(self):
        self.times.clear()
        self.values.clear()


def relative_l1(a, b):
    """mean|a - b| / mean|b| (0 when both are zero)."""
    den = b.abs().mean()
    num = (a - b).abs().mean()
    if float(den) == 0.0:
        return 0.0 if float(num) == 0.0 else math.inf
    return float(num / den)


def step_index(sigmas, sigma):
    """Index of the schedule step `sigma` belongs to: the last i with sigmas[i] >= sigma (nearest on ties)."""
    s = [float(x) for x in sigmas]
    sigma = float(sigma)
    best, best_d = 0, math.inf
    for i, x in enumerate(s[:-1] if len(s) > 1 else s):
        d = abs(x - sigma)
        if d < best_d:
            best, best_d = i, d
    if best_d <= 1e-6 * max(1.0, abs(sigma)):
        return best
    idx = 0
    for i, x in enumerate(s[:-1]):
        if x >= sigma:
            idx = i
    return idx


def full_steps(n_steps, interval, schedule="uniform", start=0, end=None, power=1.4):
    """Step indices (0-based) that run the whole UNet under DeepCache with a 1:`interval` ratio.

    Steps outside [start, end) are always full. "uniform": every interval-th step of the window, from its first.
    "non-uniform": the same number of full steps, placed densest at both ends of the window (where features change
    fastest) by a symmetric power curve; the exponent is relaxed toward 1 until the indices are distinct."""
    if interval < 1:
        raise ValueError(f"cache interval must be >= 1, got {interval}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule {schedule!r} is not one of {', '.join(SCHEDULES)}")
    end = n_steps if end is None else min(end, n_steps)
    start = max(0, min(start, end))
    full = set(range(0, start)) | set(range(end, n_steps))
    window = end - start
    if window <= 0:
        return sorted(full)
    count = math.ceil(window / interval)
    if schedule == "uniform" or count >= window or count < 2:
        full |= set(range(start, end, interval))
        return sorted(full)
    p = power
    while True:
        picks = set()
        for k in range(count):
            v = 2 * k / (count - 1) - 1                         # [-1, 1]
            g = math.copysign(abs(v) ** (1.0 / p), v)           # p > 1: pushed toward the ends
            picks.add(start + round((g + 1) / 2 * (window - 1)))
        if len(picks) >= count or p <= 1.0:
            break
        p = max(1.0, p - 0.02)
    full |= picks
    return sorted(full)


@dataclass
class SkipPolicy:
    """When may a cached step be taken instead of computing the middle of the network.

    threshold: the skip test passes when the probe residual (output of the first blocks minus their input) differs
      from its forecast from the last computed steps by less than `threshold` (relative L1). With the "reuse"
      forecaster the forecast is the probe of the last computed step, so the change accumulates over consecutive
      cached steps (FBCache / DBCache). threshold 0 never skips.
    warmup: the first `warmup` steps always compute. max_consecutive: at most this many cached steps in a row.
    start_sigma/end_sigma: caching only for end_sigma < sigma <= start_sigma. always: step indices always computed
    (a static compute mask)."""
    threshold: float = 0.1
    warmup: int = 2
    max_consecutive: int = 3
    start_sigma: float = math.inf
    end_sigma: float = 0.0
    always: frozenset = frozenset()

    def may_cache(self, step, sigma, consecutive):
        return (self.threshold > 0 and step >= self.warmup and step not in self.always
                and consecutive < self.max_consecutive and self.end_sigma < float(sigma) <= self.start_sigma)

    def skip(self, change):
        return change < self.threshold


@dataclass
class GroupState:
    """Cache state of one batch group (the conds evaluated together, keyed by their uuids) within one run."""
    shape: tuple
    sites: dict = field(default_factory=dict)       # site name -> Forecaster
    consecutive: int = 0
    calls: int = 0
    computed: int = 0
    forecast_points: int = 0
    last_change: float = 0.0


class RunState:
    """Per-run cache state: created when sampling starts, freed in `finally`. Groups are keyed by the conds' uuids
    and reset when the batch layout, resolution, dtype or device change (the key includes the input shape)."""

    def __init__(self, name, sigmas, forecaster="reuse", history=3):
        self.name = name
        self.sigmas = [float(s) for s in sigmas]
        self.steps = max(len(self.sigmas) - 1, 1)
        self.forecaster, self.history = forecaster, history
        self.groups = {}
        self.peak_bytes = 0
        self.resets = 0
        self.current = None            # scratch of the model call in progress (calls are sequential)

    def group(self, uuids, x):
        key = tuple(str(u) for u in uuids) or ("batch",)
        meta = (tuple(x.shape), x.dtype, str(x.device))
        g = self.groups.get(key)
        if g is None or g.shape != meta:
            if g is not None:
                self.resets += 1
            g = GroupState(shape=meta)
            self.groups[key] = g
        return g

    def site(self, group, name):
        f = group.sites.get(name)
        if f is None:
            f = group.sites[name] = Forecaster(self.forecaster, self.history)
        return f

    def step_of(self, sigma):
        return step_index(self.sigmas, sigma)

    def note_memory(self):
        total = sum(f.nbytes() for g in self.groups.values() for f in g.sites.values())
        self.peak_bytes = max(self.peak_bytes, total)

    def summary(self, unit_cost=None):
        """One line: computed calls per group, forecast use, estimated compute ratio and history memory."""
        calls = sum(g.calls for g in self.groups.values())
        computed = sum(g.computed for g in self.groups.values())
        fc = sum(g.forecast_points for g in self.groups.values())
        parts = [f"{self.name}: computed {computed}/{calls} model calls in full over {self.steps} steps"]
        if calls > computed and self.forecaster != "reuse":
            parts.append(f"{calls - computed} forecast ({self.forecaster}, avg {fc / max(calls - computed, 1):.1f} points)")
        if unit_cost is not None and calls:
            ratio = calls / max(unit_cost, 1e-9)
            parts.append(f"~{ratio:.2f}x less compute")
        parts.append(f"cache history peak {self.peak_bytes / 2 ** 20:.1f} MiB")
        if self.resets:
            parts.append(f"{self.resets} state resets (shape/batch change)")
        return ", ".join(parts)

    def clear(self):
        for g in self.groups.values():
            for f in g.sites.values():
                f.clear()
        self.groups.clear()
        self.current = None
