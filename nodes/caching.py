"""Feature caches as MODEL -> MODEL nodes: DeepCache for the host UNet and a dual-block cache (DBCache / first-block
cache) with forecasting for the host DiTs. The plain-torch parts (forecasters, skip policy, schedules, run state)
live in samplers/caching.py.

How they hook into the host (public extension points only; the input model is never modified, a clone is patched):

- OUTER_SAMPLE wrapper (both caches): creates the run's state (sigma schedule, window in sigma, empty history) in a
  clone of the guider's model_options, and in `finally` (success, error or interrupt) logs what it did and frees
  every cached tensor. Nothing survives into the next prompt; a model call outside a sampling run passes through.

- DeepCache (comfy.ldm.modules.diffusionmodules.openaimodel.UNetModel): a DIFFUSION_MODEL wrapper plus an
  output_block_patch. Full steps run the UNet unchanged; the output_block_patch stores the deep feature h* that
  enters output block L-1-m (after any output_block_patch registered before ours, e.g. FreeU). On a partial step the
  wrapper hands the UNet's own forward shortened block containers for the duration of that one call:
  input_blocks[:m+1], no middle block, output_blocks[L-1-m:], restored in `finally`. The host's forward, its emb /
  input / output patches and attention patches all still run; the output_block_patch swaps in h* (or its forecast)
  for the first remaining output block and restores the block ids and transformer_index the skipped blocks would
  have advanced, so attention patches keyed by ("output", n) still see the right blocks. ControlNet residuals are
  re-aligned to the blocks that run (the deep ones are inside the cached feature). Copying the UNet forward was the
  alternative; this keeps every host patch point live and follows the host's forward as it changes.

- Block cache (Flux / Chroma-style double+single blocks, SD3 MMDiT joint blocks): one patches_replace["dit"] entry
  per block. The first Fn blocks always run; from the change of their residual against its forecast (last computed
  steps) the policy decides whether the middle runs. If it runs, the middle's residual (per stream: img, txt) is
  stored at each sigma; if not, the middle blocks return their input and the last one adds the forecast residual.
  The last Bn blocks always run on top. First-block cache is Fn=1, Bn=0.

- Calibrated policy (MagCache): the Calibrate Cache node samples once with the cache computing every step, records
  the magnitude curve of the cached tensor (DeepCache: the deep feature; Block Cache: the middle's residual entering
  the back blocks) and writes it as JSON (write-then-rename) under models/quickstep_cache_calibrations/. A cache node
  set to the calibrated policy loads it, checks it was made for this cache layout and model (and, when sampling
  starts, this sampler), and computes the steps MagCache's rule picks on the run's own sigmas.

State is per run, per batch group (the uuids of the conds evaluated together: CFG positive/negative keep separate
histories) and reset when the input shape, dtype or device change (batch size, resolution).
"""
import copy
import inspect
import json
import logging
import os

import torch

from comfy_api.latest import io, ui

from ..atomic_files import write_json_atomically
from .common import CATEGORY, QuickstepInputError, require_choice, require_finite
from ..samplers import caching as qc

KEY = "quickstep_cache"
SUBCATEGORY = f"{CATEGORY}/caching"
LAST_SUMMARY = {}            # name -> dict of the last finished run's figures (for the benchmark and the UI)


def _run_state(transformer_options):
    state = transformer_options.get(KEY) if transformer_options else None
    return state if isinstance(state, qc.RunState) else None


def _sigma_of(state, transformer_options):
    """The one sigma of this model call. A call that evaluates several noise levels at once (parallel-in-time
    sampling: one sigma per batch element) is refused: the cache's state follows a single step sequence."""
    s = transformer_options.get("sigmas")
    if not torch.is_tensor(s):
        return float(s)
    if s.numel() > 1 and bool((s != s.flatten()[0]).any()):
        raise QuickstepInputError(state.config.node, f"one model call evaluates several noise levels "
                                  f"({sorted({round(float(v), 4) for v in s.flatten()}, reverse=True)}), as a "
                                  "parallel-in-time sampler (Parallel-in-Time Sampling, qs_paradigms) does; the cache "
                                  "follows one step at a time: use a sequential sampler, or the model without the cache")
    return float(s.flatten()[0])


def _arguments(executor, args, kwargs):
    """The wrapped host function's arguments by name (the host passes some by position; a newer host may add or
    move them), defaults included. Call the next executor with `executor(*bound.args, **bound.kwargs)`."""
    bound = inspect.signature(executor.original).bind(*args, **kwargs)
    bound.apply_defaults()
    return bound


def _outer_sample_wrapper(executor, *args, **kwargs):
    import comfy.model_patcher
    guider = executor.class_obj
    orig = guider.model_options
    state = None
    try:
        guider.model_options = comfy.model_patcher.create_model_options_clone(orig)
        config = guider.model_options["transformer_options"][KEY]
        arguments = _arguments(executor, args, kwargs).arguments
        if config.calibration is not None:
            _check_sampler(config.node, config.calibration, arguments["sampler"])
        # the patched object (a ModelSamplingSD3 / Flux shift node's): object patches apply only when sampling loads
        state = config.new_run(arguments["sigmas"], guider.model_patcher.get_model_object("model_sampling"))
        state.measured = config.measure
        guider.model_options["transformer_options"][KEY] = state
        return executor(*args, **kwargs)
    finally:
        if state is not None:
            figures = state.finish()
            LAST_SUMMARY[state.name] = figures
            logging.info(figures["line"])
            state.clear()
        guider.model_options = orig


def _window(model_sampling, start_percent, end_percent):
    return model_sampling.percent_to_sigma(start_percent), model_sampling.percent_to_sigma(end_percent)


# -------------------------------------------------------------------------------------------------------- Calibration

CALIBRATION_FOLDER = "quickstep_cache_calibrations"
POLICIES = ("residual-probe", "calibrated")


def calibration_path(node, name):
    """Where the calibration `name` lives; the name may not leave the calibration folder."""
    import folder_paths
    if not name or not all(c.isalnum() or c in "-_" for c in name):
        raise QuickstepInputError(node, f"calibration = {name!r} may hold only letters, digits, '-' and '_'")
    if CALIBRATION_FOLDER not in folder_paths.folder_names_and_paths:
        folder_paths.add_model_folder_path(CALIBRATION_FOLDER,
                                           os.path.join(folder_paths.models_dir, CALIBRATION_FOLDER))
    folder = folder_paths.get_folder_paths(CALIBRATION_FOLDER)[0]
    os.makedirs(folder, exist_ok=True)
    return os.path.join(folder, f"{name}.json")


def model_signature(model):
    """What a calibration must match: the architecture (class, host config, parameter count) and the model's
    time parameterisation. Weights are not hashed (a LoRA-patched model keeps its base model's calibration, and the
    patched state of the weights depends on what ran before), so two fine-tunes of one architecture look alike."""
    dm = model.model.diffusion_model
    ms = model.get_model_object("model_sampling")
    return {"class": type(dm).__name__, "config": type(model.model.model_config).__name__,
            "parameters": sum(p.numel() for p in dm.parameters()),
            "prediction": getattr(getattr(model.model, "model_type", None), "name", "unknown"),
            "sigma_min": round(float(ms.sigma_min), 6), "sigma_max": round(float(ms.sigma_max), 6)}


def sampler_name(sampler):
    fn = getattr(sampler, "sampler_function", None)
    fn = getattr(fn, "func", fn)                     # functools.partial
    return getattr(fn, "__name__", None) or type(sampler).__name__


def _check_sampler(node, record, sampler):
    name = sampler_name(sampler)
    if name != record["sampler"]:
        raise QuickstepInputError(node, f"calibration {record['name']!r} was made with sampler {record['sampler']!r}, "
                                        f"this run uses {name!r}: magnitude curves differ between samplers, "
                                        "calibrate again with this sampler")


def load_calibration(node, name, cache, structure, model):
    """(record, MagnitudeCurve) of the stored calibration `name`, checked against this cache and model."""
    path = calibration_path(node, name)
    if not os.path.exists(path):
        raise QuickstepInputError(node, f"calibration = {name!r}: no file {path}; make one with the Calibrate Cache "
                                        "node on this model and sampler")
    try:
        with open(path) as f:
            record = json.load(f)
        if record.get("format") != qc.CALIBRATION_FORMAT:
            raise ValueError(f"format is {record.get('format')!r}, expected {qc.CALIBRATION_FORMAT!r}")
        curve = qc.MagnitudeCurve(record["sigmas"], record["gammas"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise QuickstepInputError(node, f"calibration = {name!r} ({path}) is not a usable calibration: {e}")
    record["name"] = name
    if record.get("cache") != cache:
        raise QuickstepInputError(node, f"calibration {name!r} was made for {record.get('cache')}, not {cache}")
    if record.get("structure") != structure:
        raise QuickstepInputError(node, f"calibration {name!r} was made with {record.get('structure')}, this cache "
                                        f"uses {structure}: the cached tensor differs, calibrate again")
    here = model_signature(model)
    diff = {k: (record.get("model", {}).get(k), v) for k, v in here.items() if record.get("model", {}).get(k) != v}
    if diff:
        raise QuickstepInputError(node, f"calibration {name!r} was made for another model: "
                                        + ", ".join(f"{k} {a!r} there, {b!r} here" for k, (a, b) in diff.items()))
    return record, curve


class CacheConfig:
    """What a cache node attaches to the model (in transformer_options[KEY]); new_run makes the per-run state."""
    node = cache = ""
    calibration = curve = measure = None

    def measuring(self):
        """A copy that computes every step and records the magnitude curve (for the Calibrate Cache node)."""
        out = copy.copy(self)
        out.measure, out.calibration, out.curve = [], None, None
        return out


# ----------------------------------------------------------------------------------------------------------- DeepCache

class DeepCacheConfig(CacheConfig):
    node, cache = "DeepCache", "DeepCache"

    def __init__(self, interval, schedule, branch, start_percent, end_percent, forecaster, history, blocks,
                 threshold=0.0, calibration=None, curve=None):
        self.interval, self.schedule, self.branch = interval, schedule, branch
        self.start_percent, self.end_percent = start_percent, end_percent
        self.forecaster, self.history, self.blocks = forecaster, history, blocks
        self.threshold, self.calibration, self.curve = threshold, calibration, curve

    def structure(self):
        return {"branch": self.branch}

    def measuring(self):
        out = super().measuring()
        out.interval, out.schedule = 1, "uniform"
        return out

    def new_run(self, sigmas, model_sampling):
        return DeepCacheRun(self, sigmas, model_sampling)


class DeepCacheRun(qc.RunState):
    def __init__(self, config, sigmas, model_sampling):
        super().__init__("DeepCache", sigmas, config.forecaster, config.history)
        self.config, self.branch, self.blocks = config, config.branch, config.blocks
        hi, lo = self.window = _window(model_sampling, config.start_percent, config.end_percent)
        window = [i for i in range(self.steps) if lo < self.sigmas[i] <= hi]
        start, end = (window[0], window[-1] + 1) if window else (self.steps, self.steps)
        if config.curve is not None:        # calibrated: `interval` - 1 partial steps in a row at most
            self.full = set(qc.calibrated_full_steps(config.curve, self.sigmas, config.threshold,
                                                     config.interval - 1, start_sigma=hi, end_sigma=lo))
        else:
            self.full = set(qc.full_steps(self.steps, config.interval, config.schedule, start, end))
        self.transformer_index = None
        self.partial_calls = 0

    def finish(self):
        calls = sum(g.calls for g in self.groups.values())
        full = sum(g.computed for g in self.groups.values())
        schedule = (f"calibrated by {self.config.calibration['name']!r} at threshold {self.config.threshold}"
                    if self.config.curve is not None else self.config.schedule)
        line = (f"DeepCache: {full}/{calls} model calls ran the whole UNet, {self.partial_calls} partial "
                f"(branch {self.branch}, interval {self.config.interval}, {schedule}, "
                f"{self.forecaster}) over {self.steps} steps; history peak {self.peak_bytes / 2 ** 20:.2f} MiB")
        return {"line": line, "calls": calls, "computed": full, "partial": self.partial_calls,
                "peak_bytes": self.peak_bytes, "steps": self.steps, "window": self.window}


def _realign_control(control, m, L):
    """ControlNet residuals for the blocks that run on a partial step (apply_control pops from the end)."""
    if not isinstance(control, dict):
        return control
    out = dict(control)
    if isinstance(control.get("input"), list):
        out["input"] = control["input"][-(m + 1):] if len(control["input"]) >= m + 1 else list(control["input"])
    if isinstance(control.get("middle"), list):
        out["middle"] = []
    if isinstance(control.get("output"), list):
        out["output"] = control["output"][:m + 1]
    return out


def _deepcache_wrapper(executor, *args, **kwargs):
    bound = _arguments(executor, args, kwargs)
    to = bound.arguments.get("transformer_options") or {}
    state = _run_state(to)
    if not isinstance(state, DeepCacheRun):
        return executor(*args, **kwargs)
    unet = executor.class_obj
    x = bound.arguments["x"]
    sigma = _sigma_of(state, to)
    step = state.step_of(sigma)
    group = state.group(to.get("uuids", []), x)
    group.calls += 1
    site = state.site(group, "deep")
    L, m = len(unet.input_blocks), state.branch
    partial = step not in state.full and len(site) > 0 and state.transformer_index is not None
    call = {"partial": partial, "first_tail": L - 1 - m, "h": None}
    state.current = call
    if not partial:
        try:
            out = executor(*args, **kwargs)
        finally:
            state.current = None
        if call["h"] is not None:
            state.record_magnitude(site, sigma, call["h"], channel_dim=1)
            site.push(sigma, call["h"])
            state.note_memory()
        group.computed += 1
        return out
    call["deep"] = site.predict(sigma)
    group.forecast_points += site.points_used
    state.partial_calls += 1
    if bound.arguments.get("control") is not None:
        bound.arguments["control"] = _realign_control(bound.arguments["control"], m, L)
    saved = (unet.input_blocks, unet.middle_block, unet.output_blocks)
    try:
        unet.input_blocks = torch.nn.ModuleList(list(saved[0])[:m + 1])
        unet.middle_block = None
        unet.output_blocks = torch.nn.ModuleList(list(saved[2])[L - 1 - m:])
        return executor(*bound.args, **bound.kwargs)
    finally:
        unet.input_blocks, unet.middle_block, unet.output_blocks = saved
        state.current = None


def _deepcache_output_patch(h, hsp, transformer_options):
    state = _run_state(transformer_options)
    call = state.current if isinstance(state, DeepCacheRun) else None
    if call is None:
        return h, hsp
    idx = transformer_options["block"][1]
    if call["partial"]:
        transformer_options["block"] = ("output", idx + call["first_tail"])
        if idx == 0:
            transformer_options["transformer_index"] = state.transformer_index
            h = call["deep"].to(device=h.device, dtype=h.dtype)
        return h, hsp
    if idx == call["first_tail"]:
        call["h"] = h.detach().clone()
        state.transformer_index = transformer_options.get("transformer_index")
    return h, hsp


DEEPCACHE_SCHEDULES = qc.SCHEDULES + ("calibrated",)
DEEPCACHE_THRESHOLD = 0.24


def _unet_class():
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    return UNetModel


class QuickstepDeepCache(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="QuickstepDeepCache",
            display_name="DeepCache (UNet)",
            category=SUBCATEGORY,
            description="DeepCache for UNet models (SD1.x, SD2, SDXL, SVD): on full steps the whole UNet runs and the "
                        "deep feature is cached; on the steps between, only the shallow branch (the first input "
                        "blocks and last output blocks) runs, with the deep feature reused or forecast in sigma. "
                        "Returns a patched copy of the model.",
            inputs=[
                io.Model.Input("model", tooltip="A UNet model (SD1.x / SD2 / SDXL / SVD family)."),
                io.Int.Input("interval", default=5, min=1, max=10,
                             tooltip="1 full step per `interval` steps inside the window; 1 never caches. 5 with "
                                     "taylor2 measured 1.62x less compute at 33.5 dB on the trained digit UNet "
                                     "(24 steps)."),
                io.Combo.Input("schedule", options=list(DEEPCACHE_SCHEDULES), default="uniform",
                               tooltip="uniform: every interval-th step is full; non-uniform: the same number of "
                                       "full steps, denser at the start and end of the window; calibrated: the "
                                       "steps MagCache's rule picks from a stored calibration (at most interval-1 "
                                       "partial steps in a row)."),
                io.Int.Input("branch", default=0, min=0, max=32,
                             tooltip="Skip branch m: partial steps run input blocks 0..m and the last m+1 output "
                                     "blocks. 0 is fastest; larger is closer to the uncached model."),
                io.Float.Input("start_percent", default=0.1, min=0.0, max=1.0, step=0.01,
                               tooltip="Caching starts at this fraction of the denoising (earlier steps are full)."),
                io.Float.Input("end_percent", default=0.95, min=0.0, max=1.0, step=0.01,
                               tooltip="Caching ends at this fraction of the denoising (later steps are full)."),
                io.Combo.Input("forecaster", options=list(qc.FORECASTERS), default="taylor2",
                               tooltip="How the cached deep feature is carried to a partial step: reuse it, Taylor "
                                       "order 1/2 in sigma, or Chebyshev least squares over the last full steps. "
                                       "taylor2 measured best on the trained digit UNet (+8 dB over reuse at equal "
                                       "compute)."),
                io.Int.Input("history", default=3, min=1, max=8,
                             tooltip="How many full steps the forecaster keeps (memory: this many deep features)."),
                io.String.Input("calibration", default="", optional=True,
                                tooltip="Name of a stored calibration (Calibrate Cache node); needed by, and only "
                                        "used with, the calibrated schedule."),
                io.Float.Input("threshold", default=DEEPCACHE_THRESHOLD, min=0.0, max=2.0, step=0.01, optional=True,
                               tooltip="Calibrated schedule only: error budget of MagCache's rule (sum of "
                                       "|1 - magnitude ratio| over partial steps in a row). Larger skips more."),
            ],
            outputs=[io.Model.Output(tooltip="The model with DeepCache.")])

    @classmethod
    def execute(cls, model, interval, schedule, branch, start_percent, end_percent, forecaster, history,
                calibration="", threshold=DEEPCACHE_THRESHOLD):
        node = "DeepCache"
        require_finite(node, "interval", interval, 1, 10)
        require_choice(node, "schedule", schedule, DEEPCACHE_SCHEDULES)
        require_finite(node, "threshold", threshold, 0.0, 2.0)
        calibration = (calibration or "").strip()
        if (schedule == "calibrated") != bool(calibration):
            raise QuickstepInputError(node, f"schedule = {schedule!r} with calibration = {calibration!r}: the "
                                            "calibrated schedule needs a calibration name, and a calibration is used "
                                            "only by the calibrated schedule")
        require_choice(node, "forecaster", forecaster, qc.FORECASTERS)
        require_finite(node, "history", history, 1, 8)
        require_finite(node, "start_percent", start_percent, 0.0, 1.0)
        require_finite(node, "end_percent", end_percent, 0.0, 1.0)
        if start_percent >= end_percent:
            raise QuickstepInputError(node, f"start_percent = {start_percent} must be below end_percent = {end_percent}")
        dm = model.model.diffusion_model
        if not isinstance(dm, _unet_class()):
            raise QuickstepInputError(node, f"model family {type(dm).__name__} is not supported: DeepCache works on "
                                            "ComfyUI's UNetModel (SD1.x, SD2, SDXL, SVD). For Flux or SD3 use Block Cache (DiT).")
        L = len(dm.input_blocks)
        if len(dm.output_blocks) != L:
            raise QuickstepInputError(node, f"this UNet has {L} input and {len(dm.output_blocks)} output blocks; "
                                            "DeepCache needs them paired")
        require_finite(node, "branch", branch, 0, L - 1)
        if KEY in model.model_options.get("transformer_options", {}):
            raise QuickstepInputError(node, "the model already carries a Quickstep cache; apply only one")
        record = curve = None
        if calibration:
            record, curve = load_calibration(node, calibration, "DeepCache", {"branch": branch}, model)
        out = model.clone()
        out.model_options["transformer_options"][KEY] = DeepCacheConfig(
            interval, schedule, branch, start_percent, end_percent, forecaster, history, L, threshold, record, curve)
        import comfy.patcher_extension as pe
        out.add_wrapper_with_key(pe.WrappersMP.OUTER_SAMPLE, KEY, _outer_sample_wrapper)
        out.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, KEY, _deepcache_wrapper)
        out.set_model_output_block_patch(_deepcache_output_patch)
        plan = (f"calibrated by {calibration!r} (threshold {threshold}, at most {interval - 1} partial in a row)"
                if calibration else f"1 full step in {interval}, {schedule}")
        text = (f"DeepCache: branch {branch} of {L} blocks, {plan}, window {start_percent}-{end_percent}, "
                f"{forecaster} forecast from {history} stored deep features; each run logs what it skipped")
        return io.NodeOutput(out, ui=ui.PreviewText(text))


# ------------------------------------------------------------------------------------------------------- Block cache

def _dit_layout(dm):
    """[(block_name, index, segment)] in execution order for supported DiTs, or None."""
    from comfy.ldm.flux.model import Flux
    from comfy.ldm.modules.diffusionmodules.mmdit import MMDiT
    classes = [(Flux, "flux")]
    try:
        from comfy.ldm.chroma.model import Chroma
        classes.append((Chroma, "chroma"))
    except ImportError:
        pass
    for cls_, _ in classes:
        if isinstance(dm, cls_):
            return ([("double_block", i, 0) for i in range(len(dm.double_blocks))] +
                    [("single_block", i, 1) for i in range(len(dm.single_blocks))])
    if isinstance(dm, MMDiT):
        return [("double_block", i, 0) for i in range(len(dm.joint_blocks))]
    return None


SUPPORTED_DITS = "Flux (FLUX.1, Flux-based), Chroma and SD3/SD3.5 (MMDiT)"


class BlockCacheConfig(CacheConfig):
    node, cache = "Block Cache", "BlockCache"

    def __init__(self, layout, front, back, policy_args, forecaster, history, always, calibration=None, curve=None):
        self.layout, self.front, self.back = layout, front, back
        self.policy_args, self.forecaster, self.history, self.always = policy_args, forecaster, history, always
        self.calibration, self.curve = calibration, curve

    def structure(self):
        return {"front_blocks": self.front, "back_blocks": self.back, "blocks": len(self.layout)}

    def measuring(self):
        out = super().measuring()
        out.policy_args = dict(self.policy_args, threshold=0.0)
        return out

    def new_run(self, sigmas, model_sampling):
        return BlockCacheRun(self, sigmas, model_sampling)


class BlockCacheRun(qc.RunState):
    def __init__(self, config, sigmas, model_sampling):
        super().__init__("BlockCache", sigmas, config.forecaster, config.history)
        self.config = config
        a = config.policy_args
        hi, lo = self.window = _window(model_sampling, a["start_percent"], a["end_percent"])
        steps = self.steps
        always = frozenset(i % steps for i in config.always if -steps <= i < steps)
        self.policy = qc.SkipPolicy(a["threshold"], a["warmup"], a["max_consecutive"], hi, lo, always)
        self.planned = None             # calibrated: the steps that compute, fixed before sampling
        if config.curve is not None:
            self.planned = frozenset(qc.calibrated_full_steps(config.curve, self.sigmas, a["threshold"],
                                                              a["max_consecutive"], a["warmup"], hi, lo, always))
        n = len(config.layout)
        self.n, self.mid_lo, self.mid_hi = n, config.front, n - config.back
        self.blocks_run = 0
        self.blocks_total = 0

    def finish(self):
        calls = sum(g.calls for g in self.groups.values())
        computed = sum(g.computed for g in self.groups.values())
        cached = calls - computed
        fc = sum(g.forecast_points for g in self.groups.values())
        ratio = self.blocks_total / self.blocks_run if self.blocks_run else 1.0
        policy = (f"calibrated by {self.config.calibration['name']!r}" if self.planned is not None
                  else "residual probe")
        line = (f"BlockCache F{self.config.front}B{self.config.back} ({policy}, threshold "
                f"{self.config.policy_args['threshold']}): computed {computed}/{calls} model calls over "
                f"{self.steps} steps, {cached} cached"
                + (f" ({self.forecaster} forecast from {fc / cached:.1f} points avg)" if cached and self.forecaster != "reuse" else "")
                + f", blocks run {self.blocks_run}/{self.blocks_total} ({ratio:.2f}x less block compute), "
                f"history peak {self.peak_bytes / 2 ** 20:.2f} MiB")
        return {"line": line, "calls": calls, "computed": computed, "blocks_run": self.blocks_run,
                "blocks_total": self.blocks_total, "peak_bytes": self.peak_bytes, "steps": self.steps,
                "window": self.window}


def _streams(d, clone=False):
    """The hidden-state streams of a block's args or output. The host's blocks update their inputs in place
    (img += ...), so inputs kept across a block are cloned."""
    return {k: (d[k].clone() if clone and d[k] is not None else d[k])
            for k in ("img", "txt") if k in d and (torch.is_tensor(d[k]) or d[k] is None)}


def _make_block_patch(pos):
    def patch(args, extra):
        to = args.get("transformer_options", {})
        state = _run_state(to)
        if not isinstance(state, BlockCacheRun):
            return extra["original_block"](args)
        layout = state.config.layout
        seg = layout[pos][2]
        if pos == 0 or state.current is None:
            sigma = _sigma_of(state, to)
            group = state.group(to.get("uuids", []), args["img"])
            group.calls += 1
            state.current = {"group": group, "sigma": sigma, "step": state.step_of(sigma), "compute": True,
                             "probe_base": None, "mid_in": {}, "probe_seg": None}
        call = state.current
        group, sigma = call["group"], call["sigma"]
        state.blocks_total += 1
        if pos < state.mid_lo:                                    # front blocks: always run, probe at the last one
            if call["probe_seg"] != seg:
                call["probe_seg"], call["probe_base"] = seg, args["img"].clone()
            out = extra["original_block"](args)
            state.blocks_run += 1
            if pos == state.mid_lo - 1:
                _decide(state, call, group, sigma, out["img"] - call["probe_base"])
        elif pos < state.mid_hi:                                  # middle blocks
            first = pos == state.mid_lo or layout[pos - 1][2] != seg
            last = pos == state.mid_hi - 1 or layout[pos + 1][2] != seg
            if first:
                call["mid_in"][seg] = _streams(args, clone=True)
            if call["compute"]:
                out = extra["original_block"](args)
                state.blocks_run += 1
                if last:
                    for k, v in _streams(out).items():
                        start = call["mid_in"][seg].get(k)
                        value = None if (v is None or start is None) else (v - start)
                        site = state.site(group, f"{seg}:{k}")
                        if k == "img" and pos == state.mid_hi - 1:     # the residual entering the back blocks
                            state.record_magnitude(site, sigma, value, channel_dim=-1)
                        site.push(sigma, value)
                    state.note_memory()
            else:
                if not last:
                    out = _streams(args)
                else:
                    out = {}
                    for k, start in call["mid_in"][seg].items():
                        site = group.sites.get(f"{seg}:{k}")
                        pred = site.predict(sigma) if site is not None and site.values[-1] is not None else None
                        out[k] = None if pred is None or start is None else start + pred.to(start)
                        if k == "img" and pos == state.mid_hi - 1:
                            group.forecast_points += site.points_used
        else:                                                     # back blocks: always run
            out = extra["original_block"](args)
            state.blocks_run += 1
        if pos == state.n - 1:
            state.current = None
        return out
    return patch


def _decide(state, call, group, sigma, probe):
    site = state.site(group, "probe")
    middle_ready = all(len(f) for name, f in group.sites.items() if name != "probe") and len(group.sites) > 1
    compute = True
    if state.planned is not None:
        compute = call["step"] in state.planned or not middle_ready
    elif len(site) and middle_ready and state.policy.may_cache(call["step"], sigma, group.consecutive):
        pred = site.predict(sigma)
        change = qc.relative_l1(probe, pred) if pred.shape == probe.shape else float("inf")
        group.last_change = change
        compute = not state.policy.skip(change)
    call["compute"] = compute
    if compute:
        site.push(sigma, probe.detach())
        group.consecutive = 0
        group.computed += 1
    else:
        group.consecutive += 1


def _parse_mask(node, text):
    out = set()
    for part in (text or "").replace(";", ",").split(","):
        part = part.strip()
        if not part:
            continue
        try:
            out.add(int(part))
        except ValueError:
            raise QuickstepInputError(node, f"compute_steps entry {part!r} is not an integer step index")
    return frozenset(out)


class QuickstepBlockCache(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="QuickstepBlockCache",
            display_name="Block Cache (DiT)",
            category=SUBCATEGORY,
            description="Dual-block cache for DiT models (Flux, Chroma, SD3/MMDiT): the first and last blocks always "
                        "run; when the first blocks' residual barely changes, the middle blocks are skipped and their "
                        "residual is reused or forecast in sigma from the last computed steps. front 1 / back 0 is "
                        "First-Block Cache. Returns a patched copy of the model.",
            inputs=[
                io.Model.Input("model", tooltip=f"A DiT model: {SUPPORTED_DITS}."),
                io.Float.Input("threshold", default=0.3, min=0.0, max=2.0, step=0.01,
                               tooltip="Skip the middle while the first blocks' residual differs from its forecast "
                                       "by less than this (relative L1). 0 never skips; larger skips more. At the "
                                       "defaults (24 euler steps, CFG 3) measured 2.86x less compute at 35.8 dB on "
                                       "a smooth 12-block host Flux and 2.96x at 35.3 dB on a 12-block MMDiT."),
                io.Int.Input("front_blocks", default=1, min=1, max=64,
                             tooltip="Fn: blocks always computed at the start; their residual decides."),
                io.Int.Input("back_blocks", default=1, min=0, max=64,
                             tooltip="Bn: blocks always computed at the end, on top of the cached middle."),
                io.Combo.Input("forecaster", options=list(qc.FORECASTERS), default="taylor1",
                               tooltip="How the middle's residual is carried to a cached step: reuse, Taylor order "
                                       "1/2 in sigma, or Chebyshev least squares over the last computed steps. "
                                       "taylor1 measured best on the smooth host DiTs (+7.5 to +8.4 dB over reuse "
                                       "on the same compute steps; taylor2 overshoots over long cached runs)."),
                io.Int.Input("warmup_steps", default=1, min=0, max=100,
                             tooltip="The first steps that always compute (the probe still guards the next ones)."),
                io.Int.Input("max_consecutive", default=6, min=1, max=100,
                             tooltip="At most this many cached steps in a row: a cap on how far the forecast "
                                     "extrapolates, whatever the probe says."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Caching is allowed from this fraction of the denoising on."),
                io.Float.Input("end_percent", default=0.95, min=0.0, max=1.0, step=0.01,
                               tooltip="Caching stops at this fraction of the denoising (the last steps compute)."),
                io.Int.Input("history", default=3, min=1, max=8,
                             tooltip="Computed steps the forecaster keeps (memory: this many middle residuals)."),
                io.String.Input("compute_steps", default="", optional=True,
                                tooltip="Optional static mask: comma-separated step indices that always compute "
                                        "(negative counts from the end, e.g. 0,1,-1)."),
                io.Combo.Input("policy", options=list(POLICIES), default="residual-probe", optional=True,
                               tooltip="residual-probe: skip while the front blocks' residual matches its forecast "
                                       "(threshold = relative L1). calibrated: MagCache's rule on a stored "
                                       "calibration (threshold = error budget, sum of |1 - magnitude ratio|)."),
                io.String.Input("calibration", default="", optional=True,
                                tooltip="Name of a stored calibration (Calibrate Cache node); needed by, and only "
                                        "used with, the calibrated policy."),
            ],
            outputs=[io.Model.Output(tooltip="The model with the block cache.")])

    @classmethod
    def execute(cls, model, threshold, front_blocks, back_blocks, forecaster, warmup_steps, max_consecutive,
                start_percent, end_percent, history, compute_steps="", policy="residual-probe", calibration=""):
        node = "Block Cache"
        require_choice(node, "policy", policy, POLICIES)
        calibration = (calibration or "").strip()
        if (policy == "calibrated") != bool(calibration):
            raise QuickstepInputError(node, f"policy = {policy!r} with calibration = {calibration!r}: the calibrated "
                                            "policy needs a calibration name, and a calibration is used only by the "
                                            "calibrated policy")
        require_finite(node, "threshold", threshold, 0.0, 2.0)
        require_finite(node, "front_blocks", front_blocks, 1, 64)
        require_finite(node, "back_blocks", back_blocks, 0, 64)
        require_choice(node, "forecaster", forecaster, qc.FORECASTERS)
        require_finite(node, "warmup_steps", warmup_steps, 0, 100)
        require_finite(node, "max_consecutive", max_consecutive, 1, 100)
        require_finite(node, "start_percent", start_percent, 0.0, 1.0)
        require_finite(node, "end_percent", end_percent, 0.0, 1.0)
        require_finite(node, "history", history, 1, 8)
        if start_percent >= end_percent:
            raise QuickstepInputError(node, f"start_percent = {start_percent} must be below end_percent = {end_percent}")
        always = _parse_mask(node, compute_steps)
        dm = model.model.diffusion_model
        layout = _dit_layout(dm)
        if layout is None:
            raise QuickstepInputError(node, f"model family {type(dm).__name__} is not supported; supported: "
                                            f"{SUPPORTED_DITS}. For SD1.x/SDXL UNets use DeepCache (UNet).")
        if front_blocks + back_blocks >= len(layout):
            raise QuickstepInputError(node, f"front_blocks + back_blocks = {front_blocks + back_blocks} leaves no middle "
                                            f"block to cache: this model has {len(layout)} blocks")
        if KEY in model.model_options.get("transformer_options", {}):
            raise QuickstepInputError(node, "the model already carries a Quickstep cache; apply only one")
        record = curve = None
        if calibration:
            record, curve = load_calibration(node, calibration, "BlockCache", {
                "front_blocks": front_blocks, "back_blocks": back_blocks, "blocks": len(layout)}, model)
        out = model.clone()
        out.model_options["transformer_options"][KEY] = BlockCacheConfig(
            layout, front_blocks, back_blocks,
            {"threshold": threshold, "warmup": warmup_steps, "max_consecutive": max_consecutive,
             "start_percent": start_percent, "end_percent": end_percent}, forecaster, history, always, record, curve)
        import comfy.patcher_extension as pe
        out.add_wrapper_with_key(pe.WrappersMP.OUTER_SAMPLE, KEY, _outer_sample_wrapper)
        for pos, (name, index, _) in enumerate(layout):
            out.set_model_patch_replace(_make_block_patch(pos), "dit", name, index)
        rule = (f"calibrated by {calibration!r}, error budget {threshold}" if calibration
                else f"residual probe, threshold {threshold}")
        text = (f"Block Cache F{front_blocks}B{back_blocks} of {len(layout)} blocks: {rule}, at most "
                f"{max_consecutive} cached in a row, {forecaster} forecast from {history} stored residuals per "
                "stream; each run logs what it skipped")
        return io.NodeOutput(out, ui=ui.PreviewText(text))


# -------------------------------------------------------------------------------------------- Calibrate Cache node

def calibrate(model, positive, negative, cfg, sampler, sigmas, latent, seed, name, node="Calibrate Cache"):
    """Sample once with the model's Quickstep cache computing every step, store the measured magnitude curve as
    calibration `name` and return the record."""
    import comfy.sample
    import comfy.utils
    config = model.model_options.get("transformer_options", {}).get(KEY)
    if not isinstance(config, CacheConfig):
        raise QuickstepInputError(node, "the model carries no Quickstep cache: connect the output of DeepCache (UNet) "
                                        "or Block Cache (DiT) with the layout to calibrate")
    if sigmas.ndim != 1 or sigmas.shape[0] < 3:
        raise QuickstepInputError(node, f"sigmas has {max(int(sigmas.shape[0]) - 1, 0)} steps; calibration needs >= 2")
    path = calibration_path(node, name)
    measuring = config.measuring()
    patched = model.clone()
    patched.model_options["transformer_options"][KEY] = measuring
    samples = comfy.sample.fix_empty_latent_channels(patched, latent["samples"])
    noise = comfy.sample.prepare_noise(samples, seed, latent.get("batch_index"))
    # The host's progress bar: shows the run in the UI and is where the host checks for an interrupt.
    bar = comfy.utils.ProgressBar(len(sigmas) - 1)
    comfy.sample.sample_custom(patched, noise, cfg, sampler, sigmas, positive, negative, samples,
                               noise_mask=latent.get("noise_mask"), disable_pbar=True, seed=seed,
                               callback=lambda step, x0, x, total: bar.update_absolute(step + 1, total))
    try:
        curve = qc.MagnitudeCurve.from_measurements(float(sigmas[0]), measuring.measure)
    except ValueError as e:
        raise QuickstepInputError(node, f"the run gave no usable magnitude curve ({e})")
    record = {"format": qc.CALIBRATION_FORMAT, "cache": config.cache, "structure": config.structure(),
              "model": model_signature(model), "sampler": sampler_name(sampler), "cfg": float(cfg),
              "steps": int(sigmas.shape[0]) - 1, "sigmas": curve.sigmas, "gammas": curve.gammas}
    write_json_atomically(path, record)
    logging.info(f"{node}: wrote {path} ({len(curve.gammas)} points, gamma {min(curve.gammas):.3f}.."
                 f"{max(curve.gammas):.3f})")
    return record


class QuickstepCacheCalibration(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="QuickstepCacheCalibration",
            display_name="Calibrate Cache",
            category=SUBCATEGORY,
            description="MagCache-style calibration: samples once with the connected cache computing every step, "
                        "measures the magnitude curve of the tensor it caches (on your model, sampler, steps and "
                        "size) and stores it by name for the cache nodes' calibrated policy. Outputs the name.",
            inputs=[
                io.Model.Input("model", tooltip="The output of DeepCache (UNet) or Block Cache (DiT) with the branch / "
                                                "front and back blocks you will use."),
                io.Conditioning.Input("positive", tooltip="Positive conditioning of the calibration run."),
                io.Conditioning.Input("negative", tooltip="Negative conditioning of the calibration run."),
                io.Float.Input("cfg", default=4.0, min=0.0, max=100.0, step=0.1,
                               tooltip="CFG scale of the calibration run (use your own)."),
                io.Sampler.Input("sampler", tooltip="The sampler you will use: the calibration is tied to it."),
                io.Sigmas.Input("sigmas", tooltip="The schedule to calibrate on; other step counts of the same "
                                                  "model are interpolated in sigma."),
                io.Latent.Input("latent_image", tooltip="Latent of the size you will sample."),
                io.Int.Input("noise_seed", default=0, min=0, max=0xffffffffffffffff,
                             tooltip="Seed of the calibration run's noise."),
                io.String.Input("name", default="my_calibration",
                                tooltip="File name (letters, digits, '-', '_') under "
                                        f"models/{CALIBRATION_FOLDER}/; an existing one is replaced."),
            ],
            outputs=[io.String.Output(display_name="calibration",
                                      tooltip="The calibration name, for the cache nodes' calibration input.")])

    @classmethod
    def execute(cls, model, positive, negative, cfg, sampler, sigmas, latent_image, noise_seed, name):
        node = "Calibrate Cache"
        require_finite(node, "cfg", cfg, 0.0, 100.0)
        record = calibrate(model, positive, negative, cfg, sampler, sigmas, latent_image, noise_seed, name, node)
        g = record["gammas"]
        text = (f"{record['cache']} calibration {name!r}: {record['steps']} steps with {record['sampler']}, "
                f"magnitude ratio per step {min(g):.3f}..{max(g):.3f}")
        return io.NodeOutput(name, ui=ui.PreviewText(text))


NODES = [QuickstepDeepCache, QuickstepBlockCache, QuickstepCacheCalibration]
