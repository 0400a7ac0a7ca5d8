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


def test_flow_presets_give_the_sigmas_their_authors_sample_at():
    """Each checkpoint's own reference schedule (sources in samplers/distilled.py), worked out by hand."""
    expected = {
        ("wan_lightning", 4): [1.0, 0.9375, 2.5 / 3, 0.625, 0.0],       # 1000/750/500/250 at shift 5
        ("qwen_image_lightning", 4): [1.0, 0.9, 0.75, 0.5, 0.0],        # linspace(1, 1/4, 4) at shift 3
        ("qwen_image_lightning", 8): [3 * t / (1 + 2 * t) for t in (1, .875, .75, .625, .5, .375, .25, .125)] + [0],
        ("z_image_turbo", 8): [3 * t / (1 + 2 * t) for t in (1, .875, .75, .625, .5, .375, .25, .125)] + [0],
        ("flux_schnell", 4): [1.0, 0.75, 0.5, 0.25, 0.0],               # linspace(1, 0, 5), no shift
        # linspace(1000, 1000 * shift3(0.001), 4) / 1000, shifted by 3 again: the last call sits at 0.0089
        ("sd35_turbo", 4): [1.0, 0.857686, 0.602152, 0.008929, 0.0],
    }
    for (name, steps), sigmas in expected.items():
        family = qd.FAMILIES[name]
        assert family.cfg == 1.0 and family.prediction == "flow" and steps in family.steps
        assert torch.allclose(qd.flow_preset_sigmas(family, steps), torch.tensor(sigmas), atol=2e-6), name
    assert [round(1000 * t) for t in qd.FAMILIES["wan_lightning"].timesteps(4)] == [1000, 750, 500, 250]


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
    ("eps", "wan_lightning", 4, "is for flow (CONST) models"),
    ("flow", "qwen_image_lightning", 2, "steps = 2 is not published for family 'qwen_image_lightning'; use one "
                                        "of 4, 8"),
    ("flow", "z_image_turbo", 4, "steps = 4 is not published for family 'z_image_turbo'; use one of 8"),
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


def test_an_unknown_family_is_refused_naming_it(inproc):
    # the node's own error on 0.3.75; a newer host refuses the combo value in its validation, naming the input
    text = inproc.refusal_message(_setup_graph("flow", "qwen_lightning", 4), "setup", "family")
    assert "'qwen_lightning'" in text and "qwen_image_lightning" in text


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


# ------------------------------------------------------------------ flow presets on trained digit models of each family

PRESET_MODELS = [("wan_lightning", "wan21", 4), ("qwen_image_lightning", "qwen_image", 4),
                 ("qwen_image_lightning", "qwen_image", 8), ("z_image_turbo", "lumina2", 8),
                 ("flux_schnell", "flux", 4), ("sd35_turbo", "sd3", 4)]
BATCH = 2


def _node_defaults(node_id):
    import nodes
    inputs = nodes.NODE_CLASS_MAPPINGS[node_id].define_schema().inputs
    return {i.id: i.default for i in inputs if getattr(i, "default", None) is not None}


def _preset_graph(family, architecture, steps, caches=(), cfg=None):
    """Digit Model -> Distilled Model Setup -> (a cache at its defaults ->) call counter -> SamplerCustom, whose cfg is
    the setup's cfg output unless `cfg` is given: node "out" uncached, "out_<cache>" through each cache in `caches`,
    all from the same noise."""
    graph = {
        "model": {"class_type": "QuickstepDigitModel", "inputs": {"prediction": "auto", "architecture": architecture}},
        "setup": {"class_type": "QuickstepDistilledSetup",
                  "inputs": {"model": ["model", 0], "family": family, "steps": steps, "gamma": 0.3}},
        "positive": {"class_type": "QuickstepDigitConditioning", "inputs": {"digits": "37"}},
        "negative": {"class_type": "QuickstepDigitConditioning", "inputs": {"digits": ""}},
        "latent": {"class_type": "QuickstepEmptyDigitLatent",
                   "inputs": {"batch_size": BATCH, "architecture": architecture}},
    }
    for name, node_id in (("", None), *caches):
        model = ["setup", 0]
        if node_id:
            graph[f"cache{name}"] = {"class_type": node_id, "inputs": {**_node_defaults(node_id), "model": model}}
            model = [f"cache{name}", 0]
        graph[f"count{name}"] = {"class_type": "QuickstepTestCountCalls", "inputs": {"model": model}}
        graph[f"out{name}"] = {"class_type": "SamplerCustom",
                               "inputs": {"model": [f"count{name}", 0], "add_noise": True, "noise_seed": 3,
                                          "cfg": ["setup", 3] if cfg is None else cfg, "positive": ["positive", 0],
                                          "negative": ["negative", 0], "sampler": ["setup", 1],
                                          "sigmas": ["setup", 2], "latent_image": ["latent", 0]}}
        graph[f"keep{name}"] = sink(f"out{name}")
    return graph


def _counts(inproc, result, node):
    return inproc.output(result, node).model_options["transformer_options"]["quickstep_test_calls"]


def _block_cache_fits(architecture):
    """Whether the Block Cache at its defaults (one front and one back block live) has blocks left to cache."""
    import sys

    import nodes
    from modelzoo import digit_models
    caching = sys.modules[nodes.NODE_CLASS_MAPPINGS["QuickstepBlockCache"].__module__]
    layout = caching._dit_layout(digit_models.build_base_model(architecture).diffusion_model)
    return layout is not None and len(layout) > 2


@pytest.mark.parametrize("family,architecture,steps", PRESET_MODELS)
def test_flow_presets_sample_at_cfg_1_with_one_pass_per_step_and_caches_at_defaults_back_off(
        inproc, family, architecture, steps):
    """The setup's cfg output takes the host's cfg-1 path: each step computes the positive's rows only (a CFG
    sampler would compute the negative's too). A cache at its defaults sees a schedule of <= 8 steps and computes
    every step: the same latent as uncached, bit for bit."""
    import sys

    import nodes
    caches = [("_model", "QuickstepModelCache")]
    if _block_cache_fits(architecture):
        caches.append(("_block", "QuickstepBlockCache"))
    summaries = sys.modules[nodes.NODE_CLASS_MAPPINGS["QuickstepModelCache"].__module__].LAST_SUMMARY
    summaries.clear()
    result = inproc.run(_preset_graph(family, architecture, steps, caches))
    assert inproc.output(result, "setup", 3) == 1.0
    assert torch.equal(inproc.output(result, "setup", 2), qd.flow_preset_sigmas(qd.FAMILIES[family], steps))
    assert _counts(inproc, result, "count") == {"n": steps, "rows": steps * BATCH}
    plain = inproc.output(result, "out")["samples"]
    assert torch.isfinite(plain).all()
    for name, _ in caches:
        assert torch.equal(inproc.output(result, f"out{name}")["samples"], plain), name
        assert _counts(inproc, result, f"count{name}")["rows"] == steps * BATCH, name
    assert {cache: summaries[cache]["few_step"] for cache in summaries} == \
        {"ModelCache": True, **({"BlockCache": True} if len(caches) > 1 else {})}


def test_the_call_counter_sees_the_negative_pass_at_another_cfg(inproc):
    """The contrast for the test above: the same preset sampled at cfg 2 computes twice the rows."""
    result = inproc.run(_preset_graph("flux_schnell", "flux", 4, cfg=2.0))
    assert _counts(inproc, result, "count") == {"n": 4, "rows": 2 * 4 * BATCH}
