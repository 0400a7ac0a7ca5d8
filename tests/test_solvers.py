"""Samplers (samplers/) on the exact Gaussian-mixture oracle; plain torch, no ComfyUI.

Every accuracy claim is measured against exact PF-ODE solutions (modelzoo.gmm.exact_ode_solution) from the same
start states.  The fake model mimics the host chain model.inner_model.model_patcher.get_model_object(
"model_sampling") and counts its calls, so NFE claims are checked against real calls.
"""
import functools
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
torch.set_num_threads(1)

from modelzoo.gmm import GaussianMixture, exact_ode_solution  # noqa: E402
import samplers as Q  # noqa: E402
from samplers.frame import Frame, phi  # noqa: E402

GMM = GaussianMixture((4, 4, 4), 6, 0)
EPS_MAX, EPS_MIN = 14.6, 0.03
FLOW_END = 0.05                     # t at which the convergence schedules stop (sigma = 3t/(1+2t) = 0.136)


class VEModelSampling:               # stands in for comfy.model_sampling.EPS
    pass


class CONST:                         # the flow class is recognised by its name only, as the samplers require
    pass


class FlowModelSampling(CONST):      # like ModelSamplingDiscreteFlow(..., CONST)
    pass


class FakeModel:
    """model(x, sigma, **extra_args) -> exact D of `mixture` (default GMM); counts calls (NFE) and batch sizes."""

    def __init__(self, flow, output_dtype=None, mixture=None):
        self.flow, self.output_dtype, self.calls, self.batch_sizes = flow, output_dtype, 0, []
        self.mixture = mixture or GMM
        model_sampling = FlowModelSampling() if flow else VEModelSampling()
        patcher = type("Patcher", (), {"get_model_object": lambda self, name: model_sampling})()
        self.inner_model = type("Inner", (), {"model_patcher": patcher})()

    def __call__(self, x, sigma, **extra_args):
        assert sigma.shape == (x.shape[0],)
        self.calls += 1
        self.batch_sizes.append(x.shape[0])
        out = self.mixture.denoise(x, sigma, self.flow)
        return out.to(self.output_dtype) if self.output_dtype else out


def karras(n, sigma_min=EPS_MIN, sigma_max=EPS_MAX, rho=7.0, zero=True):
    ramp = torch.linspace(0, 1, n if zero else n + 1, dtype=torch.float64)
    sigmas = (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)]) if zero else sigmas


def flow_shift3(n, t_end=0.0):
    t = torch.linspace(1, t_end, n + 1, dtype=torch.float64)
    return 3 * t / (1 + 2 * t)


def noise(n=8, seed=0):
    return torch.randn(n, *GMM.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


class Family:
    """Start states and exact references for one model family."""

    def __init__(self, flow):
        self.flow = flow
        self.sigma_max = 1.0 if flow else EPS_MAX
        self.x = (noise() if flow else noise() * math.sqrt(1 + EPS_MAX ** 2)).float()   # host start states
        self.sigma_end = 3 * FLOW_END / (1 + 2 * FLOW_END) if flow else EPS_MIN
        self._refs = {}

    def schedule(self, n, to_zero):
        if self.flow:
            return flow_shift3(n, 0.0 if to_zero else FLOW_END).float()
        return karras(n, zero=to_zero).float()

    def reference(self, to_zero):
        if to_zero not in self._refs:
            end = 0.0 if to_zero else self.sigma_end
            self._refs[to_zero] = exact_ode_solution(GMM, self.x.double(), self.sigma_max, end, flow=self.flow)
        return self._refs[to_zero]

    def error(self, out, to_zero):
        return (out.double() - self.reference(to_zero)).pow(2).mean().sqrt().item()


FAMILIES = {"eps": Family(False), "flow": Family(True)}


@pytest.fixture(params=["eps", "flow"])
def family(request):
    return FAMILIES[request.param]


# ---------------------------------------------------------------- convergence order ---------------------------------
# (sampler, expected order).  UniPC-3 = UniP-3 + UniC-3 is order 4.  iPNDM's fixed (equal-step) coefficients are
# only 2nd order on the strongly non-uniform Karras / shifted grids.  AB4 (iPNDM-v) and DEIS+UniC would be order 4,
# but their low-order warm-up steps cap what is measurable at these step counts at ~3 (measured 3.0-3.3).
ORDERS = [
    ("euler", 1), ("heun", 2), ("dpmpp_2m", 2), ("dpmpp_3m", 3), ("dpmpp_2s", 2), ("dpm_solver_2", 2),
    ("dpm_solver_3", 3), ("unipc_bh1", 4), ("unipc_bh2", 4), ("deis", 3), ("ipndm", 2), ("ipndm_v", 3),
    ("dpmpp_2m_unic", 3), ("deis_unic", 3), ("ipndm_v_unic", 4),
]
# Measured exception: on flow, 2M+UniC is still pre-asymptotic at 40->80 steps (slope 2.0, error 1.8e-4 at 80).
FLOW_ORDER = {"dpmpp_2m_unic": 2}
# Flow's shifted schedule starts with lambda steps of ~1 (pre-asymptotic); measure one halving later there.
STEPS = {"eps": (10, 20, 40), "flow": (20, 40, 80)}
# Fourth-order methods reach the float32 state's round-off on eps at 40 steps; allow a smaller margin there.
SLACK = {4: 0.7}


@pytest.mark.parametrize("name,order", ORDERS)
def test_convergence_order(family, name, order):
    errors, nfes = [], []
    for n in STEPS["flow" if family.flow else "eps"]:
        model, stats = FakeModel(family.flow), {}
        out = Q.SAMPLERS[name](model, family.x, family.schedule(n, to_zero=False), stats=stats)
        assert stats["nfe"] == model.calls
        errors.append(family.error(out, to_zero=False))
        nfes.append(model.calls)
    assert errors[0] > errors[1] > errors[2], errors
    slope = math.log(errors[1] / errors[2]) / math.log(nfes[2] / nfes[1])
    order = FLOW_ORDER.get(name, order) if family.flow else order
    assert slope >= order - SLACK.get(order, 0.5), (name, errors, slope)


def test_few_step_accuracy_beats_euler(family):
    """At 10 NFE on the host schedule (ending at 0) the high-order samplers beat Euler."""
    sigmas = family.schedule(10, to_zero=True)
    euler = family.error(Q.SAMPLERS["euler"](FakeModel(family.flow), family.x, sigmas), True)
    for name in ("dpmpp_2m", "dpmpp_3m", "unipc_bh2", "ipndm_v", "dpmpp_2m_unic"):
        error = family.error(Q.SAMPLERS[name](FakeModel(family.flow), family.x, sigmas), True)
        assert error < 0.95 * euler, (name, error, euler)


def test_ab2_final_step_helps_few_step_flow():
    flow = FAMILIES["flow"]
    sigmas = flow.schedule(10, to_zero=True)
    plain = flow.error(Q.SAMPLERS["dpmpp_3m"](FakeModel(True), flow.x, sigmas), True)
    ab2 = flow.error(Q.SAMPLERS["dpmpp_3m"](FakeModel(True), flow.x, sigmas, final_step="ab2"), True)
    assert ab2 < 0.8 * plain, (ab2, plain)


# ---------------------------------------------------------------- few-step options ----------------------------------
@functools.lru_cache(maxsize=None)
def moved_mixture(flow):
    """GMM with every component mean moved by +2 (a data mean far from 0), and its exact flow/EPS solutions."""
    mixture = GaussianMixture(GMM.shape, 6, 0)
    mixture.means += 2.0
    family = FAMILIES["flow" if flow else "eps"]
    return mixture, exact_ode_solution(mixture, family.x.double(), family.sigma_max, 0.0, flow=flow)


def _run(family, name, steps, moved=False, **options):
    """(error to the exact solution, model calls) of a sampler on the family's schedule of `steps` steps to 0, on
    GMM or (moved=True) on `moved_mixture`."""
    mixture, exact = moved_mixture(family.flow) if moved else (None, None)
    model = FakeModel(family.flow, mixture=mixture)
    out = Q.SAMPLERS[name](model, family.x, family.schedule(steps, to_zero=True), **options)
    if not moved:
        return family.error(out, True), model.calls
    return (out.double() - exact).pow(2).mean().sqrt().item(), model.calls


@pytest.mark.parametrize("name", ["dpmpp_2m_unic", "dpmpp_2m"])
def test_extrapolated_final_step_saves_the_last_call_on_eps(name):
    """On an EPS schedule ending at sigma_min = 0.03 the call there is skipped: 6 steps for 5 calls beat 5 steps, and
    cost little against 6 steps with 6 calls."""
    eps = FAMILIES["eps"]
    plain_5, calls_5 = _run(eps, name, 5)
    plain_6, _ = _run(eps, name, 6)
    extrapolated, calls = _run(eps, name, 6, final_step="extrapolate")
    assert calls == calls_5 == 5
    assert extrapolated < 0.6 * plain_5, (extrapolated, plain_5)
    assert extrapolated < 1.5 * plain_6, (extrapolated, plain_6)


@pytest.mark.parametrize("name", ["dpmpp_2m_unic", "dpmpp_2m", "ipndm_v"])
def test_analytic_first_step_saves_the_first_call_on_flow(name):
    """From flow sigma = 1 the first call is skipped: 6 steps for 5 calls beat 5 steps with 5 calls (both with the
    AB2 final step); and the result does not hinge on a zero data mean (AFS's assumption): with every component
    mean moved by +2 the error stays the same within 2%."""
    flow = FAMILIES["flow"]
    plain, plain_calls = _run(flow, name, 5, final_step="ab2")
    analytic, calls = _run(flow, name, 6, first_step="analytic", final_step="ab2")
    assert calls == plain_calls == 5
    assert analytic < 0.95 * plain, (analytic, plain)
    analytic_moved, _ = _run(flow, name, 6, moved=True, first_step="analytic", final_step="ab2")
    assert analytic_moved == pytest.approx(analytic, rel=0.02)


def test_fewstep_preset_skips_the_first_call_only_from_flow_sigma_one():
    eps, flow = FAMILIES["eps"], FAMILIES["flow"]
    error, calls = _run(flow, "dpmpp_2m_unic_fewstep", 6)
    plain, _ = _run(flow, "dpmpp_2m_unic", 5)
    assert calls == 5 and error < 0.75 * plain, (error, plain)
    _, calls = _run(eps, "dpmpp_2m_unic_fewstep", 6)
    assert calls == 6                                  # from SD's sigma_max = 14.6 the first call is kept
    frame_eps, frame_flow = Q.Frame(False), Q.Frame(True)
    assert Q.resolve_first_step("auto", frame_eps, [14.6, 1.0, 0.0]) == "model"
    assert Q.resolve_first_step("auto", frame_flow, [1.0, 0.5, 0.0]) == "analytic"
    assert Q.resolve_first_step("auto", frame_flow, [0.9, 0.5, 0.0]) == "model"      # img2img start
    # both saves on a flow schedule ending small: 5 sigmas, 2 calls; one interval still makes its call
    model = FakeModel(True)
    out = Q.SAMPLERS["dpmpp_2m_unic_fewstep"](model, flow.x, torch.tensor([1.0, 0.8, 0.5, 0.003, 0.0]),
                                              final_step="extrapolate")
    assert model.calls == 2 and torch.isfinite(out).all()
    model = FakeModel(True)
    Q.SAMPLERS["dpmpp_2m_unic_fewstep"](model, flow.x, torch.tensor([1.0, 0.003, 0.0]), final_step="extrapolate")
    assert model.calls == 1


# ---------------------------------------------------------------- NFE claims -----------------------------------------
@pytest.mark.parametrize("name", ["dpmpp_2m", "dpmpp_3m", "unipc_bh2", "deis", "ipndm", "ipndm_v", "dpmpp_3m_unic",
                                  "euler"])
def test_one_call_per_step(family, name):
    for to_zero in (True, False):
        model = FakeModel(family.flow)
        Q.SAMPLERS[name](model, family.x, family.schedule(7, to_zero))
        assert model.calls == 7


@pytest.mark.parametrize("name", ["dpm_solver_2", "dpm_solver_3", "dpmpp_2s"])
def test_singlestep_nfe(family, name):
    for to_zero in (True, False):
        sigmas, model = family.schedule(5, to_zero), FakeModel(family.flow)
        Q.SAMPLERS[name](model, family.x, sigmas)
        assert model.calls == Q.singlestep_nfe(sigmas, name)
    assert Q.singlestep_nfe(karras(5), "dpm_solver_3") == 3 * 4 + 1


def test_unic_wrapper_adds_no_call_and_raises_order(family):
    sigmas = family.schedule(20, to_zero=False)
    plain_model, unic_model = FakeModel(family.flow), FakeModel(family.flow)
    plain = Q.SAMPLERS["ipndm_v"](plain_model, family.x, sigmas, max_order=2)
    corrected = Q.with_unic(Q.SAMPLERS["ipndm_v"], order=2)(unic_model, family.x, sigmas, max_order=2)
    assert unic_model.calls == plain_model.calls == 20
    assert family.error(corrected, False) < 0.75 * family.error(plain, False)


def test_unic_wrapper_rejects_non_multistep():
    with pytest.raises(ValueError, match="corrector"):
        Q.with_unic(Q.SAMPLERS["heun"])


def test_pfdiff_budget_and_accuracy(family):
    for k, h in ((1, 1), (2, 1), (2, 2), (3, 2)):
        fine = Q.pfdiff_fine_steps(6, k)
        sigmas, model, stats = family.schedule(fine, True), FakeModel(family.flow), {}
        out = Q.with_pfdiff(Q.sample_euler, k=k, h=h)(model, family.x, sigmas, stats=stats)
        assert model.calls == stats["nfe"] == Q.pfdiff_nfe(sigmas, k, h) == 6 < fine
        assert torch.isfinite(out).all()
    # PFDiff-2_1 at 6 NFE beats Euler at the same 6 NFE
    euler = family.error(Q.sample_euler(FakeModel(family.flow), family.x, family.schedule(6, True)), True)
    sigmas = family.schedule(Q.pfdiff_fine_steps(6, 2), True)
    pfdiff = family.error(Q.SAMPLERS["pfdiff"](FakeModel(family.flow), family.x, sigmas), True)
    assert pfdiff < 0.8 * euler, (pfdiff, euler)


def test_pfdiff_heun_nfe(family):
    sigmas, model = family.schedule(Q.pfdiff_fine_steps(5, 1), True), FakeModel(family.flow)
    Q.SAMPLERS["pfdiff_heun"](model, family.x, sigmas)
    assert model.calls == Q.pfdiff_nfe(sigmas, 1, 1, Q.sample_heun) == 2 * 5 - 1


def test_pfdiff_1_1_is_second_order():
    eps = FAMILIES["eps"]
    errors = []
    for evaluations in (10, 20, 40):
        sigmas = eps.schedule(Q.pfdiff_fine_steps(evaluations, 1), to_zero=False)
        errors.append(eps.error(Q.with_pfdiff(Q.sample_euler, 1, 1)(FakeModel(False), eps.x, sigmas), False))
    assert math.log2(errors[1] / errors[2]) > 1.5, errors


def test_paradigms_matches_sequential_in_fewer_rounds(family):
    sigmas = family.schedule(40, True)
    sequential = Q.sample_euler(FakeModel(family.flow), family.x, sigmas)
    previous = None
    for tolerance in (0.1, 0.01):
        model, stats = FakeModel(family.flow), {}
        out = Q.sample_paradigms(model, family.x, sigmas, window=8, tolerance=tolerance, stats=stats)
        assert stats["rounds"] == model.calls < 40                      # one batched call per round
        assert set(model.batch_sizes) <= {8 * family.x.shape[0]} | set(range(1, 8 * family.x.shape[0]))
        assert stats["nfe"] >= 40
        difference = (out - sequential).pow(2).mean().sqrt().item()
        assert difference < tolerance * 0.05, (tolerance, difference)
        if previous is not None:
            assert difference < previous
        previous = difference


def test_paradigms_window_one_is_sequential():
    eps = FAMILIES["eps"]
    sigmas = eps.schedule(6, True)
    stats = {}
    out = Q.sample_paradigms(FakeModel(False), eps.x, sigmas, window=1, stats=stats)
    assert stats["rounds"] == 6
    assert torch.allclose(out, Q.sample_euler(FakeModel(False), eps.x, sigmas), atol=1e-5)


# ---------------------------------------------------------------- Restart / churn ------------------------------------
def test_renoise_preserves_marginal():
    """Gaussian data x0 ~ N(0, s^2): the re-noised state must have the variance of direct noising at the target."""
    s, z0 = 0.7, torch.randn(200000, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for frame, (sigma_a, sigma_b) in ((Frame(True), (0.3, 0.8)), (Frame(False), (0.5, 4.0))):
        x0 = s * z0
        x_a = frame.alpha(sigma_a) * x0 + sigma_a * torch.randn_like(x0)
        x_b = frame.renoise(x_a, sigma_a, sigma_b, torch.randn_like(x0))
        expected = frame.alpha(sigma_b) ** 2 * s ** 2 + sigma_b ** 2
        assert abs(x_b.var().item() / expected - 1) < 0.02


def test_restart_nfe_and_zero_repeats(family):
    sigmas = family.schedule(12, True)
    model, stats = FakeModel(family.flow), {}
    restart = {0.2: (4, 2, 1.0)}
    out = Q.with_restart(Q.sample_heun)(model, family.x, sigmas, restart=restart, stats=stats)
    # main Heun: 2 per interval except the final jump to 0; each restart: 3 Heun intervals ending above 0
    assert stats["nfe"] == model.calls == (2 * 12 - 1) + 2 * (2 * 3)
    assert stats["restarts"] == 2 and torch.isfinite(out).all()
    none = Q.with_restart(Q.sample_heun)(FakeModel(family.flow), family.x, sigmas, restart={0.2: (4, 0, 1.0)})
    assert torch.equal(none, Q.sample_heun(FakeModel(family.flow), family.x, sigmas))


def test_heun_churn_is_seeded_finite_and_counted(family):
    sigmas = family.schedule(8, True)
    runs = [Q.sample_heun(FakeModel(family.flow), family.x, sigmas, s_churn=5.0, extra_args={"seed": 3})
            for _ in range(2)]
    assert torch.equal(runs[0], runs[1]) and torch.isfinite(runs[0]).all()
    plain = Q.sample_heun(FakeModel(family.flow), family.x, sigmas)
    assert not torch.equal(runs[0], plain)


# ---------------------------------------------------------------- robustness -----------------------------------------
ALL = sorted(Q.SAMPLERS)


@pytest.mark.parametrize("name", ALL)
def test_partial_denoise_batch_fp16_and_callback(family, name):
    """Start mid-schedule (img2img), batch of 8, fp16 model output: finite fp32 output, close to the exact ODE
    (restart and TCD are stochastic: only finiteness), one callback per reported step."""
    sigmas = family.schedule(24, True)[8:]
    start_sigma = float(sigmas[0])
    x0 = GMM.sample(8, seed=4).float()
    generator = torch.Generator().manual_seed(5)
    z = torch.randn(x0.shape, generator=generator)
    x = ((1 - start_sigma) * x0 + start_sigma * z) if family.flow else x0 + start_sigma * z
    seen = []
    out = Q.SAMPLERS[name](FakeModel(family.flow, torch.float16), x, sigmas, callback=seen.append)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert seen and all(set(info) == {"x", "i", "sigma", "sigma_hat", "denoised"} for info in seen)
    if name not in ("restart", "tcd"):
        exact = exact_ode_solution(GMM, x.double(), start_sigma, 0.0, flow=family.flow)
        limit = 0.1 if name.startswith("pfdiff") else 0.05      # PFDiff spends ~1/3 (k=2) or 1/2 of the calls
        assert (out.double() - exact).pow(2).mean().sqrt().item() < limit, name


@pytest.mark.parametrize("name", ALL)
def test_two_step_schedules(family, name):
    for sigmas in (torch.tensor([float(family.sigma_max), 0.0]), torch.tensor([float(family.sigma_max), 0.5])):
        out = Q.SAMPLERS[name](FakeModel(family.flow), family.x[:2], sigmas)
        assert torch.isfinite(out).all(), (name, sigmas)


def test_flow_first_step_exact_first_order():
    """From flow sigma = 1 (lambda = -inf) the first-order step is x_t = sigma_t x + (1 - sigma_t) D, no NaN."""
    frame = Frame(True)
    ratio, weight = frame.first_order(1.0, 0.8)
    assert (ratio, weight) == (0.8, pytest.approx(0.2))
    assert frame.first_order(0.4, 0.0) == (0.0, 1.0)


def test_phi_series_and_closed_form_agree():
    for k in (1, 2, 3):
        for z in (-0.49, -0.51, 0.3, -2.0):
            closed = (math.exp(z) - sum(z ** j / math.factorial(j) for j in range(k))) / z ** k
            assert phi(k, z) == pytest.approx(closed, rel=1e-9)
    assert phi(2, -math.inf) == 0.0


def test_frame_detection_and_lambda_inverse():
    assert Q.frame_of(FakeModel(True)).flow and not Q.frame_of(FakeModel(False)).flow
    assert not Q.frame_of(object()).flow                       # no host chain: VE frame
    for frame in (Frame(True), Frame(False)):
        for sigma in (0.01, 0.3, 0.9):
            assert frame.sigma(frame.lam(sigma)) == pytest.approx(sigma, rel=1e-12)


# ---------------------------------------------------------------- validation -----------------------------------------
@pytest.mark.parametrize("sigmas,match", [
    (torch.ones(2, 2), "1-D"), (torch.tensor([1.0]), "at least 2"), (torch.tensor([1.0, float("nan")]), "finite"),
    (torch.tensor([1.0, -0.1]), "non-negative"), (torch.tensor([1.0, 1.0, 0.0]), "strictly decreasing"),
])
def test_validate_sigmas(sigmas, match):
    with pytest.raises(ValueError, match=match):
        Q.validate_sigmas(sigmas)
    with pytest.raises(ValueError, match=match):
        Q.SAMPLERS["dpmpp_2m"](FakeModel(False), FAMILIES["eps"].x, sigmas)


@pytest.mark.parametrize("name,options,match", [
    ("dpmpp_2m", {"order": 4}, "order .* got 4"), ("unipc_bh2", {"variant": "bh3"}, "variant"),
    ("deis", {"max_order": 0}, "max_order"), ("ipndm", {"max_order": 5}, "max_order"),
    ("pfdiff", {"k": 4}, "k .* got 4"), ("pfdiff", {"k": 1, "h": 2}, "h .* got 2"),
    ("paradigms", {"window": 0}, "window"), ("paradigms", {"tolerance": -1.0}, "tolerance"),
    ("heun", {"s_churn": -1.0}, "s_churn"), ("restart", {"restart": {0.1: (10, 2, 0.05)}}, "t_max"),
    ("dpmpp_3m_unic", {"unic_order": 7}, "unic_order"), ("dpmpp_2m", {"final_step": "x"}, "final_step"),
    ("unipc_bh2", {"first_step": "afs"}, "first_step .* got 'afs'"), ("ipndm_v", {"first_step": None}, "first_step"),
    ("dpmpp_2m_unic_fewstep", {"final_step": "auto"}, "final_step .* got 'auto'"),
])
def test_option_validation(name, options, match):
    with pytest.raises(ValueError, match=match):
        Q.validate_options(name, **options)
    with pytest.raises(ValueError, match=match):
        Q.SAMPLERS[name](FakeModel(False), FAMILIES["eps"].x, karras(4), **options)
