"""Solver-accuracy benchmark: error against the exact ODE solution at a fixed NFE budget, NFE counted.

For every deterministic sampler in the host's list (ComfyUI's built-ins, its SDE samplers at eta 0 through their own
nodes, and Quickstep's qs_ entries) and every
scheduler of the host's list, the steps are chosen so that the counted number of model calls is at most the budget;
the sampler's error is that of its best scheduler. Models: the exact Gaussian-mixture oracle for the EPS, V and
flow families (error against the exact ODE solution), and the trained digit models of modelzoo/digit_models.py
("digits": the SD1.5 eps UNet, "digits-flow": its rectified-flow twin, "digits-<architecture>": the others; error
against a 500-step DPM-Solver++(2M) reference from the same noise). Noises from bench.protocol.TEST_SEED unless
--seed says otherwise.

usage: python -m bench.solvers [--nfe 3 4 5 6 8 10] [--samples 16] [--seed N] [--reference-steps 500]
                              [--families eps v flow digits digits-flow digits-sdxl digits-sd3 digits-flux
                                          digits-qwen_image digits-lumina2 digits-wan21] [--samplers ...]
Writes bench/results/solvers.json and prints a markdown table with each sampler's ratio to the best host built-in.
Schedules optimized for the model (LD3, OSS, ...) are compared in bench.schedules.
"""
import argparse
import json
import logging
import math
import time
from pathlib import Path

import torch

from bench.protocol import TEST_SEED
from testbed.host import HOST_DIR, PACK_DIR

# Built-in samplers whose result is a deterministic function of the starting noise (ODE solvers).
HOST_ODE_SAMPLERS = ("euler", "heun", "heunpp2", "dpm_2", "lms", "dpm_fast", "dpmpp_2m", "ipndm", "ipndm_v", "deis",
                     "res_multistep", "gradient_estimation", "ddim", "uni_pc", "uni_pc_bh2")
# The host's SDE samplers at eta 0 are ODE solvers of their own (2S, 3M, SA-Solver, ER): each is built through the
# host's own node with its defaults and eta 0, the condition its authors give for deterministic sampling.
# name in the tables -> (host node id, node inputs); SamplerEulerAncestral at eta 0 is plain euler, already listed.
HOST_ETA0_SAMPLERS = {
    "dpmpp_2s_ancestral(eta=0)": ("SamplerDPMPP_2S_Ancestral", {"eta": 0.0, "s_noise": 1.0}),
    "dpmpp_sde(eta=0)": ("SamplerDPMPP_SDE", {"eta": 0.0, "s_noise": 1.0, "r": 0.5, "noise_device": "cpu"}),
    "dpmpp_2m_sde_midpoint(eta=0)": ("SamplerDPMPP_2M_SDE", {"solver_type": "midpoint", "eta": 0.0, "s_noise": 1.0,
                                                             "noise_device": "cpu"}),
    "dpmpp_2m_sde_heun(eta=0)": ("SamplerDPMPP_2M_SDE", {"solver_type": "heun", "eta": 0.0, "s_noise": 1.0,
                                                         "noise_device": "cpu"}),
    "dpmpp_3m_sde(eta=0)": ("SamplerDPMPP_3M_SDE", {"eta": 0.0, "s_noise": 1.0, "noise_device": "cpu"}),
    "er_sde(ODE)": ("SamplerER_SDE", {"solver_type": "ODE", "max_stage": 3, "eta": 0.0, "s_noise": 1.0}),
    "sa_solver(eta=0)": ("SamplerSASolver", {"eta": 0.0, "sde_start_percent": 0.2, "sde_end_percent": 0.8,
                                             "s_noise": 1.0, "predictor_order": 3, "corrector_order": 4,
                                             "use_pece": False, "simple_order_2": False}),
}
RESULTS = PACK_DIR / "bench" / "results"
STEPS_PER_CALL_CAP = 4        # probe schedules up to this many steps per call of the largest budget (PFDiff k=2: 3)


class CountedModel:
    """Counts sampler-level model calls (one per CFG-combined prediction) with a PREDICT_NOISE wrapper."""

    def __init__(self, patcher):
        import comfy.patcher_extension
        self.calls = 0
        self.patcher = patcher.clone()

        def count(executor, *args, **kwargs):
            self.calls += 1
            return executor(*args, **kwargs)
        self.patcher.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.PREDICT_NOISE, "quickstep_bench", count)


def sampler_object(model, sampler_name):
    """The host SAMPLER of a table name: a stock-list name, or a HOST_ETA0_SAMPLERS entry built by its host node."""
    import comfy.samplers
    if sampler_name not in HOST_ETA0_SAMPLERS:
        return comfy.samplers.sampler_object(sampler_name)
    import nodes
    node_id, inputs = HOST_ETA0_SAMPLERS[sampler_name]
    node = nodes.NODE_CLASS_MAPPINGS[node_id]
    if any(i.id == "model" for i in node.define_schema().inputs):
        inputs = dict(inputs, model=model)
    out = node.execute(**inputs)
    return getattr(out, "result", out)[0]


def run_sampler(model, sampler_name, sigmas, noise, positive, negative, cfg, latent=None):
    """Sample through the host's own sampling path from `latent` (default zeros); returns (samples, counted NFE)."""
    import comfy.sample
    counted = CountedModel(model)
    sampler = sampler_object(model, sampler_name)
    latent = torch.zeros_like(noise) if latent is None else latent.expand_as(noise)
    out = comfy.sample.sample_custom(counted.patcher, noise, cfg, sampler, sigmas, positive, negative, latent,
                                     disable_pbar=True, seed=0)
    return out.double(), counted.calls


def schedule(model, scheduler, steps):
    import comfy.samplers
    return comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), scheduler, steps).cpu()


def calls_by_steps(model, sampler_name, scheduler, max_calls, probe):
    """{steps: counted NFE} for 1, 2, ... steps until the count passes max_calls (probing on a one-sample batch):
    samplers that spend fewer calls than steps (PFDiff, the few-step options) get the longer schedules their
    budget allows. Left out: steps that cannot run, and schedules that do not start at the model's sigma_max (a
    full denoise from a lower sigma solves an easier problem and would look more accurate than it is)."""
    sigma_max = float(model.get_model_object("model_sampling").sigma_max)
    counted = {}
    for steps in range(1, STEPS_PER_CALL_CAP * max_calls + 1):
        try:
            sigmas = schedule(model, scheduler, steps)
            if float(sigmas[0]) < 0.999 * sigma_max:
                continue
            _, counted[steps] = probe(sampler_name, sigmas)
        except Exception:   # a scheduler or sampler that cannot run this few steps
            continue
        if counted[steps] > max_calls:
            break
    return counted


class Case:
    """A model, its conditioning, noises and an exact (or converged) reference per starting sigma."""

    def __init__(self, name, model, positive, negative, cfg, noise, reference_fn, latent=None):
        self.name, self.model, self.positive, self.negative, self.cfg = name, model, positive, negative, cfg
        self.noise, self.latent = noise, latent
        self._reference_fn = reference_fn
        self._references = {}

    def reference(self, sigmas):
        key = round(float(sigmas[0]), 6)
        if key not in self._references:
            self._references[key] = self._reference_fn(self, sigmas)
        return self._references[key]

    def error(self, sampler_name, sigmas):
        out, calls = run_sampler(self.model, sampler_name, sigmas, self.noise, self.positive, self.negative, self.cfg,
                                 self.latent)
        ref = self.reference(sigmas)
        return (out - ref).pow(2).flatten(1).mean(1).sqrt().mean().item(), calls


def oracle_case(family, samples, seed=TEST_SEED):
    from modelzoo.gmm import exact_ode_solution
    from modelzoo.oracle_host import ORACLE_SHAPE, build_oracle
    from modelzoo.tiny_host import tiny_conditioning
    import comfy.sample

    model = build_oracle(family)
    noise = comfy.sample.prepare_noise(torch.zeros(samples, *ORACLE_SHAPE), seed)
    cond = tiny_conditioning("sd15", 0)

    def reference(case, sigmas):
        ms = model.get_model_object("model_sampling")
        x_start = ms.noise_scaling(sigmas[0], case.noise, torch.zeros_like(case.noise), max_denoise=True)
        return exact_ode_solution(model.model.diffusion_model.gmm, x_start.double(), float(sigmas[0]),
                                  flow=family == "flow")
    return Case(f"oracle-{family}", model, cond, cond, 1.0, noise, reference)


def digits_case(samples, family="digits", reference_steps=500, seed=TEST_SEED):
    """A trained digit model of the zoo (modelzoo/digit_models.py) as a benchmark case: "digits" / "digits-flow" are
    the SD1.5 eps / flow UNets, "digits-<architecture>" the others. Digits 0-9 in turn, CFG 2 against the empty
    digit, from the family's blank latent; the reference is DPM-Solver++(2M) with `reference_steps` log-spaced steps
    down to the model's own sigma_min. None when the weights are absent."""
    from modelzoo import digit_models
    import comfy.sample
    name, prediction = {"digits": ("sd15", "eps"), "digits-flow": ("sd15", "flow")}.get(
        family, (family[len("digits-"):], None))
    if not digit_models.weights_path(name, prediction).exists():
        return None
    model = digit_models.load_digit_model(name, prediction)
    digits = [i % 10 for i in range(samples)]
    latent = digit_models.empty_latent(name, 1)
    noise = comfy.sample.prepare_noise(torch.zeros(samples, *latent.shape[1:]), seed)
    positive = digit_models.digit_conditioning(digits)
    negative = digit_models.unconditional_conditioning(samples)

    def reference(case, sigmas):
        # Down to the model's own sigma_min whatever the evaluated schedule's last sigma: the reference is cached per
        # start sigma and must not favour the schedule that happened to be evaluated first.
        sigma_min = float(model.get_model_object("model_sampling").sigma_min)
        ref_sigmas = torch.cat([torch.exp(torch.linspace(math.log(float(sigmas[0])), math.log(sigma_min),
                                                         reference_steps)), sigmas.new_zeros(1)])
        out, _ = run_sampler(model, "dpmpp_2m", ref_sigmas, case.noise, case.positive, case.negative, case.cfg,
                             case.latent)
        return out
    return Case(family, model, positive, negative, 2.0, noise, reference, latent=latent)


def start_host(base=None):
    """Loads the host and the pack in this process (registers the qs_ samplers); returns the host's base folder
    (default HOST_DIR/benchbase; another one keeps benches of other checkouts from relinking this one's pack)."""
    from testbed.inproc import InProcessHost
    logging.disable(logging.WARNING)          # the host's start-up warnings (torchaudio absent) are not ours
    base = Path(base) if base is not None else HOST_DIR / "benchbase"
    InProcessHost(base)
    torch.set_grad_enabled(False)
    return base


def family_case(family, samples, reference_steps=500, seed=TEST_SEED):
    """The benchmark case of a --families entry: the oracle's "eps" / "v" / "flow", or a trained digit model
    ("digits", "digits-flow", "digits-<architecture>"; None when its weights are absent); `reference_steps`: the
    digit models' DPM-Solver++(2M) reference; `seed`: the noises (bench.protocol)."""
    if family.startswith("digits"):
        return digits_case(samples, family, reference_steps, seed)
    return oracle_case(family, samples, seed)


def benchmark(case, samplers, schedulers, budgets, log):
    """{sampler: {nfe: {"error", "scheduler", "steps", "nfe"}}} with each sampler's best scheduler per budget."""
    one = {"noise": case.noise[:1]}

    def probe(sampler_name, sigmas):
        return run_sampler(case.model, sampler_name, sigmas, one["noise"], case.positive, case.negative, case.cfg,
                           case.latent)

    table = {}
    for sampler_name in samplers:
        table[sampler_name] = {nfe: None for nfe in budgets}
        for scheduler in schedulers:
            counted = calls_by_steps(case.model, sampler_name, scheduler, max(budgets), probe)
            errors = {}
            for nfe in budgets:
                fitting = [steps for steps, calls in counted.items() if calls <= nfe]
                if not fitting:
                    continue
                steps = max(fitting, key=lambda st: (counted[st], st))
                if steps not in errors:
                    errors[steps] = case.error(sampler_name, schedule(case.model, scheduler, steps))
                err, calls = errors[steps]
                best = table[sampler_name][nfe]
                if math.isfinite(err) and (best is None or err < best["error"]):
                    table[sampler_name][nfe] = {"error": err, "scheduler": scheduler, "steps": steps, "nfe": calls}
        log(f"  {case.name} {sampler_name}: " + ", ".join(
            f"{n}:{v['error']:.4f}" if v else f"{n}:-" for n, v in table[sampler_name].items()))
    return table


def markdown(case_name, table, budgets):
    host = [s for s in table if not s.startswith("qs_")]
    lines = [f"### {case_name}", "", "| sampler | " + " | ".join(f"{n} NFE" for n in budgets) + " |",
             "|---|" + "---|" * len(budgets)]
    best_host = {n: min((table[s][n]["error"] for s in host if table[s][n]), default=float("nan")) for n in budgets}
    for sampler_name, row in table.items():
        cells = []
        for n in budgets:
            v = row[n]
            cells.append("-" if v is None else f"{v['error']:.4f} ({v['error'] / best_host[n]:.2f}x, {v['scheduler']})")
        lines.append(f"| {sampler_name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nfe", type=int, nargs="+", default=[3, 4, 5, 6, 8, 10])
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--families", nargs="+", default=["eps", "v", "flow", "digits", "digits-flow"])
    parser.add_argument("--samplers", nargs="+", default=None, help="default: host ODE samplers + every qs_ sampler")
    parser.add_argument("--schedulers", nargs="+", default=None, help="default: the host's scheduler list")
    parser.add_argument("--seed", type=int, default=TEST_SEED, help="noise seed (bench.protocol: TEST_SEED reports, "
                        "TUNING_SEED tunes)")
    parser.add_argument("--reference-steps", type=int, default=500)
    parser.add_argument("--out", default=str(RESULTS / "solvers.json"))
    args = parser.parse_args(argv)

    start_host()
    import comfy.samplers
    samplers = args.samplers or [*HOST_ODE_SAMPLERS, *HOST_ETA0_SAMPLERS,
                                 *(s for s in comfy.samplers.KSampler.SAMPLERS if s.startswith("qs_"))]
    schedulers = args.schedulers or list(comfy.samplers.SCHEDULER_NAMES)
    results, t0 = {}, time.time()
    for family in args.families:
        case = family_case(family, args.samples, args.reference_steps, args.seed)
        if case is None:
            print(f"skipping {family}: no trained weights")
            continue
        results[case.name] = benchmark(case, samplers, schedulers, args.nfe, print)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"nfe": args.nfe, "samples": args.samples, "seed": args.seed, "results": results,
                   "wall_s": time.time() - t0}, f, indent=1)
    for name, table in results.items():
        print(markdown(name, table, args.nfe), "\n")
    print(f"wrote {args.out} in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
