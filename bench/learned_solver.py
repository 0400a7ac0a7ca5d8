"""Learned-solver benchmark: the solver 'Optimize Solver For My Model' learns, against the host's best
sampler + scheduler pair at the same number of model calls, on noises (and, for the digit models, digits) the
optimization never saw.

Per model and budget: the host's best (bench.solvers' sweep over the host's ODE samplers and schedulers, the best
pair picked on the evaluation noises themselves, an optimistic baseline), DPM-Solver++(3M) on the stock schedule
the learned solver starts from, and the learned solver (optimized as the node does it, from `--trajectories`
noises of another seed, a third held out, and on the digit models only digits 0-6, so 7-9 are unseen), with its
optimization wall time. Error: mean over the evaluation noises of the per-noise RMS against the exact ODE solution
(oracle) or a `--reference-steps` DPM-Solver++(2M) solution from the same noise (digit models, CFG 2); model calls
counted. With `--fd-samples N` (digit models): Frechet distance on MNIST-classifier features (bench.distilled) of N
samples from the learned solver at the largest budget, from DPM-Solver++(2M) at 20 steps, and from the host's best
pair at that budget, each against the 4,500 training digits.

usage: python -m bench.learned_solver [--families digits digits-flow eps flow] [--nfe 4 5] [--samples 32]
                                      [--trajectories 24] [--max-fits 16] [--reference-steps 200]
                                      [--fd-samples 500] [--host-samplers ...] [--host-schedulers ...]
Writes bench/results/learned_solver.json and prints one markdown table per model.
"""
import argparse
import json
import time
from pathlib import Path

import torch

from bench.schedules import pack_module
# imported before the host starts: ComfyUI then puts comfy/ first on sys.path, where comfy/samplers.py shadows ours
from samplers.frame import is_flow
from bench.solvers import RESULTS, CountedModel, benchmark, family_case, schedule, start_host

TRAINING_SEED = 99
TRAINING_DIGITS = tuple(range(7))
# The host samplers and schedulers that were best somewhere in bench.solvers' full sweeps (README); --host-samplers
# with every name of bench.solvers.HOST_ODE_SAMPLERS runs the full sweep.
HOST_SAMPLERS = ("gradient_estimation", "ipndm_v", "dpmpp_2m", "uni_pc", "uni_pc_bh2", "res_multistep", "deis")
HOST_SCHEDULERS = ("simple", "normal", "beta", "karras", "exponential", "kl_optimal")


def training_conditioning(case, trajectories):
    """The conditioning the optimizer learns with: the digit models draw digits 0-6 only; the oracle its own."""
    if not case.name.startswith("digits"):
        return case.positive, case.negative
    from modelzoo import mnist_unet
    digits = [TRAINING_DIGITS[i % len(TRAINING_DIGITS)] for i in range(trajectories)]
    return mnist_unet.digit_conditioning(digits), mnist_unet.unconditional_conditioning(trajectories)


def sample_with(case, solver_node, solver, noise, positive, negative):
    """Samples through the host's sampling path with the learned solver's SAMPLER; (samples, counted calls)."""
    import comfy.sample
    counted = CountedModel(case.model)
    sampler = solver_node.learned_sampler("bench", solver)
    latent = torch.zeros_like(noise) if case.latent is None else case.latent.expand_as(noise)
    out = comfy.sample.sample_custom(counted.patcher, noise, case.cfg, sampler,
                                     torch.tensor(solver.sigmas, dtype=torch.float32), positive, negative, latent,
                                     disable_pbar=True, seed=0)
    return out.double(), counted.calls


def rms(out, reference):
    return (out - reference).pow(2).flatten(1).mean(1).sqrt().mean().item()


def learned_rows(case, solver_node, nfe, args, log):
    positive, negative = training_conditioning(case, args.trajectories)
    latent = {"samples": torch.zeros_like(case.noise[:1]) if case.latent is None else case.latent}
    started = time.perf_counter()
    solver, info = solver_node.learn_for_model(case.model, positive, negative, case.cfg, latent, nfe,
                                               args.trajectories, args.teacher_steps, args.max_fits, TRAINING_SEED)
    optimize_s = time.perf_counter() - started
    out, calls = sample_with(case, solver_node, solver, case.noise, case.positive, case.negative)
    learned = {"error": rms(out, case.reference(torch.tensor(solver.sigmas))), "nfe": calls,
               "optimize_s": optimize_s, "sigmas": [round(s, 5) for s in solver.sigmas],
               "validation": [info["objective_before"], info["objective_after"]], "fits": info["fits"],
               "stopped": info["stopped"]}
    initial = torch.tensor(info["initial_sigmas"], dtype=torch.float32)
    from bench.solvers import run_sampler
    base_out, base_calls = run_sampler(case.model, "qs_dpmpp_3m", initial, case.noise, case.positive, case.negative,
                                       case.cfg, case.latent)
    base = {"error": rms(base_out, case.reference(initial)), "nfe": base_calls,
            "sigmas": [round(float(s), 5) for s in initial]}
    log(f"  {case.name} nfe={nfe}: learned {learned['error']:.4f} ({calls} calls, {optimize_s:.0f} s), "
        f"3M on its start {base['error']:.4f}")
    return solver, learned, base


def frechet_rows(case, solver_node, solver, best_host, samples, log):
    """FD of `samples` digits (0-9 in turn, noise seed 1000) from the learned solver, 20-step 2M and the host's
    best pair at the learned solver's budget."""
    import comfy.sample
    import comfy.samplers
    from bench.distilled import classifier, features, frechet
    from bench.solvers import run_sampler
    from modelzoo import digit_models, mnist_unet
    net = classifier()
    train_pixels, _, _, _ = mnist_unet.mnist_split()
    reference = features(net, torch.as_tensor(train_pixels) / 255.0)
    flow = is_flow(case.model.get_model_object("model_sampling"))
    configs = {"learned solver": None,
               "DPM-Solver++(2M), 20 steps": ("dpmpp_2m", schedule(case.model, "simple" if flow else "karras", 20)),
               f"host best ({best_host['sampler']} / {best_host['scheduler']})":
                   (best_host["sampler"], schedule(case.model, best_host["scheduler"], best_host["steps"]))}
    rows = {}
    for name, config in configs.items():
        outs = []
        for start in range(0, samples, 100):
            digits = [i % 10 for i in range(start, min(start + 100, samples))]
            noise = comfy.sample.prepare_noise(torch.zeros(len(digits), *case.noise.shape[1:]), 1000 + start)
            positive = mnist_unet.digit_conditioning(digits)
            negative = mnist_unet.unconditional_conditioning(len(digits))
            if config is None:
                out, _ = sample_with(case, solver_node, solver, noise, positive, negative)
            else:
                out, _ = run_sampler(case.model, config[0], config[1], noise, positive, negative, case.cfg,
                                     case.latent)
            outs.append(out)
        rows[name] = frechet(features(net, digit_models.latent_to_digits(torch.cat(outs))), reference)
        log(f"  {case.name} FD {name}: {rows[name]:.2f} (N = {samples})")
    return rows


def best_host_pair(table, nfe):
    pairs = [(row[nfe]["error"], name, row[nfe]) for name, row in table.items() if row.get(nfe)]
    error, name, row = min(pairs, key=lambda p: p[0])
    return {"sampler": name, "scheduler": row["scheduler"], "steps": row["steps"], "nfe": row["nfe"], "error": error}


def markdown(name, rows, samples):
    lines = [f"**{name}**, {samples} evaluation noises: error (ratio to the host's best pair)", "",
             "| NFE | host's best pair | DPM-Solver++(3M), start schedule | learned solver | optimization |",
             "|---|---|---|---|---|"]
    for nfe, row in rows.items():
        host, base, learned = row["host best"], row["3m start"], row["learned"]
        lines.append(f"| {nfe} | {host['sampler']} / {host['scheduler']}: {host['error']:.4f} | "
                     f"{base['error']:.4f} ({base['error'] / host['error']:.2f}x) | "
                     f"**{learned['error']:.4f} ({learned['error'] / host['error']:.2f}x)** | "
                     f"{learned['optimize_s']:.0f} s, {learned['fits']} passes |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", default=["digits-flow", "digits", "eps", "flow"])
    parser.add_argument("--nfe", type=int, nargs="+", default=[4, 5])
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--trajectories", type=int, default=24, help="the node's default")
    parser.add_argument("--teacher-steps", type=int, default=40, help="the node's default")
    parser.add_argument("--max-fits", type=int, default=16, help="the node's default")
    parser.add_argument("--reference-steps", type=int, default=200, help="the digit models' 2M reference steps")
    parser.add_argument("--fd-samples", type=int, default=0, help="Frechet distance sample count (digit models)")
    parser.add_argument("--host-samplers", nargs="+", default=list(HOST_SAMPLERS))
    parser.add_argument("--host-schedulers", nargs="+", default=list(HOST_SCHEDULERS))
    parser.add_argument("--out", default=str(RESULTS / "learned_solver.json"))
    args = parser.parse_args(argv)

    base = start_host()
    solver_node = pack_module(base, "nodes.solver")
    results, t0 = {}, time.time()
    for family in args.families:
        case = family_case(family, args.samples, args.reference_steps)
        if case is None:
            print(f"skipping {family}: no trained weights")
            continue
        table = benchmark(case, args.host_samplers, args.host_schedulers, args.nfe, print)
        rows, solvers = {}, {}
        for nfe in args.nfe:
            solvers[nfe], learned, start = learned_rows(case, solver_node, nfe, args, print)
            rows[nfe] = {"host best": best_host_pair(table, nfe), "3m start": start, "learned": learned}
        if args.fd_samples and family.startswith("digits"):
            top = max(args.nfe)
            rows[top]["frechet"] = frechet_rows(case, solver_node, solvers[top], rows[top]["host best"],
                                                args.fd_samples, print)
        results[case.name] = rows
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"args": vars(args), "results": results, "wall_s": time.time() - t0},
                                             indent=1))
    for name, rows in results.items():
        print(markdown(name, rows, args.samples), "\n")
        for nfe, row in rows.items():
            if "frechet" in row:
                print(f"{name} Frechet distance (N = {args.fd_samples}):",
                      ", ".join(f"{k} {v:.2f}" for k, v in row["frechet"].items()))
    print(f"wrote {args.out} in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
