"""How much can any schedule gain on the oracle? A brute-force bound for DPM-Solver++(2M), plain torch, no host.

The schedule is searched directly on the quantity the benchmarks report, the mean per-sample RMS error against the
exact ODE solution, over `--train` noises (Nelder-Mead on LD3's ordered parametrisation, from the Karras / shift-3
schedule and two perturbed starts), then measured on `--eval` fresh noises against Karras (EPS) or shift 3 (flow).
No optimizer that learns from fewer trajectories, or against a teacher instead of the exact solution, should be
expected to beat this on the same model.

usage: python -m bench.schedule_bound [--family eps|flow] [--nfe 4 5 6] [--train 512] [--eval 256]
                                     [--objective mean|log]
"""
import argparse
import math
import time

import torch
from scipy.optimize import minimize

from modelzoo.gmm import GaussianMixture, exact_ode_solution
from samplers import schedules

SD15_RANGE = (14.614642, 0.0291675)
FLOW_RANGE = (1.0, 3 * 0.001 / (1 + 2 * 0.001))   # shift 3, t = 1/1000


def start_states(n, seed, flow, sigma_max):
    noise = torch.randn(n, 4, 8, 8, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return noise if flow else noise * math.sqrt(1 + sigma_max ** 2)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=["eps", "flow"], default="eps")
    parser.add_argument("--nfe", type=int, nargs="+", default=[4, 5, 6])
    parser.add_argument("--train", type=int, default=512)
    parser.add_argument("--eval", type=int, default=256)
    parser.add_argument("--maxiter", type=int, default=600)
    parser.add_argument("--objective", choices=["mean", "log"], default="mean",
                        help="mean RMS error (what the benchmarks report) or mean log error (the typical noise)")
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    flow = args.family == "flow"
    gmm = GaussianMixture((4, 8, 8), components=6, seed=0)   # the oracle's mixture (modelzoo.oracle_host)
    sigma_max, sigma_min = FLOW_RANGE if flow else SD15_RANGE
    log_hi, log_lo = math.log(sigma_max), math.log(sigma_min)

    def denoise(x, sigma):
        return gmm.denoise(x, sigma, flow)

    def case(n, seed):
        x = start_states(n, seed, flow, sigma_max)
        return x, exact_ode_solution(gmm, x, sigma_max, flow=flow)

    def errors(x, exact, sigmas):
        out = schedules.sample_ode(denoise, x, sigmas, "dpmpp_2m", flow)
        return (out - exact).flatten(1).pow(2).mean(1).sqrt()

    train, fresh = case(args.train, 5), case(args.eval, 777)
    for nfe in args.nfe:
        stock = (schedules.flow_shift_sigmas(nfe, 3.0) if flow
                 else schedules.karras_sigmas(nfe, sigma_min, sigma_max))
        xi0 = schedules._ld3_parameters(stock[:-1], sigma_max, sigma_min).numpy()

        def objective(xi):
            err = errors(*train, schedules._ld3_schedule(torch.as_tensor(xi), log_hi, log_lo))
            return float(err.mean() if args.objective == "mean" else torch.log(err + 1e-3).mean())
        t0, best = time.perf_counter(), None
        for restart in range(3):
            shake = torch.randn(nfe, generator=torch.Generator().manual_seed(restart)).numpy() * 0.5
            found = minimize(objective, xi0 + (shake if restart else 0), method="Nelder-Mead",
                             options={"maxiter": args.maxiter, "xatol": 1e-5, "fatol": 1e-9})
            if best is None or found.fun < best.fun:
                best = found
        sigmas = schedules._ld3_schedule(torch.as_tensor(best.x), log_hi, log_lo)
        base, bound = errors(*fresh, stock), errors(*fresh, sigmas)
        print(f"{args.family} nfe={nfe}: stock {float(base.mean()):.4f} (median {float(base.median()):.4f}), "
              f"best found {float(bound.mean()):.4f} (median {float(bound.median()):.4f}): "
              f"{float(bound.mean() / base.mean()):.2f}x on {args.eval} fresh noises, "
              f"{time.perf_counter() - t0:.0f} s; sigmas {[round(float(s), 4) for s in sigmas]}", flush=True)


if __name__ == "__main__":
    main()
