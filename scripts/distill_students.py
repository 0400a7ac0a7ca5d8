"""Distil the embedded digit model (flow variant, CFG 2 baked in) into one-step students.

1. Teacher trajectories: DPM-Solver++(2M), 20 steps on the model's own flow schedule, CFG 2 against the null digit,
   for --trajectories noises (digits 0-9 in turn, seeds fixed); every state x_j at sigma_j is kept, and its end.
2. --student consistency: the teacher's weights and architecture, trained by regression so that
   D_student(x_j, sigma_j) equals the trajectory's end for every j (half the batch at j = 0, the one-step case): the
   consistency function of the guided teacher ODE, learnt from exact teacher solutions rather than CD's one-step
   self-consistency, which is affordable here because whole trajectories cost 40 small-model calls each.
   --student dsno: DSNO-style (arXiv 2211.13449): the teacher's UNet plus a temporal Fourier layer before each
   output block (modelzoo.students.DSNONetwork), predicting the trajectory at sigma 0.75 / 0.5 / 0.25 / 0 from the
   start noise in one call (the four points batched), trained on the teacher's states there (the end weighted 2x).

Deterministic for a given seed, thread count and torch build; settings are written into the file's metadata.
Measured on this 2-core CPU (shared with other jobs): consistency 13 min (6 trajectories, 7 training), dsno 28 min
(9 trajectories, 19 training at batch 16 x 4 points).
    python scripts/distill_students.py                                   # the consistency student
    python scripts/distill_students.py --student dsno --batch 16 --steps 600
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

PACK_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PACK_DIR / "scripts"))
from train_digit_model import import_host, optimizer_step  # noqa: E402

SETTINGS = ("student", "trajectories", "steps", "batch", "lr", "warmup", "ema", "one_step_fraction", "seed", "threads")


def teacher_trajectories(model, count, seed, chunk=128):
    """(states [N, J+1, 1, 32, 32], sigmas [J+1], digits [N]): the state entering each teacher step, then the end."""
    from modelzoo import students
    import samplers
    sigmas = students.flow_sigmas(model, students.TEACHER_STEPS)
    digits = torch.arange(count) % 10
    runs = []
    for i, part in enumerate(digits.split(chunk)):
        states = []
        students.sample(model, part.tolist(), sigmas, students.TEACHER_CFG, seed + i, samplers.SAMPLERS["dpmpp_2m"],
                        states=states)
        runs.append(torch.stack(states, dim=1))
        print(f"teacher trajectories {min((i + 1) * chunk, count)}/{count}", flush=True)
    return torch.cat(runs), sigmas, digits


def distill(settings):
    import_host()
    from modelzoo import mnist_unet, students

    torch.set_num_threads(settings.threads)
    started = time.time()
    teacher = mnist_unet.load_mnist_model(prediction=students.TEACHER_PREDICTION).model
    states, sigmas, digits = teacher_trajectories(teacher, settings.trajectories, settings.seed)
    teacher_time = time.time() - started
    table = mnist_unet.read_weights(mnist_unet.weights_path("eps"))[1]
    if settings.student == "dsno":
        model = students.build_dsno_model()
        network = model.diffusion_model
        network.unet.load_state_dict(teacher.diffusion_model.state_dict())
        # The teacher's states at the student's output times (they lie on the teacher's sigma grid).
        columns = [int(torch.argmin((sigmas - s).abs())) for s in network.output_sigmas.tolist()]
        if not torch.allclose(sigmas[columns], network.output_sigmas):
            raise ValueError(f"DSNO output sigmas {network.output_sigmas.tolist()} are not on the teacher grid")
        targets = states[:, columns]
        time_weights = torch.tensor([1.0] * (len(columns) - 1) + [2.0]).reshape(1, -1, 1, 1, 1)
    else:
        model = mnist_unet.build_base_model(students.TEACHER_PREDICTION)
        network = model.diffusion_model
        network.load_state_dict(teacher.diffusion_model.state_dict())
        ends, levels = states[:, -1], len(sigmas) - 1     # states[:, j] sits at sigmas[j] for j < levels
    network.train()
    trained = list(network.parameters())
    optimizer = torch.optim.AdamW(trained, lr=settings.lr, betas=(0.9, 0.99), weight_decay=0.0)
    ema = [p.detach().clone() for p in trained]
    generator = torch.Generator().manual_seed(settings.seed + 1)
    losses = []
    for step in range(settings.steps):
        index = torch.randint(0, len(states), (settings.batch,), generator=generator)
        context = table[digits[index]]
        if settings.student == "dsno":
            predicted = network.trajectory(states[index, 0], context)
            loss = (time_weights * (predicted - targets[index]) ** 2).mean()
        else:
            level = torch.randint(0, levels, (settings.batch,), generator=generator)
            level[torch.rand(settings.batch, generator=generator) < settings.one_step_fraction] = 0
            denoised = model.apply_model(states[index, level], sigmas[level], c_crossattn=context)
            loss = ((denoised - ends[index]) ** 2).mean()
        optimizer_step(optimizer, loss, trained, ema, step, settings)
        losses.append(loss.item())
        if (step + 1) % 100 == 0:
            print(f"step {step + 1}/{settings.steps}  loss {sum(losses[-100:]) / 100:.5f}  "
                  f"{time.time() - started:.0f}s", flush=True)
    with torch.no_grad():
        for average, p in zip(ema, trained):
            p.copy_(average)
    wall_time = time.time() - started
    tenth = max(1, settings.steps // 10)
    metadata = {
        "prediction": students.TEACHER_PREDICTION, "unet_config": mnist_unet.UNET_CONFIG,
        "num_heads": mnist_unet.NUM_HEADS, "student": settings.student, "teacher": "mnist_unet_flow.safetensors",
        "teacher_sampler": f"dpmpp_2m, {students.TEACHER_STEPS} steps, simple schedule, cfg {students.TEACHER_CFG}",
        "settings": {k: getattr(settings, k) for k in SETTINGS},
        "teacher_time_s": round(teacher_time, 1), "wall_time_s": round(wall_time, 1),
        "loss_per_tenth": [round(sum(losses[i:i + tenth]) / len(losses[i:i + tenth]), 5)
                           for i in range(0, settings.steps, tenth)], "torch": torch.__version__,
    }
    out = Path(settings.out) if settings.out else students.student_path(settings.student)
    temporary = out.with_suffix(".partial")
    mnist_unet.write_weights(temporary, network.state_dict(), table, metadata)
    temporary.replace(out)                         # atomic: a killed run never leaves a torn student file
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB) in {wall_time:.0f}s (teacher {teacher_time:.0f}s)")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--student", choices=["consistency", "dsno"], default="consistency")
    parser.add_argument("--trajectories", type=int, default=768)
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--ema", type=float, default=0.99)
    parser.add_argument("--one-step-fraction", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="")
    distill(parser.parse_args(argv))


if __name__ == "__main__":
    main()
