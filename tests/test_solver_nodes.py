"""The learned-solver nodes in the real host: Optimize Solver For My Model on the exact oracle (a SAMPLER + SIGMAS the
host samples with, never worse than its start on validation, cached), save / load with the model check, the text
round trip, and clear errors naming the node and the value."""
import json
import shutil

import pytest
import torch

from graphs import oracle_sampling_graph, sink
from modelzoo.gmm import exact_ode_solution


def _optimize_node(steps=4, teacher_steps=40, family_model="model"):
    return {"class_type": "QuickstepOptimizeSolver",
            "inputs": {"model": [family_model, 0], "positive": ["cond", 0], "negative": ["cond", 0],
                       "latent_image": ["latent", 0], "steps": steps, "cfg": 1.0, "trajectories": 12,
                       "teacher_steps": teacher_steps, "max_fits": 8, "training_seed": 11}}


def _solver_graph(family, steps=4):
    graph = oracle_sampling_graph(family, seed=3, batch=8, sigmas_node=_optimize_node(steps))
    graph["sampler"] = {"class_type": "QuickstepSolverFromText", "inputs": {"solver_text": ["sigmas", 2]}}
    graph["out"]["inputs"]["sigmas"] = ["sigmas", 1]
    return graph


def _error(inproc, result, sigmas):
    import comfy.sample
    sampled = inproc.output(result, "out")["samples"].double()
    patcher = inproc.output(result, "model")
    noise = comfy.sample.prepare_noise(torch.zeros(sampled.shape), 3)
    x_start = patcher.model.model_sampling.noise_scaling(sigmas[0], noise, torch.zeros(sampled.shape),
                                                         max_denoise=True).double()
    exact = exact_ode_solution(patcher.model.diffusion_model.gmm, x_start, float(sigmas[0]),
                               flow=patcher.model.diffusion_model.flow)
    return (sampled - exact).pow(2).flatten(1).mean(1).sqrt().mean().item()


@pytest.fixture()
def fresh_cache(host_base):
    cache = host_base / "models" / "quickstep_schedules" / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    return cache


@pytest.mark.parametrize("family", ["eps", "flow"])
def test_optimize_solver_node_samples_and_is_never_worse_than_its_start_on_validation(inproc, family, fresh_cache):
    result = inproc.run(_solver_graph(family))
    sigmas = inproc.output(result, "sigmas", 1)
    assert sigmas.shape[0] == 5 and (sigmas[1:] < sigmas[:-1]).all() and sigmas[-1] == 0
    assert torch.isfinite(inproc.output(result, "out")["samples"]).all()
    assert any(node == "sigmas" for node, _, _ in result.progress())
    cached = list(fresh_cache.glob("solver-*.json"))
    assert len(cached) == 1
    record = json.loads(cached[0].read_text())
    assert record["result"]["objective_after"] <= record["result"]["objective_before"]
    assert record["sigmas"] == pytest.approx(sigmas.tolist(), rel=1e-6)
    learned = _error(inproc, result, sigmas)
    start = inproc.run(oracle_sampling_graph(family, "qs_dpmpp_3m", seed=3, batch=8, sigmas_node={
        "class_type": "QuickstepSigmasFromText",
        "inputs": {"sigmas": ", ".join(str(s) for s in record["result"]["initial_sigmas"])}}))
    print(f"{family}: learned {learned:.4f} vs DPM-Solver++(3M) on its start {_error(inproc, start, sigmas):.4f}")
    again = inproc.run(_solver_graph(family))                     # from the cache: the same solver
    assert torch.equal(inproc.output(again, "out")["samples"], inproc.output(result, "out")["samples"])
    assert len(list(fresh_cache.glob("solver-*.json"))) == 1


def test_save_load_round_trip_checks_the_model_and_family(inproc, fresh_cache):
    graph = _solver_graph("flow", steps=3)
    graph["other"] = {"class_type": "QuickstepTestOracle", "inputs": {"family": "eps", "mixture_seed": 0}}
    graph["save"] = {"class_type": "QuickstepSaveSolver",
                     "inputs": {"solver_text": ["sigmas", 2], "model": ["model", 0], "name": "qs_test_solver"}}
    graph["keep_save"] = sink("save")
    first = inproc.run(graph)
    load = {"model": {"class_type": "QuickstepTestOracle", "inputs": {"family": "flow", "mixture_seed": 0}},
            "load": {"class_type": "QuickstepLoadSolver",
                     "inputs": {"model": ["model", 0], "name": "qs_test_solver", "force": False}},
            "keep": sink("load", 2)}
    loaded = inproc.run(load)
    assert inproc.output(loaded, "load", 2) == inproc.output(first, "sigmas", 2)
    assert torch.equal(inproc.output(loaded, "load", 1), inproc.output(first, "sigmas", 1))
    load["model"]["inputs"]["family"] = "eps"
    refused = inproc.run(load, check=False)
    assert refused.status == "error"
    message = refused.error()["exception_message"]
    assert "Load Solver" in message and "flow" in message and "force" in message
    load["load"]["inputs"]["force"] = True
    assert inproc.run(load, check=False).status == "success"
    graph["save"]["inputs"]["model"] = ["other", 0]            # a flow solver saved for an eps model
    failed = inproc.run(graph, check=False)
    assert failed.status == "error" and "Save Solver" in failed.error()["exception_message"]


def test_learned_sampler_refuses_other_sigmas(inproc, fresh_cache):
    graph = _solver_graph("flow", steps=3)
    graph["scheduler"] = {"class_type": "BasicScheduler",
                          "inputs": {"model": ["model", 0], "scheduler": "simple", "steps": 3, "denoise": 1.0}}
    graph["out"]["inputs"]["sigmas"] = ["scheduler", 0]
    result = inproc.run(graph, check=False)
    assert result.status == "error"
    message = result.error()["exception_message"]
    assert "Solver From Text" in message and "not the ones this solver was learned for" in message


@pytest.mark.parametrize("change,problem", [({"steps": 12, "teacher_steps": 10}, "steps = 12 cannot be reached"),
                                            ({"cfg": float("nan")}, "cfg = nan")])
def test_bad_optimize_input_names_node_and_value(inproc, change, problem):
    node = _optimize_node()
    node["inputs"].update(change)
    graph = oracle_sampling_graph("flow", seed=3, batch=2, sigmas_node=node)
    graph["out"]["inputs"]["sigmas"] = ["sigmas", 1]
    result = inproc.run(graph, check=False)
    assert result.status == "error"
    message = result.error()["exception_message"]
    assert "Optimize Solver For My Model" in message and problem in message


@pytest.mark.parametrize("text,problem", [("{", "not JSON"), ('{"sigmas": [1, 0]}', "not a learned solver"),
                                          ('{"sigmas": [1, 0.5, 0], "coefficients": [[0.5], [1, 2, 3]], '
                                           '"flow": true}', "step 1 needs 1 to 2")])
def test_bad_solver_text_names_node_and_value(inproc, text, problem):
    graph = {"text": {"class_type": "QuickstepSolverFromText", "inputs": {"solver_text": text}},
             "keep": sink("text", 1)}
    result = inproc.run(graph, check=False)
    assert result.status == "error"
    message = result.error()["exception_message"]
    assert "Solver From Text" in message and problem in message
