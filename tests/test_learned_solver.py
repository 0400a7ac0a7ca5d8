"""The learned few-step solver (samplers/learned_solver.py) on the exact Gaussian-mixture oracle; plain torch.

The optimizer sees training noises (seed 1) and validation noises (seed 3); gains are measured on other noises
(seed 2) against the exact PF-ODE solution."""
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
torch.set_num_threads(1)

from modelzoo.gmm import GaussianMixture, exact_ode_solution  # noqa: E402
from samplers import SAMPLERS  # noqa: E402
from samplers import learned_solver as L  # noqa: E402
from samplers import schedules as S  # noqa: E402
from samplers.frame import Frame  # noqa: E402

SD_MIN, SD_MAX = 0.0291675, 14.614642
GMM = GaussianMixture((4, 4, 4), 6, 0)


class Oracle:
    def __init__(self, flow):
        self.flow = flow
        self.sigma_max = 1.0 if flow else SD_MAX
        self.D = lambda x, s: GMM.denoise(x, s, flow)
        self.grid = S.flow_shift_sigmas(40, 3.0) if flow else S.karras_sigmas(40, SD_MIN, SD_MAX)

    def start(self, n, seed):
        e = torch.randn(n, 4, 4, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        return e if self.flow else e * math.sqrt(1 + SD_MAX ** 2)

    def stock(self, nfe):
        return [S.flow_shift_sigmas(nfe, 3.0)] if self.flow else [S.karras_sigmas(nfe, SD_MIN, SD_MAX)]

    def run(self, solver, x):
        return L.sample_learned(S.FrameDenoiser(self.D, self.flow), x, torch.tensor(solver.sigmas,
                                                                                    dtype=torch.float64),
                                disable=True, **solver.options())


_ORACLES = {}


def oracle(name):
    if name not in _ORACLES:
        _ORACLES[name] = Oracle(name == "flow")
    return _ORACLES[name]


class _Model:
    def __init__(self, o):
        self.o, self.frame = o, Frame(o.flow)

    def __call__(self, x, sigma, **extra):
        return self.o.D(x, sigma[0].double())


@pytest.mark.parametrize("name", ["eps", "flow"])
@pytest.mark.parametrize("order,sampler", [(2, "dpmpp_2m"), (3, "dpmpp_3m")])
def test_initial_solver_is_dpm_solver_pp_exactly(name, order, sampler):
    """Its starting point (and the weights the fit is pulled towards) is the pack's DPM-Solver++ itself."""
    o = oracle(name)
    sigmas = o.stock(5)[0].double()
    frame = Frame(o.flow)
    sizes = L.history_sizes(5, order)[:-1] + [1]
    solver = L.LearnedSolver(sigmas, [L.dpm_solver_weights(frame, sigmas, i, k) for i, k in enumerate(sizes)],
                             o.flow)
    x = o.start(4, 2)
    want = SAMPLERS[sampler](_Model(o), x, sigmas, disable=True)
    assert torch.allclose(o.run(solver, x), want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name,nfe", [("eps", 4), ("eps", 5), ("flow", 4), ("flow", 5)])
def test_learned_solver_never_worse_on_validation_and_better_on_fresh_noise(name, nfe, capsys):
    o = oracle(name)
    solver, info = L.learn_solver(o.D, torch.cat([o.start(32, 1), o.start(16, 3)]), 32, o.grid, nfe, flow=o.flow,
                                  init=o.stock(nfe), max_fits=24)
    assert info["objective_after"] <= info["objective_before"]
    assert solver.nfe == nfe and solver.sigmas[0] == pytest.approx(o.sigma_max) and solver.sigmas[-1] == 0
    assert all(a > b for a, b in zip(solver.sigmas, solver.sigmas[1:]))
    test = o.start(32, 2)
    exact = exact_ode_solution(GMM, test, o.sigma_max, flow=o.flow)
    learned = float(L.per_sample_rms(o.run(solver, test), exact).mean())
    initial = SAMPLERS["dpmpp_3m"](_Model(o), test, torch.tensor(info["initial_sigmas"]), disable=True)
    base = float(L.per_sample_rms(initial, exact).mean())
    with capsys.disabled():
        print(f"\nlearned solver {name} nfe={nfe}: fresh-noise error {learned:.4f} vs DPM-Solver++(3M) on the "
              f"initial steps {base:.4f} ({learned / base:.2f}x); validation {info['objective_before']:.4f} -> "
              f"{info['objective_after']:.4f}, {info['fits']} passes, {info['stopped']}")
    assert learned < base


def test_bad_input_is_refused():
    o = oracle("eps")
    x = o.start(4, 1)
    with pytest.raises(ValueError, match="nfe = 40"):
        L.learn_solver(o.D, x, 3, o.grid, 40)
    with pytest.raises(ValueError, match="need >= 2 and >= 1"):
        L.learn_solver(o.D, x, 1, o.grid, 4)
    with pytest.raises(ValueError, match="end with 0"):
        L.learn_solver(o.D, x, 3, o.grid[:-1], 4)

    def broken(xx, sigma):
        return o.D(xx, sigma) * (math.nan if float(sigma) < 1.0 else 1.0)
    with pytest.raises(FloatingPointError, match="NaN|non-finite"):
        L.learn_solver(broken, x, 3, o.grid, 4, init=o.stock(4))
    solver = L.LearnedSolver(o.stock(4)[0], [[1.0], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0]], False)
    with pytest.raises(ValueError, match="not the ones this solver was learned for"):
        L.sample_learned(_Model(o), x, o.stock(5)[0], **solver.options())
    with pytest.raises(ValueError, match="step 1 needs 1 to 2"):
        L.check_solver_options([[1.0], [1.0, 0.0, 0.0], [1.0], [1.0]], solver.sigmas)


def test_progress_reaches_the_end_and_its_exception_stops_the_search():
    o = oracle("flow")
    x = o.start(6, 1)
    seen = []
    L.learn_solver(o.D, x, 4, o.grid, 3, flow=True, init=o.stock(3), max_fits=3,
                   progress=lambda i, t: seen.append((i, t)))
    assert seen and all(0 <= i <= t for i, t in seen) and seen[-1][0] == seen[-1][1]

    class Stop(Exception):
        pass

    def stop(i, total):
        if i > 5:
            raise Stop()
    with pytest.raises(Stop):
        L.learn_solver(o.D, x, 4, o.grid, 3, flow=True, init=o.stock(3), max_fits=3, progress=stop)
