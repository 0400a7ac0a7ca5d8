"""Timestep optimizers as SIGMAS nodes: schedules computed for the user's own model, saved, reloaded and shared.

The optimizers that run the model do so inside the host's own sampling path (a sampler function handed to
comfy.sample.sample_custom), so the model sees the user's conditioning, CFG, patches, device and memory management
exactly as when it samples, and the host's progress bar and interrupt apply.
"""
import hashlib
import json
import logging
import math
import os
import weakref

import torch

from comfy_api.latest import io

from ..atomic_files import write_json_atomically
from .common import CATEGORY, QuickstepInputError, require_choice, require_finite
from ..samplers import schedules
from ..samplers.frame import is_flow

# "nelder-mead": a derivative-free search of the time steps on the final error against the teacher (what this node
# used to call "ld3": published LD3 back-propagates through the model, which host models under inference mode do not
# allow).  "ld3" stays accepted so old workflows load, as a deprecated alias of it.
OPTIMIZERS = ("nelder-mead", "oss", "gits", "ays", "ld3")
DEPRECATED_METHODS = {"ld3": "nelder-mead"}
DEFAULT_OPTIMIZER = "oss"     # README, timestep optimizers: the fastest that stays near the best stock schedule
SOLVERS = schedules.SOLVERS
SCHEDULE_FOLDER = "quickstep_schedules"
SCHEDULE_FORMAT = "quickstep-schedule/1"


def sigma_range(model_sampling):
    return float(model_sampling.sigma_max), float(model_sampling.sigma_min)


def dmn_for_model(model_sampling, steps, order=2):
    sigma_max, sigma_min = sigma_range(model_sampling)
    sigmas, _ = schedules.dmn_sigmas(steps, order=order, sigma_max=sigma_max, sigma_min=sigma_min,
                                     flow=is_flow(model_sampling))
    return sigmas


DMN_SCHEDULER_MIN_STEPS = 3     # order 2: fewer steps leave DMN no interior time step to place


def qs_dmn_scheduler(model_sampling, steps):
    """qs_dmn in the stock list: DMN steps (order 2) on EPS / V models from 3 steps on. Elsewhere the host's own
    schedule, so the scheduler works for every model and step count: 'simple' on flow models (DMN measured 2.6-5x
    worse than the host's schedules there), 'karras' (DMN's own starting point) below 3 steps."""
    import comfy.samplers
    if is_flow(model_sampling):
        return comfy.samplers.calculate_sigmas(model_sampling, "simple", steps)
    if steps < DMN_SCHEDULER_MIN_STEPS:
        return comfy.samplers.calculate_sigmas(model_sampling, "karras", steps)
    try:
        return dmn_for_model(model_sampling, steps)
    except ValueError as error:
        raise QuickstepInputError("scheduler qs_dmn", str(error)) from None


def register_dmn_scheduler():
    """Adds qs_dmn to the stock scheduler list, so the plain KSampler can use DMN steps."""
    import comfy.samplers
    if "qs_dmn" not in comfy.samplers.SCHEDULER_HANDLERS:
        comfy.samplers.SCHEDULER_HANDLERS["qs_dmn"] = comfy.samplers.SchedulerHandler(qs_dmn_scheduler, use_ms=True)
        comfy.samplers.SCHEDULER_NAMES.append("qs_dmn")


_BASE_WEIGHT_DIGESTS = weakref.WeakKeyDictionary()    # host BaseModel -> digest of its unpatched weights


def _update_with_tensor(digest, tensor):
    tensor = tensor.detach()
    digest.update(f"{tuple(tensor.shape)}{tensor.dtype}".encode())
    if tensor.numel():
        digest.update(tensor.contiguous().reshape(-1).view(torch.uint8).cpu().numpy().tobytes())


def _update_with(digest, value):
    """Everything that determines a patch's effect: tensors by content, numbers, nested containers, and a weight
    adapter (the host's LoRA / LoHa / ... objects) by its class and weights."""
    if torch.is_tensor(value):
        _update_with_tensor(digest, value)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _update_with(digest, item)
    elif isinstance(value, dict):
        for key in sorted(value, key=str):
            digest.update(str(key).encode())
            _update_with(digest, value[key])
    elif value is None or isinstance(value, (bool, int, float, str)):
        digest.update(repr(value).encode())
    else:
        digest.update(type(value).__name__.encode())
        _update_with(digest, getattr(value, "weights", None))


def _base_weight_digest(model):
    """Digest of every weight of the diffusion model as loaded, without patches (a weight patched in place by a
    loaded clone is read from the host's backup). Hashing reads each byte once, moved to the CPU one tensor at a
    time (about 1 s per GB); the result is kept per model object, since only patching changes weights."""
    base = model.model
    known = _BASE_WEIGHT_DIGESTS.get(base)
    if known is not None:
        return known
    digest = hashlib.blake2b(digest_size=16)
    digest.update(type(model.get_model_object("diffusion_model")).__name__.encode())
    backup = getattr(model, "backup", {})
    for name, tensor in sorted(base.state_dict(prefix="").items()):
        if not name.startswith("diffusion_model."):
            continue
        digest.update(name.encode())
        _update_with_tensor(digest, backup[name].weight if name in backup else tensor)
    _BASE_WEIGHT_DIGESTS[base] = digest.hexdigest()
    return _BASE_WEIGHT_DIGESTS[base]


def model_fingerprint(model):
    """An identity of what the model computes: all diffusion-model weights as loaded (by content), the weight
    patches on top (LoRA keys, strengths and weight contents) and the model_sampling the sampler will use (the
    patched one, e.g. a shift node's: its class, buffers and scalar settings)."""
    digest = hashlib.sha256(_base_weight_digest(model).encode())
    for key in sorted(model.patches):
        digest.update(key.encode())
        _update_with(digest, model.patches[key])
    model_sampling = model.get_model_object("model_sampling")
    digest.update(type(model_sampling).__name__.encode())
    for name, tensor in sorted(model_sampling.named_buffers()):
        digest.update(name.encode())
        _update_with_tensor(digest, tensor)
    for name, value in sorted(vars(model_sampling).items()):
        if isinstance(value, (bool, int, float, str)):
            digest.update(f"{name}={value!r}".encode())
    return digest.hexdigest()[:16]


def schedule_text(sigmas):
    return ", ".join(f"{float(s):.9g}" for s in sigmas)


def parse_schedule_text(node, text, input_name="sigmas"):
    try:
        values = [float(v) for v in text.replace("\n", ",").split(",") if v.strip()]
    except ValueError:
        raise QuickstepInputError(node, f"{input_name} = {text[:80]!r} is not a comma-separated list of numbers") \
            from None
    return validate_sigmas(node, torch.tensor(values, dtype=torch.float32))


def validate_sigmas(node, sigmas):
    if sigmas.ndim != 1 or sigmas.shape[0] < 2:
        raise QuickstepInputError(node, f"a schedule needs at least 2 sigmas, got {sigmas.tolist()}")
    if not torch.isfinite(sigmas).all() or (sigmas < 0).any():
        raise QuickstepInputError(node, f"sigmas must be finite and >= 0, got {sigmas.tolist()}")
    if not (sigmas[1:] < sigmas[:-1]).all():
        raise QuickstepInputError(node, f"sigmas must be strictly decreasing, got {sigmas.tolist()}")
    return sigmas


def schedule_dir():
    import folder_paths
    if SCHEDULE_FOLDER not in folder_paths.folder_names_and_paths:
        folder_paths.add_model_folder_path(SCHEDULE_FOLDER, os.path.join(folder_paths.models_dir, SCHEDULE_FOLDER))
    path = folder_paths.get_folder_paths(SCHEDULE_FOLDER)[0]
    os.makedirs(path, exist_ok=True)
    return path


def schedule_path(node, name):
    """Where the schedule `name` lives; the name may not leave the schedule folder."""
    if not name or not all(c.isalnum() or c in "-_" for c in name):
        raise QuickstepInputError(node, f"name = {name!r} may hold only letters, digits, '-' and '_'")
    return os.path.join(schedule_dir(), f"{name}.json")


def read_schedule_file(node, path):
    try:
        with open(path) as f:
            record = json.load(f)
        if record.get("format") != SCHEDULE_FORMAT:
            raise ValueError(f"format is {record.get('format')!r}, expected {SCHEDULE_FORMAT!r}")
        sigmas = torch.tensor([float(v) for v in record["sigmas"]], dtype=torch.float32)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise QuickstepInputError(node, f"schedule file {os.path.basename(path)} is unreadable or not a Quickstep "
                                  f"schedule ({error})") from None
    return record, validate_sigmas(node, sigmas)


def optimize_in_host(model, positive, negative, cfg, latent, trajectories, seed, optimize):
    """Run `optimize(denoise_fn, x_start, model_sampling)` inside the host's sampling path and return its result.
    x_start is `trajectories` noises at the model's sigma_max, scaled and offset by the latent the host's way."""
    import comfy.sample
    import comfy.samplers

    model_sampling = model.get_model_object("model_sampling")
    sigma_max, sigma_min = sigma_range(model_sampling)
    outcome = {}

    def optimizer_as_sampler(model_k, x, sigmas, extra_args=None, callback=None, disable=None):
        extra_args = extra_args or {}

        def denoise_fn(xx, sigma):
            outcome["model_calls"] = outcome.get("model_calls", 0) + 1
            sigma = torch.as_tensor(sigma).detach().to(device=xx.device, dtype=torch.float32)
            return model_k(xx.to(x.dtype), sigma.reshape(1).expand(xx.shape[0]), **extra_args).to(xx.dtype)
        outcome["result"] = optimize(denoise_fn, x, model_sampling)
        return x

    samples = latent["samples"]
    shape = (trajectories, *samples.shape[1:])
    noise = comfy.sample.prepare_noise(torch.zeros(shape, dtype=samples.dtype), seed)
    start_sigmas = torch.tensor([sigma_max, sigma_min], dtype=torch.float32)
    # Trajectories start from the user's latent (a blank page may not be zeros) as a full-denoise sampling does.
    start_latent = samples[:1].expand(shape).contiguous()
    comfy.sample.sample_custom(model, noise, cfg, comfy.samplers.KSAMPLER(optimizer_as_sampler), start_sigmas,
                               positive, negative, start_latent, disable_pbar=True, seed=seed)
    logging.info("Quickstep: the optimizer made %d batched model calls over %d trajectories",
                 outcome.get("model_calls", 0), trajectories)
    return outcome["result"]


def host_progress(total):
    """A progress callback for the optimizers: drives the host's progress bar and raises on interrupt."""
    import comfy.model_management
    import comfy.utils
    bar = comfy.utils.ProgressBar(total)

    def progress(i, of):
        comfy.model_management.throw_exception_if_processing_interrupted()
        bar.update_absolute(min(i, of), of)
    return progress


class QuickstepDMNScheduler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="QuickstepDMNScheduler",
            display_name="DMN Optimized Steps",
            category=f"{CATEGORY}/schedules",
            description="Time steps optimized for the model's noise schedule and the solver's order (DMN, Xue et "
                        "al. 2024): data-free, computed in well under a second. Also in the KSampler's scheduler "
                        "list as qs_dmn (order 2), which on flow models gives the host's 'simple' schedule and "
                        "below 3 steps 'karras'. Measured worse than the host's own schedules: 2.6-5x on flow models "
                        "(SD3, Flux), 2-3.5x with DPM-Solver++ 2M at 4-6 steps on the trained eps digit UNets in "
                        "TAESD / TAESDXL latents (beta was best there). Prefer a stock schedule or Optimize Steps "
                        "For My Model.",
            inputs=[io.Model.Input("model", tooltip="The model whose noise schedule (sigma range, family) is used."),
                    io.Int.Input("steps", default=6, min=3, max=200, tooltip="Number of model calls (NFE)."),
                    io.Int.Input("order", default=2, min=1, max=3, tooltip="Order of the solver that will use the "
                                 "steps (2 for DPM-Solver++ 2M / UniPC bh2).")],
            outputs=[io.Sigmas.Output()])

    @classmethod
    def execute(cls, model, steps, order):
        try:
            return io.NodeOutput(dmn_for_model(model.get_model_object("model_sampling"), steps, order))
        except ValueError as error:
            raise QuickstepInputError("DMN Optimized Steps", str(error)) from None


class QuickstepOptimizeSchedule(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="QuickstepOptimizeSchedule",
            display_name="Optimize Steps For My Model",
            category=f"{CATEGORY}/schedules",
            description="Computes the time steps that make a solver most accurate for this model, prompt, CFG and "
                        "latent size, from a few of its own trajectories: nelder-mead (a derivative-free search on "
                        "the final error against a many-step teacher; 'ld3' is its old, deprecated name), OSS "
                        "(dynamic programming against "
                        "a many-step teacher), GITS (trajectory regularity) or an AYS-style KL bound. The result "
                        "is cached on disk, so re-running the graph does not re-optimize; its text output can be "
                        "pasted into 'Sigmas From Text' so a shared workflow needs no file.",
            inputs=[io.Model.Input("model", tooltip="The model to optimize for."),
                    io.Conditioning.Input("positive", tooltip="Positive conditioning used while sampling."),
                    io.Conditioning.Input("negative", tooltip="Negative conditioning used while sampling."),
                    io.Latent.Input("latent_image", tooltip="A latent of the size you will sample at."),
                    io.Combo.Input("method", options=list(OPTIMIZERS), default=DEFAULT_OPTIMIZER,
                                   tooltip="oss (default): dynamic programming against the teacher, the fastest "
                                           "method that helps (trained Flux / Qwen-Image digit models, 4-6 NFE: "
                                           "0.47-0.72x the best stock schedule's error, 28-57 s on a CPU; SD3: "
                                           "0.89-1.02x). nelder-mead: slowest (about 3x oss's time), close to "
                                           "oss (0.49-0.95x on Flux / Qwen-Image). gits: seconds, 0.55-0.83x there "
                                           "but up to 1.8x worse on SD3; ays: 0.56-4.4x, model-dependent. ld3: the "
                                           "old name of nelder-mead, kept for saved workflows. Model calls are "
                                           "batched over the trajectories; each run logs how many it made."),
                    io.Combo.Input("solver", options=list(SOLVERS), default="dpmpp_2m",
                                   tooltip="The solver the steps are for (dpmpp_2m also suits UniPC/DEIS)."),
                    io.Int.Input("steps", default=5, min=2, max=50, tooltip="Number of model calls (NFE)."),
                    io.Float.Input("cfg", default=1.0, min=0.0, max=100.0, step=0.1, tooltip="CFG scale used "
                                   "while sampling."),
                    io.Int.Input("trajectories", default=32, min=2, max=256, tooltip="How many noises to learn "
                                 "from (nelder-mead holds a quarter out for validation). With 16 or fewer, "
                                 "nelder-mead overfits: its schedule can be worse than the stock ones on other "
                                 "seeds."),
                    io.Int.Input("teacher_steps", default=60, min=10, max=1000, tooltip="Steps of the reference "
                                 "(teacher) trajectory."),
                    io.Int.Input("training_seed", default=0, min=0, max=2**31 - 1,
                                 tooltip="Seed of the training noises (fixed, so the result can be cached).")],
            outputs=[io.Sigmas.Output(display_name="sigmas"), io.String.Output(display_name="schedule_text")])

    @classmethod
    def execute(cls, model, positive, negative, latent_image, method, solver, steps, cfg, trajectories,
                teacher_steps, training_seed):
        seed = training_seed
        node = "Optimize Steps For My Model"
        require_choice(node, "method", method, OPTIMIZERS)
        if method in DEPRECATED_METHODS:
            logging.warning("Quickstep %s: method %r is deprecated, it runs %r (a Nelder-Mead search, not published "
                            "LD3)", node, method, DEPRECATED_METHODS[method])
            method = DEPRECATED_METHODS[method]
        require_choice(node, "solver", solver, SOLVERS)
        require_finite(node, "cfg", cfg, 0.0, 100.0)
        model_sampling = model.get_model_object("model_sampling")
        flow = is_flow(model_sampling)
        settings = {"method": method, "solver": solver, "steps": steps, "cfg": cfg, "trajectories": trajectories,
                    "teacher_steps": teacher_steps, "seed": seed, "latent_shape": list(latent_image["samples"].shape[1:]),
                    "conditioning": _conditioning_digest(positive, negative), "flow": flow,
                    "model": model_fingerprint(model)}
        key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:20]
        cache_path = os.path.join(schedule_dir(), "cache", f"{key}.json")
        if os.path.exists(cache_path):
            _, sigmas = read_schedule_file(node, cache_path)
            logging.info("Quickstep: reusing the %s schedule optimized earlier (%s)", method, cache_path)
            return io.NodeOutput(sigmas, schedule_text(sigmas))
        progress = host_progress(100)

        def optimize(denoise_fn, x_start, ms):
            return _run_optimizer(method, solver, steps, teacher_steps, denoise_fn, x_start, ms, flow, seed,
                                  progress)
        try:
            sigmas, info = optimize_in_host(model, positive, negative, cfg, latent_image, trajectories, seed,
                                            optimize)
        except ValueError as error:
            raise QuickstepInputError(node, str(error)) from None
        if info.get("diverged"):
            logging.warning("Quickstep %s: optimization diverged (%s); returning the best valid schedule seen.",
                            node, info.get("reason"))
        logging.info("Quickstep %s: %s objective %.4g -> %.4g in %.1f s", node, method,
                     info["objective_before"], info["objective_after"], info["wall_time_s"])
        os.makedirs(os.path.dirname(cache_path), exist_ok=True)
        write_json_atomically(cache_path, _schedule_record(sigmas, settings, info))
        return io.NodeOutput(sigmas, schedule_text(sigmas))


def _conditioning_digest(*conditionings):
    digest = hashlib.sha256()
    for conditioning in conditionings:
        for tensor, extras in conditioning:
            digest.update(tensor.detach().float().cpu().numpy().tobytes())
            for name in sorted(extras):
                if torch.is_tensor(extras[name]):
                    digest.update(name.encode() + extras[name].detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def _run_optimizer(method, solver, steps, teacher_steps, denoise_fn, x_start, model_sampling, flow, seed, progress):
    sigma_max, sigma_min = sigma_range(model_sampling)
    with torch.no_grad():
        if method == "nelder-mead":
            return schedules.ld3_sigmas(denoise_fn, x_start, steps, sigma_max, sigma_min, flow=flow, solver=solver,
                                        teacher_steps=teacher_steps, iters=100, seed=seed,
                                        init=stock_schedules(model_sampling, steps), search="derivative-free",
                                        progress=progress)
        grid = _teacher_grid(model_sampling, teacher_steps, flow)
        if method == "oss":
            return schedules.oss_sigmas(denoise_fn, x_start, grid, steps, solver=solver, flow=flow,
                                        progress=progress)
        if method == "gits":
            return schedules.gits_sigmas(denoise_fn, x_start, grid, steps, flow=flow, progress=progress)
        # The KL bound's weight diverges at sigma = 0: AYS picks nodes down to sigma_min and appends the 0 itself.
        return schedules.ays_sigmas(denoise_fn, x_start, grid[:-1], steps, flow=flow, seed=seed, progress=progress)


def stock_schedules(model_sampling, steps):
    """The host's own schedules of `steps` model calls that start at the model's sigma_max (the starting points of
    the Nelder-Mead search and of the learned solver, so they start no worse than the best stock one on the training
    noises)."""
    import comfy.samplers
    sigma_max = sigma_range(model_sampling)[0]
    found = []
    for name in comfy.samplers.SCHEDULER_NAMES:
        try:
            s = comfy.samplers.calculate_sigmas(model_sampling, name, steps).cpu().to(torch.float64)
        except Exception:   # another pack's scheduler may reject this model or step count; it is only a candidate
            continue
        positive = s[s > 0]
        if (positive.shape[0] == steps and (positive[1:] < positive[:-1]).all()
                and abs(float(positive[0]) - sigma_max) <= 1e-4 * sigma_max):
            found.append(positive)
    return found or None


def _teacher_grid(model_sampling, steps, flow):
    """The model's own default spacing for flow models; Karras (rho 7) over the model's range otherwise."""
    import comfy.samplers
    scheduler = "simple" if flow else "karras"
    return comfy.samplers.calculate_sigmas(model_sampling, scheduler, steps).cpu().to(torch.float64)


def _schedule_record(sigmas, settings, info):
    summary = {k: info[k] for k in ("objective_before", "objective_after", "iterations", "wall_time_s", "diverged",
                                    "reason") if k in info}
    return {"format": SCHEDULE_FORMAT, "sigmas": [float(s) for s in sigmas], "settings": settings,
            "result": summary}


class QuickstepSaveSchedule(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="QuickstepSaveSchedule",
            display_name="Save Schedule",
            category=f"{CATEGORY}/schedules",
            description="Saves SIGMAS under a name (models/quickstep_schedules/NAME.json) with the model's "
                        "fingerprint and family, so 'Load Schedule' can check it belongs to the model.",
            is_output_node=True,
            inputs=[io.Sigmas.Input("sigmas", tooltip="The schedule to save."),
                    io.Model.Input("model", tooltip="The model the schedule was made for."),
                    io.String.Input("name", default="my_schedule", tooltip="File name (letters, digits, - and _).")],
            outputs=[io.Sigmas.Output()])

    @classmethod
    def execute(cls, sigmas, model, name):
        node = "Save Schedule"
        path = schedule_path(node, name)
        sigmas = validate_sigmas(node, sigmas.detach().float().cpu())
        record = {"format": SCHEDULE_FORMAT, "sigmas": [float(s) for s in sigmas],
                  "settings": {"model": model_fingerprint(model),
                               "flow": is_flow(model.get_model_object("model_sampling"))}}
        write_json_atomically(path, record)
        return io.NodeOutput(sigmas)


class QuickstepLoadSchedule(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="QuickstepLoadSchedule",
            display_name="Load Schedule",
            category=f"{CATEGORY}/schedules",
            description="Loads a schedule saved by 'Save Schedule'. Refuses one saved for another model or family "
                        "unless forced.",
            inputs=[io.Model.Input("model", tooltip="The model the schedule will be used with."),
                    io.String.Input("name", default="my_schedule", tooltip="Name given when saving."),
                    io.Boolean.Input("force", default=False, tooltip="Use the schedule even if it was saved for "
                                     "another model (logged as a warning).")],
            outputs=[io.Sigmas.Output()])

    @classmethod
    def execute(cls, model, name, force):
        node = "Load Schedule"
        path = schedule_path(node, name)
        if not os.path.exists(path):
            raise QuickstepInputError(node, f"name = {name!r}: no saved schedule of that name in {schedule_dir()}")
        record, sigmas = read_schedule_file(node, path)
        refuse_other_model(node, f"schedule {name!r}", record.get("settings", {}), model, force)
        return io.NodeOutput(sigmas)


def refuse_other_model(node, what, saved, model, force):
    """Raise unless the `saved` settings' family and fingerprint are the model's, or `force` (then warn)."""
    flow = is_flow(model.get_model_object("model_sampling"))
    problems = []
    if saved.get("flow") is not None and saved["flow"] != flow:
        problems.append(f"it was made for a {'flow' if saved['flow'] else 'eps/v'} model")
    if saved.get("model") not in (None, model_fingerprint(model)):
        problems.append("it was made for another model (fingerprint differs)")
    if problems and not force:
        raise QuickstepInputError(node, f"{what}: {'; '.join(problems)}; set force to use it anyway")
    if problems:
        logging.warning("Quickstep %s: using %s although %s", node, what, "; ".join(problems))


class QuickstepSigmasFromText(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="QuickstepSigmasFromText",
            display_name="Sigmas From Text",
            category=f"{CATEGORY}/schedules",
            description="SIGMAS from a comma-separated list, e.g. an optimized schedule pasted in: it travels "
                        "inside the workflow JSON, so a shared workflow reproduces it exactly without a file.",
            inputs=[io.String.Input("sigmas", multiline=True, default="14.6146, 2.5, 0.6, 0.1, 0",
                                    tooltip="Strictly decreasing noise levels, comma-separated, usually ending "
                                    "with 0.")],
            outputs=[io.Sigmas.Output()])

    @classmethod
    def execute(cls, sigmas):
        return io.NodeOutput(parse_schedule_text("Sigmas From Text", sigmas))


NODES = [QuickstepDMNScheduler, QuickstepOptimizeSchedule, QuickstepSaveSchedule, QuickstepLoadSchedule,
         QuickstepSigmasFromText]
