"""Foundation: the pack loads in the real host, the test bed's oracle is exact through the host's own apply_model,
and its reference ODE solution is converged."""
import re
from pathlib import Path

import torch

from graphs import oracle_sampling_graph, sink
from modelzoo.gmm import GaussianMixture, exact_ode_solution


def _pack_module_pattern(server):
    """The pack's module path as the host's load messages print it, not followed by a deeper path or a longer name."""
    return re.compile(re.escape(str(server.base / "custom_nodes" / "quickstep")) + r"(?![\w/.-])")


def test_pack_loads_without_import_errors(client, server):
    info = client.object_info()
    ours = sorted(name for name in info if name.startswith("Quickstep") and not name.startswith("QuickstepTest"))
    assert ours, "no Quickstep node registered"
    for name in ours:
        node = info[name]
        assert node["category"].startswith("Quickstep/"), (name, node["category"])
        assert node["description"], name
        for section in ("required", "optional"):
            for input_name, spec in node["input"].get(section, {}).items():
                assert len(spec) > 1 and spec[1].get("tooltip"), f"{name}.{input_name} has no tooltip"
    log = server.log()
    # the host's own messages for a custom node folder it did not load (nodes.py load_custom_node / init_*), for the
    # pack's own module path, not the word "quickstep": a checkout named quickstep holds the host itself, whose
    # comfy_extras failures (torchaudio) name paths under it; the session's server log also holds earlier tests'
    # prompts, whose errors may say anything
    load_failures = ("IMPORT FAILED", "Cannot import", "module for custom nodes due to")
    pack_module = _pack_module_pattern(server)
    failures = [line for line in log.splitlines()
                if pack_module.search(line) and any(message in line for message in load_failures)]
    assert not failures, failures


def test_pack_module_pattern_ignores_host_paths_under_a_quickstep_checkout(server):
    """The load-failure check above matches the pack's module, not a host file below a folder named quickstep."""
    pack = str(server.base / "custom_nodes" / "quickstep")
    pattern = _pack_module_pattern(server)
    assert pattern.search(f"Cannot import {pack} module for custom nodes: boom")
    assert pattern.search(f"   0.1 seconds (IMPORT FAILED): {pack}")
    assert not pattern.search(f"Cannot import {pack}/.host/ComfyUI/comfy_extras/nodes_audio.py module for custom nodes")
    assert not pattern.search(f"Cannot import {pack}_other module for custom nodes: boom")


def _oracle(inproc, family):
    result = inproc.run({"m": {"class_type": "QuickstepTestOracle", "inputs": {"family": family, "mixture_seed": 0}},
                          "keep": sink("m")})
    return inproc.output(result, "m")


def test_oracle_denoiser_is_exact_through_host_apply_model(inproc):
    x = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * 2
    import comfy.model_management
    for family, sigmas in (("eps", [0.03, 0.4, 2.0, 14.0]), ("v", [0.03, 0.4, 2.0, 14.0]),
                           ("flow", [0.01, 0.3, 0.7, 0.99])):
        patcher = _oracle(inproc, family)
        # load it as sampling does: a clone of the same model that an earlier graph patched (a distilled preset's
        # model_sampling) may still be the one applied to the shared network
        comfy.model_management.load_models_gpu([patcher])
        gmm = patcher.model.diffusion_model.gmm
        for s in sigmas:
            sigma = torch.full((3,), s)
            denoised = patcher.model.apply_model(x, sigma, transformer_options={"sigmas": sigma})
            exact = gmm.denoise(x.double(), sigma.double(), family == "flow")
            assert (denoised.double() - exact).abs().max() < 1e-4, (family, s)


def test_reference_solution_is_converged():
    gmm = GaussianMixture((4, 8, 8), seed=0)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for flow, sigma0, start in ((False, 14.6, x * (1 + 14.6 ** 2) ** 0.5), (True, 1.0 - 1e-9, x)):
        fine = exact_ode_solution(gmm, start, sigma0, flow=flow)
        coarse = exact_ode_solution(gmm, start, sigma0, flow=flow, rtol=1e-8, atol=1e-8)
        assert (fine - coarse).abs().max() < 1e-5
        assert torch.isfinite(fine).all() and fine.abs().max() > 0.1


def _initial_state(patcher, sigmas, seed, shape):
    import comfy.sample
    noise = comfy.sample.prepare_noise(torch.zeros(shape), seed)
    ms = patcher.model.model_sampling
    return ms.noise_scaling(sigmas[0], noise, torch.zeros(shape), max_denoise=True).double()


def test_host_euler_converges_to_reference_on_every_family(inproc):
    """Many-step host Euler through a real graph lands on the exact ODE solution: the bed can tell right from wrong."""
    for family in ("eps", "v", "flow"):
        errors = []
        for steps in (25, 100):
            result = inproc.run(oracle_sampling_graph(family, "euler", steps, scheduler="simple", seed=3))
            sampled = inproc.output(result, "out")["samples"].double()
            sigmas = inproc.output(result, "sigmas")
            patcher = inproc.output(result, "model")
            x_start = _initial_state(patcher, sigmas, 3, sampled.shape)
            exact = exact_ode_solution(patcher.model.diffusion_model.gmm, x_start, float(sigmas[0]),
                                       flow=family == "flow")
            errors.append((sampled - exact).pow(2).mean().sqrt().item())
        assert errors[1] < errors[0] / 2.5, (family, errors)   # first order: 4x steps, ~4x less error
        assert errors[1] < 0.05, (family, errors)


def test_http_server_runs_a_graph_with_progress(client):
    result = client.run(oracle_sampling_graph("flow", "euler", 6, seed=5))
    assert result.status == "success", result.error()
    steps = [value for node, value, total in result.progress() if node == "out"]
    # one event per step on 0.3.75; 0.33 throttles them but always sends the first and the last
    assert steps[0] == 1 and steps[-1] == 6 and steps == sorted(set(steps)), steps


def test_readme_lists_every_node(client):
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    ours = [name for name in client.object_info() if name.startswith("Quickstep") and
            not name.startswith("QuickstepTest")]
    missing = [name for name in ours if f"`{name}`" not in readme]
    assert not missing, f"README lacks {missing}"
    from samplers import SAMPLERS
    assert all(f"qs_{name}" in readme for name in SAMPLERS)
