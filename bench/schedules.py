"""Schedule-optimizer benchmark: one sampler at a fixed NFE on schedules from every source, error against the exact
ODE solution (oracle) or a 500-step reference (digit models), each as a ratio to the sampler's best stock schedule.

Rows per NFE budget:
- best stock: the best of the host's scheduler list (the pack's own qs_ schedulers left out) on the evaluation
  noises themselves, an optimistic baseline;
- the host's published tables that fit the model (AYS SD1 and GITS coeff 1.20 for an EPS model with the SD1.5
  sigma range; OSS FLUX / Wan / Chroma for flow models), through the host's own scheduler nodes;
- qs_dmn (data-free, order 2);
- nelder-mead (the node's former "ld3") / oss / gits / ays computed for the model exactly as the "Optimize Steps For My Model" node computes them
  (its defaults: 32 training noises of another seed than the evaluation noises, a 60-step teacher), with the
  optimization's wall time.

usage: python -m bench.schedules [--families eps flow digits digits-flow] [--nfe 4 5 6] [--samples 64]
                                [--sampler qs_dpmpp_2m] [--trajectories 32] [--methods nelder-mead oss gits ays]
                                [--reference-steps 500]
Writes bench/results/schedules.json and prints one markdown table per model.
"""
import argparse
import json
import time
from pathlib import Path

import torch

from bench.solvers import RESULTS, family_case, schedule, start_host

OPTIMIZERS = ("nelder-mead", "oss", "gits", "ays")


def pack_module(base, name):
    """A module of the pack as the host loaded it (custom node folders get path-derived module names)."""
    import sys
    return sys.modules[str(base / "custom_nodes" / "quickstep").replace(".", "_x_") + "." + name]


def host_tables(model_sampling, flow, steps):
    """{name: sigmas} of the host's published tables that were made for a model like this one."""
    from comfy_extras import nodes_align_your_steps, nodes_gits, nodes_optimalsteps
    sigma_max = float(model_sampling.sigma_max)
    if flow:
        found = {f"OSS {name}": nodes_optimalsteps.OptimalStepsScheduler.execute(name, steps, 1.0)
                 for name in nodes_optimalsteps.NOISE_LEVELS}
    elif abs(sigma_max - nodes_align_your_steps.NOISE_LEVELS["SD1"][0]) < 1e-3 * sigma_max:
        found = {"AYS SD1": nodes_align_your_steps.AlignYourStepsScheduler.execute("SD1", steps, 1.0),
                 "GITS 1.20": nodes_gits.GITSScheduler.execute(1.20, steps, 1.0)}
    else:
        found = {}
    return {name: output.result[0] for name, output in found.items()}


def best_stock(case, sampler_name, steps):
    import comfy.samplers
    sigma_max = float(case.model.get_model_object("model_sampling").sigma_max)
    best = None
    for scheduler in comfy.samplers.SCHEDULER_NAMES:
        if scheduler.startswith("qs_"):
            continue
        try:
            sigmas = schedule(case.model, scheduler, steps)
        except Exception:   # a scheduler that cannot make this few steps
            continue
        if float(sigmas[0]) < 0.999 * sigma_max or (sigmas[:-1] <= 0).any():
            continue
        error, _ = case.error(sampler_name, sigmas)
        if best is None or error < best["error"]:
            best = {"error": error, "schedule": scheduler}
    return best


def optimized(nodes_schedules, case, flow, method, steps, trajectories, seed=99):
    """The schedule the Optimize Steps node computes for this case's model, conditioning and CFG, and its info."""
    latent = {"samples": torch.zeros_like(case.noise[:1]) if case.latent is None else case.latent}

    def optimize(denoise_fn, x_start, model_sampling):
        return nodes_schedules._run_optimizer(method, "dpmpp_2m", steps, 60, denoise_fn, x_start, model_sampling,
                                              flow, seed, None)
    return nodes_schedules.optimize_in_host(case.model, case.positive, case.negative, case.cfg, latent,
                                            trajectories, seed, optimize)


def benchmark(case, base, sampler_name, budgets, trajectories, log, methods=OPTIMIZERS):
    """{nfe: {row name: {"error", "ratio", "schedule" (best stock) / "optimize_s" and "sigmas" (optimizers)}}}"""
    model_sampling = case.model.get_model_object("model_sampling")
    nodes_schedules = pack_module(base, "nodes.schedules")
    flow = nodes_schedules.is_flow(model_sampling)
    table = {}
    for nfe in budgets:
        stock = best_stock(case, sampler_name, nfe)
        rows = {"best stock": stock}
        candidates = dict(host_tables(model_sampling, flow, nfe))
        candidates["qs_dmn"] = schedule(case.model, "qs_dmn", nfe)
        for name, sigmas in candidates.items():
            rows[name] = {"error": case.error(sampler_name, sigmas)[0]}
            if float(sigmas[0]) < 0.999 * float(model_sampling.sigma_max):   # an easier problem: say so
                rows[name]["note"] = f"starts at {float(sigmas[0]):.4g}"
        for method in methods:
            t0 = time.perf_counter()
            sigmas, _ = optimized(nodes_schedules, case, flow, method, nfe, trajectories)
            rows[method] = {"error": case.error(sampler_name, sigmas)[0], "optimize_s": time.perf_counter() - t0,
                            "sigmas": [round(float(s), 5) for s in sigmas]}
            log(f"  {case.name} nfe={nfe} {method}: {rows[method]['error']:.4f} "
                f"(stock {stock['error']:.4f}), {rows[method]['optimize_s']:.0f} s")
        for row in rows.values():
            row["ratio"] = row["error"] / stock["error"]
        table[nfe] = rows
        log(f"  {case.name} nfe={nfe}: " + ", ".join(f"{k} {v['ratio']:.2f}x" for k, v in rows.items()))
    return table


def markdown(case_name, table, sampler_name, samples):
    lines = [f"**{case_name}**, {sampler_name}, {samples} evaluation noises: error (ratio to the best stock "
             "schedule; optimization seconds)", "", "| schedule | " + " | ".join(f"{n} NFE" for n in table) + " |",
             "|---|" + "---|" * len(table)]
    names = []
    for rows in table.values():
        names += [n for n in rows if n not in names and n != "best stock"]
    stock_names = " / ".join(rows["best stock"]["schedule"] for rows in table.values())
    lines.append(f"| best stock ({stock_names}) | "
                 + " | ".join(f"{rows['best stock']['error']:.4f}" for rows in table.values()) + " |")
    for name in names:
        cells = []
        for rows in table.values():
            v = rows.get(name)
            if v is None:
                cells.append("-")
                continue
            extra = f"; {v['optimize_s']:.0f} s" if "optimize_s" in v else ""
            note = f", {v['note']}" if "note" in v else ""
            cells.append(f"{v['error']:.4f} ({v['ratio']:.2f}x{extra}{note})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", default=["eps", "flow", "digits", "digits-flow"])
    parser.add_argument("--nfe", type=int, nargs="+", default=[4, 5, 6])
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--sampler", default="qs_dpmpp_2m")
    parser.add_argument("--trajectories", type=int, default=32, help="training noises (the node's default)")
    parser.add_argument("--methods", nargs="+", choices=OPTIMIZERS, default=list(OPTIMIZERS))
    parser.add_argument("--reference-steps", type=int, default=500, help="the digit models' 2M reference steps")
    parser.add_argument("--out", default=str(RESULTS / "schedules.json"))
    args = parser.parse_args(argv)

    base = start_host()
    results, t0 = {}, time.time()
    for family in args.families:
        case = family_case(family, args.samples, args.reference_steps)
        if case is None:
            print(f"skipping {family}: no trained weights")
            continue
        results[case.name] = benchmark(case, base, args.sampler, args.nfe, args.trajectories, print, args.methods)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"sampler": args.sampler, "samples": args.samples, "trajectories": args.trajectories,
                   "results": results, "wall_s": time.time() - t0}, f, indent=1)
    for name, table in results.items():
        print(markdown(name, table, args.sampler, args.samples), "\n")
    print(f"wrote {args.out} in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
