"""Sampler overhead: wall time spent outside model calls, per step, as a fraction of one model call, on the small
SD1.5-architecture UNet (the host's own class) through the host's sampling path. Ratios from one run.

usage: python -m bench.overhead [--steps 20] [--samplers ...]
"""
import argparse
import logging
import time

import torch

from testbed.host import HOST_DIR


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--samplers", nargs="+", default=None)
    args = parser.parse_args(argv)

    from testbed.inproc import InProcessHost
    logging.disable(logging.WARNING)
    InProcessHost(HOST_DIR / "benchbase")
    torch.set_grad_enabled(False)
    import comfy.patcher_extension
    import comfy.sample
    import comfy.samplers
    from modelzoo.tiny_host import build_tiny, tiny_conditioning

    model = build_tiny("sd15").clone()
    inside = {"s": 0.0, "n": 0}

    def timed(executor, *a, **k):
        t0 = time.perf_counter()
        out = executor(*a, **k)
        inside["s"] += time.perf_counter() - t0
        inside["n"] += 1
        return out
    model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.PREDICT_NOISE, "quickstep_overhead", timed)
    cond = tiny_conditioning("sd15", 0)
    latent = torch.zeros(1, 4, 32, 32)
    noise = comfy.sample.prepare_noise(latent, 0)
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "karras", args.steps)
    names = args.samplers or ["euler", "dpmpp_2m", "uni_pc_bh2"] + [
        s for s in comfy.samplers.KSampler.SAMPLERS if s.startswith("qs_") and s != "qs_paradigms"]
    print("| sampler | model calls | time per call (ms) | overhead per step (ms) | overhead / call |")
    print("|---|---|---|---|---|")
    for name in names:
        best = None
        for _ in range(args.repeats):
            inside.update(s=0.0, n=0)
            t0 = time.perf_counter()
            comfy.sample.sample_custom(model, noise, 1.0, comfy.samplers.sampler_object(name), sigmas, cond, cond,
                                       latent, disable_pbar=True, seed=0)
            total = time.perf_counter() - t0
            overhead = (total - inside["s"]) / args.steps
            per_call = inside["s"] / inside["n"]
            if best is None or overhead < best[0]:
                best = (overhead, per_call, inside["n"])
        overhead, per_call, calls = best
        print(f"| {name} | {calls} | {per_call * 1e3:.1f} | {overhead * 1e3:.2f} | {overhead / per_call:.1%} |")


if __name__ == "__main__":
    main()
