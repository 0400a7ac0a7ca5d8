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

Calibrated policy (MagCache): a calibration run computes every step and records, at each sigma, the token-mean ratio
gamma of the cached tensor's norm to its norm at the previous evaluation. At inference the ratio from the last computed
step to the current one is read off that curve (interpolated in log sigma, so another step count or schedule of the
same model works), its distance from 1 is accumulated, and a step is cached while the sum stays within the budget.
The decision depends only on the curve and the run's sigmas: the compute steps are known before sampling starts.
"""
import bisect
import itertools
import math
from dataclasses import dataclass, field, replace

import torch

FORECASTERS = ("reuse", "taylor1", "taylor2", "chebyshev")
CALIBRATION_FORMAT = "quickstep-cache-calibration/1"
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


FORECASTER_POINTS = {"reuse": 1, "taylor1": 2, "taylor2": 3, "chebyshev": 3}


class Forecaster:
    """Bounded history of (sigma, tensor) at computed steps; predict(sigma) by the named forecaster.
    `storage`: the device the history lives on (None: where the values come from); a prediction is made on the
    device of the last pushed value."""

    def __init__(self, name="reuse", history=3, storage=None):
        if name not in FORECASTERS:
            raise ValueError(f"forecaster {name!r} is not one of {', '.join(FORECASTERS)}")
        self.name, self.size = name, max(int(history), FORECASTER_POINTS[name])
        self.times, self.values = [], []
        self.points_used = 0
        self.storage, self.device = storage, None

    def push(self, sigma, value):
        if self.times and float(sigma) == self.times[-1]:
            self.times.pop()
            self.values.pop()
        if torch.is_tensor(value):
            self.device = value.device
            if self.storage is not None:
                value = value.to(self.storage)
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
            if self.storage is not None:
                v = v.to(self.device)
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
    (a static compute mask). No defaults here: the Block Cache node's inputs carry the measured ones."""
    threshold: float
    warmup: int
    max_consecutive: int
    start_sigma: float = math.inf
    end_sigma: float = 0.0
    always: frozenset = frozenset()

    def may_cache(self, step, sigma, consecutive):
        return (self.threshold > 0 and step >= self.warmup and step not in self.always
                and consecutive < self.max_consecutive and self.end_sigma < float(sigma) <= self.start_sigma)

    def skip(self, change):
        return change < self.threshold


def token_norm_ratio(current, previous, channel_dim):
    """MagCache's gamma: mean over tokens (every position off the channel axis) of |current|_2 / |previous|_2."""
    num = current.float().norm(dim=channel_dim)
    den = previous.float().norm(dim=channel_dim).clamp_min(1e-12)
    return float((num / den).mean())


class MagnitudeCurve:
    """The calibrated magnitude curve: sigmas strictly decreasing, gammas[i] = |r(sigmas[i])| / |r(sigmas[i-1])|
    (gammas[0] = 1). ratio(a, b) is the product of the gammas from a to b, read off log M(sigma) = sum log gamma
    interpolated linearly in log sigma and held constant outside the calibrated range."""

    def __init__(self, sigmas, gammas):
        sigmas, gammas = [float(s) for s in sigmas], [float(g) for g in gammas]
        if len(sigmas) < 2 or len(sigmas) != len(gammas):
            raise ValueError(f"a magnitude curve needs >= 2 (sigma, gamma) pairs, got {len(sigmas)} sigmas and "
                             f"{len(gammas)} gammas")
        if not all(math.isfinite(s) and s > 0 for s in sigmas) or any(b >= a for a, b in zip(sigmas, sigmas[1:])):
            raise ValueError(f"calibration sigmas must be positive and strictly decreasing, got {sigmas}")
        if not all(math.isfinite(g) and g > 0 for g in gammas):
            raise ValueError(f"calibration gammas must be positive and finite, got {gammas}")
        self.sigmas, self.gammas = sigmas, gammas
        self._x = [math.log(s) for s in sigmas]
        self._logm = list(itertools.accumulate(math.log(g) for g in gammas))

    @classmethod
    def from_measurements(cls, first_sigma, pairs):
        """Curve from (sigma, gamma) pairs measured during a run that started at first_sigma; repeated sigmas
        (several conds, batch groups) are averaged."""
        by_sigma = {}
        for s, g in pairs:
            by_sigma.setdefault(round(float(s), 7), []).append(float(g))
        sigmas = [float(first_sigma)] + sorted((s for s in by_sigma if s < first_sigma), reverse=True)
        return cls(sigmas, [1.0] + [sum(by_sigma[s]) / len(by_sigma[s]) for s in sigmas[1:]])

    def log_magnitude(self, sigma):
        x, xs, ys = math.log(max(float(sigma), 1e-12)), self._x, self._logm
        if x >= xs[0]:
            return ys[0]
        if x <= xs[-1]:
            return ys[-1]
        i = bisect.bisect_left([-v for v in xs], -x)       # xs decreasing: first index with xs[i] <= x
        if xs[i] == x:
            return ys[i]
        a = (x - xs[i - 1]) / (xs[i] - xs[i - 1])
        return ys[i - 1] + a * (ys[i] - ys[i - 1])

    def ratio(self, sigma_from, sigma_to):
        return math.exp(self.log_magnitude(sigma_to) - self.log_magnitude(sigma_from))

    def covers(self, sigma, tolerance=1e-4):
        """Whether sigma lies in the calibrated range (outside it the curve is flat and says nothing)."""
        return self.sigmas[-1] * (1 - tolerance) <= float(sigma) <= self.sigmas[0] * (1 + tolerance)


def calibrated_full_steps(curve, sigmas, threshold, max_consecutive, warmup=0, start_sigma=math.inf,
                          end_sigma=0.0, always=frozenset()):
    """MagCache's rule over a run's schedule: the step indices that compute. After each computed step the error
    err += |1 - ratio(last computed sigma, sigma)| accumulates; a step is cached while err <= threshold, at most
    max_consecutive in a row, past `warmup`, inside the window end_sigma < sigma <= start_sigma, inside the
    calibrated sigma range (the curve is flat outside it and would cache everything there) and not in `always`."""
    sigmas = [float(s) for s in sigmas]
    full, last, err, run = [], None, 0.0, 0
    for i in range(max(len(sigmas) - 1, 1)):
        s = sigmas[i]
        if (last is not None and threshold > 0 and run < max_consecutive and i >= warmup and i not in always
                and end_sigma < s <= start_sigma and curve.covers(s)):
            e = err + abs(1.0 - curve.ratio(sigmas[last], s))
            if e <= threshold:
                err, run = e, run + 1
                continue
        full.append(i)
        last, err, run = i, 0.0, 0
    return full


POLICIES = ("residual-probe", "calibrated")
FEW_STEP_LIMIT = 8


@dataclass(frozen=True)
class Calibration:
    """A stored magnitude curve (the MagCache calibrator) with the record it was read from: which cache and cached
    tensor (`cache`, `structure`), model (`model`: a signature), sampler and schedule it was measured on."""
    name: str
    record: dict
    curve: MagnitudeCurve

    @classmethod
    def from_record(cls, name, record):
        if record.get("format") != CALIBRATION_FORMAT:
            raise ValueError(f"format is {record.get('format')!r}, expected {CALIBRATION_FORMAT!r}")
        try:
            curve = MagnitudeCurve(record["sigmas"], record["gammas"])
        except (KeyError, TypeError) as e:
            raise ValueError(f"no magnitude curve in it ({e!r})")
        return cls(name, dict(record, name=name), curve)

    def check(self, cache, structure, model):
        """ValueError unless this calibration was made for this cache, cached tensor and model signature."""
        r = self.record
        if r.get("cache") != cache:
            raise ValueError(f"calibration {self.name!r} was made for {r.get('cache')}, not {cache}")
        if r.get("structure") != structure:
            raise ValueError(f"calibration {self.name!r} was made with {r.get('structure')}, this cache uses "
                             f"{structure}: the cached tensor differs, calibrate again")
        diff = {k: (r.get("model", {}).get(k), v) for k, v in model.items() if r.get("model", {}).get(k) != v}
        if diff:
            raise ValueError(f"calibration {self.name!r} was made for another model: "
                             + ", ".join(f"{k} {a!r} there, {b!r} here" for k, (a, b) in diff.items()))

    def check_sampler(self, sampler):
        if sampler != self.record["sampler"]:
            raise ValueError(f"calibration {self.name!r} was made with sampler {self.record['sampler']!r}, this run "
                             f"uses {sampler!r}: magnitude curves differ between samplers, calibrate again with "
                             "this sampler")

    def check_range(self, sigmas):
        """ValueError when most of the steps a cache could skip lie outside the calibrated sigma range: a
        calibration of another schedule's range (e.g. the other expert of a Wan 2.2 pair)."""
        inside = [s for s in sigmas if self.curve.covers(s)]
        if len(sigmas) and 2 * len(inside) < len(sigmas):
            c = self.curve.sigmas
            raise ValueError(f"calibration {self.name!r} covers sigma {c[0]:.4g} to {c[-1]:.4g}, but "
                             f"{len(sigmas) - len(inside)} of the {len(sigmas)} cacheable steps of this run "
                             f"(sigma {max(sigmas):.4g} to {min(sigmas):.4g}) lie outside it: calibrate on this "
                             "schedule's range (a Wan 2.2 high-noise and low-noise expert each need their own)")


@dataclass(frozen=True)
class CacheConfig:
    """Everything that decides what a cache computes, in one object (cache-dit style): the skip policy (threshold,
    warm-up, cap on cached steps in a row, window in denoising fraction, static compute mask, few-step back-off),
    the forecaster (name, history) and the calibration (None: the residual-probe policy). Where its tensors live
    (`offload`: on the storage device a run is given) too. The cache layouts (DeepCache's branch, Block Cache's
    front/back blocks, the model-level cache) each hold one. Invalid values raise ValueError naming the field.

    few_step_limit: a run of this many steps or fewer computes every step (a distilled few-step schedule has no
    step to spare); 0 turns the back-off off. always: step indices always computed (negative from the end)."""
    threshold: float
    warmup: int
    max_consecutive: int
    forecaster: str
    history: int
    start_percent: float = 0.0
    end_percent: float = 1.0
    always: frozenset = frozenset()
    few_step_limit: int = 0
    calibration: Calibration = None
    offload: bool = False
    measure: bool = False                 # a calibration run: compute every step and record the magnitudes

    LIMITS = {"threshold": (0.0, 2.0), "warmup": (0, 100), "max_consecutive": (0, 100), "history": (1, 8),
              "start_percent": (0.0, 1.0), "end_percent": (0.0, 1.0), "few_step_limit": (0, 100)}

    def __post_init__(self):
        for name, (low, high) in self.LIMITS.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} = {value!r} must be a finite number")
            if not low <= value <= high:
                raise ValueError(f"{name} = {value!r} is outside [{low}, {high}]")
        if self.forecaster not in FORECASTERS:
            raise ValueError(f"forecaster = {self.forecaster!r} is not one of {', '.join(FORECASTERS)}")
        if self.start_percent >= self.end_percent:
            raise ValueError(f"start_percent = {self.start_percent} must be below end_percent = {self.end_percent}")

    @property
    def policy(self):
        return "calibrated" if self.calibration is not None else "residual-probe"

    def measuring(self):
        """This config computing every step and recording magnitudes (the Calibrate Cache node's run)."""
        return replace(self, threshold=0.0, calibration=None, measure=True, few_step_limit=0)

    def describe(self):
        rule = (f"calibrated by {self.calibration.name!r}, error budget {self.threshold}" if self.calibration
                else f"residual probe, threshold {self.threshold}")
        back_off = f", off at <= {self.few_step_limit} steps" if self.few_step_limit else ""
        where = ", history on the offload device" if self.offload else ""
        return (f"{rule}, at most {self.max_consecutive} cached in a row{back_off}, {self.forecaster} forecast "
                f"from {self.history} stored steps{where}")


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
    scratch: dict = field(default_factory=dict)     # per-group tensors a cache keeps besides its forecasters


class RunState:
    """Per-run cache state: created when sampling starts, freed in `finally`. Groups are keyed by the conds' uuids
    and reset when the batch layout, resolution, dtype or device change (the key includes the input shape).

    The run's plan comes from its CacheConfig and the run's sigmas: `policy` (the residual-probe SkipPolicy in
    sigma), `planned` (calibrated: the steps that compute, fixed before sampling) and `few_step` (backed off: every
    step computes). start_sigma / end_sigma: the config's window converted by the model's own sampling."""

    def __init__(self, name, sigmas, config, start_sigma=math.inf, end_sigma=0.0, storage=None):
        self.name, self.config = name, config
        self.window = (start_sigma, end_sigma)
        self.sigmas = [float(s) for s in sigmas]
        self.steps = max(len(self.sigmas) - 1, 1)
        self.forecaster, self.history = config.forecaster, config.history
        self.storage = storage if config.offload else None
        steps = self.steps
        always = frozenset(i % steps for i in config.always if -steps <= i < steps)
        self.few_step = bool(config.few_step_limit) and steps <= config.few_step_limit
        threshold = 0.0 if self.few_step else config.threshold
        self.policy = SkipPolicy(threshold, config.warmup, config.max_consecutive, start_sigma, end_sigma, always)
        self.planned = None
        if config.calibration is not None:
            cacheable = [self.sigmas[i] for i in range(config.warmup, steps)
                         if i not in always and end_sigma < self.sigmas[i] <= start_sigma]
            config.calibration.check_range(cacheable)
            self.planned = frozenset(calibrated_full_steps(config.calibration.curve, self.sigmas, threshold,
                                                           config.max_consecutive, config.warmup, start_sigma,
                                                           end_sigma, always))
        self.groups = {}
        self.peak_bytes = 0
        self.resets = 0
        self.current = None            # scratch of the model call in progress (calls are sequential)
        self.measured = [] if config.measure else None    # (sigma, gamma) pairs while calibrating

    def record_magnitude(self, site, sigma, value, channel_dim):
        """While calibrating: gamma of `value` against the site's last stored value, if sigma moved down."""
        if self.measured is None or value is None or not len(site) or float(sigma) >= site.times[-1]:
            return
        previous = site.values[-1].to(value.device)
        self.measured.append((float(sigma), token_norm_ratio(value, previous, channel_dim)))

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
            f = group.sites[name] = Forecaster(self.forecaster, self.history, self.storage)
        return f

    def step_of(self, sigma):
        return step_index(self.sigmas, sigma)

    def should_compute(self, group, step, sigma, change):
        """The policy's decision for one call whose sites are ready: planned (calibrated) or, on the residual
        probe, `change()` (the probe's distance from its forecast) under the threshold. Counts the outcome."""
        if self.planned is not None:
            compute = step in self.planned
        elif self.policy.may_cache(step, sigma, group.consecutive):
            group.last_change = change()
            compute = not self.policy.skip(group.last_change)
        else:
            compute = True
        if compute:
            group.consecutive = 0
            group.computed += 1
        else:
            group.consecutive += 1
        return compute

    def held_bytes(self):
        """Bytes the run's caches hold now, by device."""
        out = {}
        for g in self.groups.values():
            tensors = [v for f in g.sites.values() for v in f.values] + list(g.scratch.values())
            for v in tensors:
                if torch.is_tensor(v):
                    out[str(v.device)] = out.get(str(v.device), 0) + v.numel() * v.element_size()
        return out

    def note_memory(self):
        self.peak_bytes = max(self.peak_bytes, sum(self.held_bytes().values()))

    def totals(self):
        calls = sum(g.calls for g in self.groups.values())
        computed = sum(g.computed for g in self.groups.values())
        return calls, computed, sum(g.forecast_points for g in self.groups.values())

    def summary(self, line, calls, **figures):
        """The finished run's figures (the node's log line, the benchmark's LAST_SUMMARY entry)."""
        return {"line": line, "calls": calls, **figures, "peak_bytes": self.peak_bytes, "steps": self.steps,
                "few_step": self.few_step, "window": self.window}

    def plan_text(self):
        if self.few_step:
            return f"few-step schedule ({self.steps} <= {self.config.few_step_limit} steps): cache off"
        if self.planned is not None:
            return f"calibrated by {self.config.calibration.name!r}, error budget {self.config.threshold}"
        return f"residual probe, threshold {self.config.threshold}"

    def memory_text(self):
        where = f" on {self.storage}" if self.storage is not None else ""
        return f"extra memory peak {self.peak_bytes / 2 ** 20:.2f} MiB{where}"

    def clear(self):
        for g in self.groups.values():
            for f in g.sites.values():
                f.clear()
            g.scratch.clear()
        self.groups.clear()
        self.current = None


def block_cache_bytes(front_tokens, middle_tokens, width, points, batch, element_size):
    """Peak bytes a Block Cache holds for one batched call: `points` stored steps of the probe (the front segment's
    img stream, front_tokens wide) and of each middle segment's streams (middle_tokens: per segment, the token count
    of each stream it stores), plus the copies a call keeps while it runs (the probe's base, each middle segment's
    input). Every tensor is tokens x width per sample."""
    tokens = front_tokens + sum(sum(streams) for streams in middle_tokens)
    return (points + 1) * tokens * width * batch * element_size


def model_cache_bytes(latent_numel, points, batch, element_size):
    """Peak bytes a model-level cache holds: `points` stored denoised predictions and one input per batch group, each
    a latent of latent_numel elements per sample."""
    return (points + 1) * latent_numel * batch * element_size
