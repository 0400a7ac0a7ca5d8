"""Distilled-model sampling: TCD / consistency sampling of an *exact* consistency function on the Gaussian-mixture
oracle (its denoiser replaced by the exact PF-ODE endpoint), the family presets from graphs in the real host on
stand-in models of each prediction type, and the bad-input errors."""
import math

import pytest
import torch

from graphs import sink
from modelzoo.gmm import exact_ode_solution
from samplers import distilled as qd
from testbed.inproc import ValidationFailed


class ExactConsistency:
    """Stands in for the oracle's mixture: `denoise` answers with the exact end of the PF-ODE trajectory through
    (x, sigma), i.e. the consistency function f(x, sigma) a perfectly distilled model would learn."""

    def __init__(self, gmm):
        self.gmm = gmm

    def denoise(self, x, sigma, flow):
        return exact_ode_solution(self.gmm, x, float(sigma.reshape(-1)[0]), flow=flow)


def _consistency_oracle(family):
    from modelzoo.oracle_host import build_oracle
    patcher = build_oracle(family)
    network = patcher.model.diffusion_model
    gmm = network.gmm
    network.gmm = ExactConsistency(gmm)
    return patcher, gmm


def _sample(patcher, sampler, sigmas, seed=5, batch=3):
    """The host's own sampling path (comfy.sample.sample_custom) from an empty latent; returns (samples, x_start)."""
    import comfy.sample
    from modelzoo.oracle_host import ORACLE_SHAPE
    from modelzoo.tiny_host import tiny_conditioning
    latent = torch.zeros(batch, *ORACLE_SHAPE)
    noise = comfy.sample.prepare_noise(latent, seed)
    cond = tiny_conditioning("sd15", 0)
    out = comfy.sample.sample_custom(patcher, noise, 1.0, sampler, sigmas, cond, cond, latent, disable_pbar=True,
                                     seed=seed)
    ms = patcher.get_model_object("model_sampling")
    x_start = ms.noise_scaling(sigmas[0], noise, latent, max_denoise=True)
    return out.double(), x_start.double()


def _tcd(gamma):
    import comfy.samplers
    return comfy.samplers.KSAMPLER(qd.sample_tcd, extra_options={"gamma": gamma})


@pytest.mark.parametrize("family", ["eps", "v", "flow"])
def test_one_step_of_an_exact_consistency_function_is_the_exact_ode_solution(inproc, family):
    patcher, gmm = _consistency_oracle(family)
    ms = patcher.get_model_object("model_sampling")
    sigma_max = float(ms.sigma_max)
    for gamma in (0.0, 0.3, 1.0):      # one step lands on 0: gamma cannot matter
        out, x_start = _sample(patcher, _tcd(gamma), torch.tensor([sigma_max, 0.0]))
        exact = exact_ode_solution(gmm, x_start, sigma_max, flow=family == "flow")
        assert (out - exact).abs().max().item() < 1e-4, gamma


@pytest.mark.parametrize("family", ["eps", "flow"])
def test_consistency_two_step_renoises_with_the_marginal_of_the_family(inproc, family):
    """gamma = 1: x1 = f(x_T); x = alpha(tau) x1 + tau z (z: the sampler's seeded noise); out = f(x, tau)."""
    from samplers.solvers import default_noise_sampler
    patcher, gmm = _consistency_oracle(family)
    ms = patcher.get_model_object("model_sampling")
    flow = family == "flow"
    sigma_max, tau = float(ms.sigma_max), (0.4 if flow else 1.4)
    out, x_start = _sample(patcher, _tcd(1.0), torch.tensor([sigma_max, tau, 0.0]))
    first = exact_ode_solution(gmm, x_start, sigma_max, flow=flow)
    z = default_noise_sampler(x_start.float(), 5)().double()
    renoised = (1 - tau if flow else 1.0) * first + tau * z
    expected = exact_ode_solution(gmm, renoised, tau, flow=flow)
    assert (out - expected).abs().max().item() < 1e-4


def test_tcd_intermediate_level_is_taken_in_timestep_units(inproc):
    from modelzoo.oracle_host import build_oracle
    ms = build_oracle("eps").get_model_object("model_sampling")
    sigma_next = float(ms.sigma(torch.tensor([499.0]))[0])
    mid = qd.intermediate_sigma(ms, sigma_next, 0.3)
    assert mid == pytest.approx(float(ms.sigma(torch.tensor([349.0]))[0]), rel=1e-5)   # floor(0.7 * 499) = 349
    assert qd.intermediate_sigma(ms, sigma_next, 0.0) == sigma_next
    assert qd.intermediate_sigma(None, 2.0, 0.25) == 1.5


def test_published_timesteps():
    assert qd.lcm_timesteps(4) == [999, 759, 499, 259]
    assert qd.lcm_timesteps(1) == [999]
    assert qd.trailing_timesteps(4) == [999, 749, 499, 249]
    assert qd.trailing_timesteps(2) == [999, 499]
    assert qd.turbo_timesteps(3) == [999, 899, 799]
    assert qd.FAMILIES["dmd2"].timesteps(1) == [399] and qd.FAMILIES["dmd2"].timesteps(4) == [999, 749, 499, 249]
    sig = qd.consistency_sigmas([0, 22], 40, 0.002, 80.0)
    assert sig[1].item() == pytest.approx(1.382, abs=2e-3) and sig[-1] == 0      # the official ImageNet-64 tau_1
    with pytest.raises(ValueError, match="must start at 0"):
        qd.consistency_sigmas([3, 1], 40, 0.002, 80.0)


def _setup_graph(oracle_family, family, steps, gamma=0.3):
    return {
        "model": {"class_type": "QuickstepTestOracle", "inputs": {"family": oracle_family, "mixture_seed": 0}},
        "setup": {"class_type": "QuickstepDistilledSetup",
                  "inputs": {"model": ["model", 0], "family": family, "steps": steps, "gamma": gamma}},
        "cond": {"class_type": "QuickstepTestConditioning", "inputs": {"arch": "sd15", "seed": 0, "context_dim": 0}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 2}},
        "out": {"class_type": "SamplerCustom",
                "inputs": {"model": ["setup", 0], "add_noise": True, "noise_seed": 7, "cfg": 1.0,
                           "positive": ["cond", 0], "negative": ["cond", 0], "sampler": ["setup", 1],
                           "sigmas": ["setup", 2], "latent_image": ["latent", 0]}},
        "keep": sink("out"),
    }


FAMILY_CASES = [("lcm", "eps", 4), ("tcd", "eps", 8), ("turbo", "v", 1), ("lightning", "eps", 1),
                ("lightning", "v", 4), ("hyper_sd", "eps", 1), ("dmd2", "eps", 4), ("consistency", "v", 2),
                ("flow_distilled", "flow", 4)]


@pytest.mark.parametrize("family,oracle_family,steps", FAMILY_CASES)
def test_family_presets_run_from_a_graph(inproc, family, oracle_family, steps):
    result = inproc.run(_setup_graph(oracle_family, family, steps))
    sigmas = inproc.output(result, "setup", 2)
    assert sigmas.shape[0] == steps + 1 and sigmas[-1] == 0 and (sigmas[1:] < sigmas[:-1]).all()
    samples = inproc.output(result, "out")["samples"]
    assert torch.isfinite(samples).all() and samples.abs().max() > 0
    steps_seen = [value for node, value, _ in result.progress() if node == "out"]
    assert steps_seen[-1] == steps   # the last step is always reported (0.33 throttles the ones between)


def test_family_models_get_their_patch_and_the_input_model_is_untouched(inproc):
    result = inproc.run(_setup_graph("eps", "lcm", 4))
    original = inproc.output(result, "model").get_model_object("model_sampling")
    patched = inproc.output(result, "setup").get_model_object("model_sampling")
    assert type(patched).__name__ == "QuickstepLCMBoundary" and type(original).__name__ != type(patched).__name__
    sigma = torch.tensor([1.0])
    x, out = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    assert torch.allclose(patched.calculate_denoised(sigma, out, x), original.calculate_denoised(sigma, out, x),
                          atol=1e-4)       # c_skip ~ 0 away from t = 0: the LCM patch is the eps x0 there
    sigmas = inproc.output(result, "setup", 2)
    assert torch.allclose(sigmas[:-1], original.sigma(torch.tensor([999.0, 759.0, 499.0, 259.0])))
    one_step = inproc.run(_setup_graph("eps", "lightning", 1))
    x0_sampling = inproc.output(one_step, "setup").get_model_object("model_sampling")
    assert torch.equal(x0_sampling.calculate_denoised(sigma, out, x), out)


@pytest.mark.parametrize("oracle_family,family,steps,message", [
    ("flow", "lcm", 4, "is for discrete-time SD-family models"),
    ("eps", "flow_distilled", 4, "is for flow (CONST) models"),
    ("v", "lcm", 4, "needs an eps-prediction model"),
    ("eps", "dmd2", 2, "steps = 2 is not published for family 'dmd2'"),
    ("eps", "tcd", 4, "gamma = 1.5 is outside"),
])
def test_setup_errors_name_the_node_and_the_value(inproc, oracle_family, family, steps, message):
    gamma = 1.5 if family == "tcd" else 0.3
    try:
        result = inproc.run(_setup_graph(oracle_family, family, steps, gamma), check=False)
        assert result.status == "error"
        text = result.error()["exception_message"]
    except ValidationFailed as rejected:      # the host rejects a FLOAT above its max before execution
        text = str(rejected.node_errors)
    assert "Distilled Model Setup" in text or "gamma" in text
    assert message in text or (family == "tcd" and "1.5" in text)


def test_tcd_in_the_stock_sampler_list_and_its_gamma_errors(inproc):
    import comfy.samplers
    assert "qs_tcd" in comfy.samplers.KSAMPLER_NAMES
    with pytest.raises(ValueError, match="gamma"):
        qd.sample_tcd.validate(gamma=-0.1)
    with pytest.raises(ValueError, match="gamma"):
        qd.sample_tcd.validate(gamma=math.nan)


def test_tcd_at_gamma_0_is_ddim():
    """gamma 0: no re-noising, each step the exponential-integrator first-order (DDIM) jump = Euler in sigma."""
    import samplers
    from modelzoo.gmm import GaussianMixture
    gmm = GaussianMixture((4, 4, 4), 6, 0)
    model = lambda x, sigma, **_: gmm.denoise(x.double(), sigma.double()[0], False).float()   # noqa: E731
    x = torch.randn(3, 4, 4, 4, generator=torch.Generator().manual_seed(1)) * 14.6
    sigmas = torch.tensor([14.6, 3.0, 0.7, 0.1, 0.0])
    tcd = qd.sample_tcd(model, x, sigmas, gamma=0.0)
    euler = samplers.SAMPLERS["euler"](model, x, sigmas)
    assert torch.allclose(tcd, euler, atol=1e-5)


def test_patched_model_sampling_shares_no_state_with_the_input_model(inproc):
    """The LCM patch is a separate module: moving the patched model_sampling (as the host does when it loads the
    model) or replacing its sigmas leaves the input model's model_sampling as it was."""
    result = inproc.run(_setup_graph("eps", "lcm", 4))
    original = inproc.output(result, "model").get_model_object("model_sampling")
    patched = inproc.output(result, "setup").get_model_object("model_sampling")
    before = {name: (t, t.clone()) for name, t in original.named_buffers()}
    patched.double()
    patched.set_sigmas(torch.linspace(10.0, 0.1, 50))
    after = dict(original.named_buffers())
    assert after.keys() == before.keys()
    for name, (tensor, values) in before.items():
        assert after[name] is tensor and torch.equal(after[name], values), name
