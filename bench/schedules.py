"""Schedule-optimizer benchmark: one sampler at a fixed NFE on schedules from every source, error against the exact
ODE solution (oracle) or a converged reference (trained digit models, bench.solvers' families and CFG), each as a
ratio to the sampler's best stock schedule.

Rows per NFE budget:
- best stock: the best of the host's scheduler list (the pack's own qs_ schedulers left out) on the evaluation
  noises themselves, an optimistic baseline;
- the host at its best: every stock schedule also with the host's own samplers of HOST_SAMPLERS, the best pair
  (picked on the evaluation noises too) a row;
- the host's published tables that fit the model (AYS SD1 and GITS coeff 1.20 for an EPS model with the SD1.5
  sigma range; OSS FLUX / Wan / Chroma for flow models), through the host's own scheduler nodes;
- qs_dmn (data-free, order 2);
- nelder-mead (the node's former "ld3") / oss / gits / ays (the AYS-style KL bound) computed for the model exactly
  as the "Optimize Steps For My Model" node computes them (its defaults: solver dpmpp_2m, 32 training noises, a
  60-step teacher; the training noises drawn from bench.protocol.TUNING_SEED, the evaluation noises from TEST_SEED),
  with the optimization's wall time.
Both directions (bench/README.md, section 5): under each table, for every optimizer and budget, the host points
(stock schedule x host or qs sampler, published table) that are at least as good on both axes, i.e. no more model
calls and no more error; host points need no optimization time.

usage: python -m bench.schedules [--families eps flow digits digits-flow digits-<architecture> ...]
                                [--nfe 4 5 6] [--samples 64] [--sampler qs_dpmpp_2m] [--trajectories 32]
                                [--methods nelder-mead oss gits ays] [--host-samplers ...] [--reference-steps 500]
                                [--base DIR]
Writes bench/results/schedules.json and prints one markdown table per model (`--render JSON` prints those of a
saved run).
"""
import argparse
import json
import time
from pathlib import Path

import torch

from bench.protocol import TEST_SEED, TUNING_SEED, split_label
from bench.solvers import RESULTS, family_case, schedule, start_host

OPTIMIZERS = ("nelder-mead", "oss", "gits", "ays")
# The host's own samplers beside the sampler under test: its DPM-Solver++(2M), and those that were the host's best
# pair at 4-8 calls in the sweeps of all 22 host samplers on the trained DiTs (README, "Solvers on a trained DiT"
# and "Learned solver on the trained DiTs") or on the SD1.5 digit UNets (gradient_estimation). One model call per step each; the calls are
# counted all the same.
HOST_SAMPLERS = ("dpmpp_2m", "ipndm", "deis", "gradient_estimation", "dpmpp_2m_sde_heun(eta=0)",
                 "dpmpp_2m_sde_midpoint(eta=0)")
BEST_PAIR = "host's best pair"


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


def stock_errors(case, sampler_name, steps):
    """{scheduler: (error, counted model calls)} of every host scheduler (qs_ ones left out) that makes `steps`
    steps from sigma_max."""
    import comfy.samplers
    sigma_max = float(case.model.get_model_object("model_sampling").sigma_max)
    found = {}
    for scheduler in comfy.samplers.SCHEDULER_NAMES:
        if scheduler.startswith("qs_"):
            continue
        try:
            sigmas = schedule(case.model, scheduler, steps)
        except Exception:   # a scheduler that cannot make this few steps
            continue
        if float(sigmas[0]) < 0.999 * sigma_max or (sigmas[:-1] <= 0).any():
            continue
        found[scheduler] = case.error(sampler_name, sigmas)
    return found


def host_points(case, samplers, steps):
    """[{"sampler", "schedule", "error", "nfe"}] of every stock schedule of `steps` steps with each sampler."""
    return [{"sampler": sampler, "schedule": name, "error": error, "nfe": calls}
            for sampler in samplers for name, (error, calls) in stock_errors(case, sampler, steps).items()]


def best_of(points, with_sampler):
    best = min(points, key=lambda p: p["error"])
    return {"error": best["error"],
            "schedule": f"{best['sampler']} / {best['schedule']}" if with_sampler else best["schedule"]}


def optimized(nodes_schedules, case, flow, method, steps, trajectories, seed):
    """The schedule the Optimize Steps node computes for this case's model, conditioning and CFG, and its info."""
    latent = {"samples": torch.zeros_like(case.noise[:1]) if case.latent is None else case.latent}

    def optimize(denoise_fn, x_start, model_sampling):
        return nodes_schedules._run_optimizer(method, "dpmpp_2m", steps, 60, denoise_fn, x_start, model_sampling,
                                              flow, seed, None)
    return nodes_schedules.optimize_in_host(case.model, case.positive, case.negative, case.cfg, latent,
                                            trajectories, seed, optimize)


def benchmark(case, base, sampler_name, budgets, trajectories, log, methods=OPTIMIZERS, training_seed=TUNING_SEED,
              host_samplers=HOST_SAMPLERS):
    """{nfe: {"rows": {row name: {"error", "ratio", "schedule" (best stock rows) / "optimize_s" and "sigmas"
    (optimizers) / "note"}}, "host": [host points: {"sampler", "schedule", "error", "nfe", "note"?}]}}"""
    model_sampling = case.model.get_model_object("model_sampling")
    nodes_schedules = pack_module(base, "nodes.schedules")
    flow = nodes_schedules.is_flow(model_sampling)
    table = {}
    for nfe in budgets:
        stock = host_points(case, [sampler_name], nfe)
        host = stock + host_points(case, host_samplers, nfe)
        rows = {"best stock": best_of(stock, False), BEST_PAIR: best_of(host[len(stock):], True)}
        tables = host_tables(model_sampling, flow, nfe)
        for name, sigmas in {**tables, "qs_dmn": schedule(case.model, "qs_dmn", nfe)}.items():
            error, calls = case.error(sampler_name, sigmas)
            rows[name] = {"error": error}
            if float(sigmas[0]) < 0.999 * float(model_sampling.sigma_max):   # an easier problem: say so
                rows[name]["note"] = f"starts at {float(sigmas[0]):.4g}"
            if name in tables:
                host.append({"sampler": sampler_name, "schedule": name, "nfe": calls, **rows[name]})
        for method in methods:
            t0 = time.perf_counter()
            sigmas, _ = optimized(nodes_schedules, case, flow, method, nfe, trajectories, training_seed)
            rows[method] = {"error": case.error(sampler_name, sigmas)[0], "optimize_s": time.perf_counter() - t0,
                            "sigmas": [round(float(s), 5) for s in sigmas]}
            log(f"  {case.name} nfe={nfe} {method}: {rows[method]['error']:.4f} "
                f"(stock {rows['best stock']['error']:.4f}), {rows[method]['optimize_s']:.0f} s")
        for row in rows.values():
            row["ratio"] = row["error"] / rows["best stock"]["error"]
        table[nfe] = {"rows": rows, "host": host}
        log(f"  {case.name} nfe={nfe}: " + ", ".join(f"{k} {v['ratio']:.2f}x" for k, v in rows.items()))
    return table


def dominating(table, nfe, error):
    """The host points that are at least as good as `error` at `nfe` on both axes: no more model calls, no more
    error (they cost no optimization time), fewest calls first, then lowest error."""
    found = [point for entry in table.values() for point in entry["host"]
             if point["nfe"] <= nfe and point["error"] <= error]
    return sorted(found, key=lambda p: (p["nfe"], p["error"]))


def dominance_lines(table, methods):
    """Per optimizer, its error as a ratio to the host's best pair and whether a host point dominates it at each
    budget (section 5 of bench/README.md)."""
    lines = []
    for method in methods:
        lines.append(f"- {method} / the host's best pair: " + " / ".join(
            f"{entry['rows'][method]['error'] / entry['rows'][BEST_PAIR]['error']:.2f}x" for entry in table.values()
            if method in entry["rows"]))
    for method in methods:
        cells = []
        for nfe, entry in table.items():
            if method not in entry["rows"]:
                continue
            found = dominating(table, nfe, entry["rows"][method]["error"])
            if not found:
                cells.append(f"{nfe} NFE: none")
                continue
            first = found[0]
            note = f", {first['note']}" if "note" in first else ""
            cells.append(f"{nfe} NFE: {len(found)}, e.g. {first['schedule']} with {first['sampler']} at "
                         f"{first['nfe']} NFE ({first['error']:.4f}{note})")
        lines.append(f"- host points at least as good as {method} (no more NFE, no more error): " + "; ".join(cells))
    return lines


def markdown(case_name, table, sampler_name, samples):
    lines = [f"**{case_name}** ({split_label(case_name)} model), {sampler_name}, {samples} evaluation noises: error "
             "(ratio to the best stock schedule; optimization seconds)", "",
             "| schedule | " + " | ".join(f"{n} NFE" for n in table) + " |", "|---|" + "---|" * len(table)]
    names = []
    for entry in table.values():
        names += [n for n in entry["rows"] if n not in names and n != "best stock"]
    stock_names = " / ".join(entry["rows"]["best stock"]["schedule"] for entry in table.values())
    lines.append(f"| best stock ({stock_names}) | "
                 + " | ".join(f"{entry['rows']['best stock']['error']:.4f}" for entry in table.values()) + " |")
    for name in names:
        cells = []
        for entry in table.values():
            v = entry["rows"].get(name)
            if v is None:
                cells.append("-")
                continue
            extra = f"; {v['optimize_s']:.0f} s" if "optimize_s" in v else ""
            extra += f"; {v['schedule']}" if "schedule" in v else ""
            note = f", {v['note']}" if "note" in v else ""
            cells.append(f"{v['error']:.4f} ({v['ratio']:.2f}x{extra}{note})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    methods = [name for name in names if any("optimize_s" in entry["rows"].get(name, {}) for entry in table.values())]
    return "\n".join(lines + [""] + dominance_lines(table, methods))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", default=["eps", "flow", "digits", "digits-flow"])
    parser.add_argument("--nfe", type=int, nargs="+", default=[4, 5, 6])
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--sampler", default="qs_dpmpp_2m")
    parser.add_argument("--trajectories", type=int, default=32, help="training noises (the node's default)")
    parser.add_argument("--methods", nargs="+", choices=OPTIMIZERS, default=list(OPTIMIZERS))
    parser.add_argument("--reference-steps", type=int, default=500, help="the digit models' 2M reference steps")
    parser.add_argument("--host-samplers", nargs="+", default=list(HOST_SAMPLERS))
    parser.add_argument("--base", default=None, help="the host's base folder (default: bench.solvers')")
    parser.add_argument("--out", default=str(RESULTS / "schedules.json"))
    parser.add_argument("--render", metavar="JSON", help="print the tables of a saved run instead of running")
    args = parser.parse_args(argv)
    if args.render:
        with open(args.render) as f:
            saved = json.load(f)
        for name, table in saved["results"].items():
            table = {int(nfe): entry for nfe, entry in table.items()}
            print(markdown(name, table, saved["sampler"], saved["samples"]), "\n")
        return

    base = start_host(args.base)
    results, walls, t0 = {}, {}, time.time()
    for family in args.families:
        started = time.time()
        case = family_case(family, args.samples, args.reference_steps, TEST_SEED)
        if case is None:
            print(f"skipping {family}: no trained weights")
            continue
        results[case.name] = benchmark(case, base, args.sampler, args.nfe, args.trajectories, print, args.methods,
                                       host_samplers=args.host_samplers)
        walls[case.name] = time.time() - started
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"sampler": args.sampler, "samples": args.samples, "trajectories": args.trajectories,
                   "test_seed": TEST_SEED, "training_seed": TUNING_SEED, "results": results, "wall_s": walls},
                  f, indent=1)
    for name, table in results.items():
        print(markdown(name, table, args.sampler, args.samples), "\n")
    print("wall seconds per model: " + ", ".join(f"{name} {s:.0f}" for name, s in walls.items())
          + f"; {time.time() - t0:.0f} in all")


if __name__ == "__main__":
    main()
