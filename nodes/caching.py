"""Feature caches as MODEL -> MODEL nodes: DeepCache for the host UNet, a dual-block cache (DBCache / first-block
cache) with forecasting for the host DiTs that offer block patches, and a model-level forecasting cache for every
model. What a cache computes (policy, forecaster, calibration) is one samplers.caching.CacheConfig; what it does in a
run is a samplers.cache_runs RunState. This file is the host glue: layouts of the host's model classes, wrappers and
patches, calibration files, the nodes.

How they hook into the host (public extension points only; the input model is never modified, a clone is patched):

- OUTER_SAMPLE wrapper (every cache): creates the run's state (sigma schedule, window in sigma, empty history) in a
  clone of the guider's model_options, and in `finally` (success, error or interrupt) logs what it did and frees
  every cached tensor. Nothing survives into the next prompt; a model call outside a sampling run passes through.
  Each patched model has its own state: a Wan 2.2 high-noise and low-noise expert, each through its own cache node
  and KSamplerAdvanced, never see each other's history, and each run starts computing.

- DeepCache (comfy.ldm.modules.diffusionmodules.openaimodel.UNetModel): a DIFFUSION_MODEL wrapper plus an
  output_block_patch. Full steps run the UNet unchanged; the output_block_patch stores the deep feature h* that
  enters output block L-1-m (after any output_block_patch registered before ours, e.g. FreeU). On a partial step the
  wrapper hands the UNet's own forward shortened block containers for the duration of that one call:
  input_blocks[:m+1], no middle block, output_blocks[L-1-m:], restored in `finally`. The host's forward, its emb /
  input / output patches and attention patches all still run; the output_block_patch swaps in h* (or its forecast)
  for the first remaining output block and restores the block ids and transformer_index the skipped blocks would
  have advanced, so attention patches keyed by ("output", n) still see the right blocks. ControlNet residuals are
  re-aligned to the blocks that run (the deep ones are inside the cached feature).

- Block Cache (host DiTs whose forward offers patches_replace["dit"] per block: Flux / Flux 2, Chroma, SD3 MMDiT,
  Wan 2.1/2.2, Qwen-Image, HunyuanVideo, LTXV; see DIT_FAMILIES): one patch per block. The first Fn blocks always
  run; from the change of their residual against its forecast (last computed steps) the policy decides whether the
  middle runs. If it runs, the middle's residual (per stream: img, txt) is stored at each sigma; if not, the middle
  blocks return their input and the last one adds the forecast residual. The last Bn blocks always run on top.
  ControlNet / VACE residuals the host adds between blocks still run on every block.

- Model Cache (every model: an APPLY_MODEL wrapper, which every host model passes through): caches the model's
  denoised prediction and forecasts it; see samplers.cache_runs.ModelCacheRun. HiDream and Lumina2 / Z-Image offer
  no block patch: this is their cache.

- Calibrated policy (MagCache): the Calibrate Cache node samples once with the cache computing every step, records
  the magnitude curve of the cached tensor and writes it as JSON (write-then-rename) under
  models/quickstep_cache_calibrations/. A cache node set to the calibrated policy loads it, checks it was made for
  this cache layout and model (and, when sampling starts, this sampler and this schedule's sigma range), and
  computes the steps MagCache's rule picks on the run's own sigmas.

State is per run, per batch group (the uuids of the conds evaluated together: CFG positive/negative keep separate
histories) and reset when the input shape, dtype or device change (batch size, resolution).
"""
import functools
import inspect
import json
import logging
import os
from dataclasses import dataclass, field, replace

import torch

from comfy_api.latest import io, ui

from ..atomic_files import write_json_atomically
from .common import CATEGORY, QuickstepInputError, require_choice, require_finite
from ..samplers import cache_runs as runs
from ..samplers import caching as qc

KEY = "quickstep_cache"
SUBCATEGORY = f"{CATEGORY}/caching"
LAST_SUMMARY = {}            # name -> dict of the last finished run's figures (for the benchmark and the UI)


def _run_state(transformer_options):
    state = transformer_options.get(KEY) if transformer_options else None
    return state if isinstance(state, qc.RunState) else None


@functools.lru_cache(maxsize=None)
def _signature(function, bound):
    signature = inspect.signature(function)
    return signature.replace(parameters=list(signature.parameters.values())[1:]) if bound else signature


def signature_of(callable_):
    """inspect.signature of a wrapped host function, computed once per function: the wrappers read it on every model
    call, and a bound method (a new object each call) is keyed by its function, so no model is kept alive."""
    function = getattr(callable_, "__func__", None)
    return _signature(function, True) if function is not None else _signature(callable_, False)


def wrapper_argument(executor, args, kwargs, name, default=None):
    """Argument `name` of the call a wrapper intercepts, read by name from the wrapped function's signature (the
    host's positions differ between models and versions); `default` when the call does not pass it."""
    signature = signature_of(executor.original)
    bound = signature.bind_partial(*args, **kwargs).arguments
    if name in bound:
        return bound[name]
    for p in signature.parameters.values():
        if p.kind is p.VAR_KEYWORD:
            return bound.get(p.name, {}).get(name, default)
    return default


def _sigma_of(transformer_options, node):
    """The one sigma of a model call. A cache keeps one history per batch group in the run's own time, so a call
    with different sigmas per sample (parallel-in-time sampling batches several steps) cannot be served."""
    s = transformer_options.get("sigmas")
    if not torch.is_tensor(s):
        return float(s)
    flat = s.detach().flatten()
    if flat.numel() > 1 and not bool((flat == flat[0]).all()):
        raise QuickstepInputError(node, f"one model call evaluates several noise levels "
                                        f"({', '.join(f'{float(v):.4g}' for v in flat[:4])}...), as a "
                                        "parallel-in-time sampler (Parallel-in-Time Sampling, qs_paradigms) does: a "
                                        "cache keeps one history per step; use a sequential sampler, or the model "
                                        "without the cache")
    return float(flat[0])


def _outer_sample_wrapper(executor, *args, **kwargs):
    import comfy.model_management
    import comfy.model_patcher
    guider = executor.class_obj
    orig = guider.model_options
    state = None
    try:
        guider.model_options = comfy.model_patcher.create_model_options_clone(orig)
        setup = guider.model_options["transformer_options"][KEY]
        sigmas = wrapper_argument(executor, args, kwargs, "sigmas")
        sampler = wrapper_argument(executor, args, kwargs, "sampler")
        if setup.config.calibration is not None:
            try:
                setup.config.calibration.check_sampler(sampler_name(sampler))
            except ValueError as e:
                raise QuickstepInputError(setup.node, str(e))
        state = setup.new_run(sigmas, guider.model_patcher.get_model_object("model_sampling"),
                              comfy.model_management.unet_offload_device())
        guider.model_options["transformer_options"][KEY] = state
        return executor(*args, **kwargs)
    finally:
        if state is not None:
            figures = state.finish()
            LAST_SUMMARY[state.name] = figures
            if state.measured is not None:
                setup.measured = state.measured
            logging.info(figures["line"])
            state.clear()
        guider.model_options = orig


@dataclass
class CacheSetup:
    """What a cache node attaches to the model (in transformer_options[KEY]): the node's name, the cache kind, its
    layout (plain dict: what is cached where), one CacheConfig and the RunState class; new_run makes a run's state."""
    node: str
    cache: str
    layout: dict
    config: qc.CacheConfig
    run_class: type
    measured: list = field(default=None)

    def structure(self):
        return structure_of(self.layout)

    def measuring(self):
        return replace(self, config=self.config.measuring(), layout=dict(self.layout, **MEASURING_LAYOUT),
                       measured=None)

    def new_run(self, sigmas, model_sampling, storage):
        hi = model_sampling.percent_to_sigma(self.config.start_percent)
        lo = model_sampling.percent_to_sigma(self.config.end_percent)
        try:
            return self.run_class(self.config, self.layout, sigmas, hi, lo, storage)
        except ValueError as e:              # a calibration made for another schedule's sigma range
            raise QuickstepInputError(self.node, str(e))


STRUCTURE_KEYS = ("branch", "front_blocks", "back_blocks", "blocks")


def structure_of(layout):
    """What a calibration must match besides the cache kind: the layout entries that define the cached tensor."""
    return {k: v for k, v in layout.items() if k in STRUCTURE_KEYS}
MEASURING_LAYOUT = {"interval": 1, "schedule": "uniform"}


def _attach(node, model, cache, layout, config, run_class):
    """A clone of `model` carrying the cache: its setup and the OUTER_SAMPLE wrapper (the caller adds patches)."""
    import comfy.patcher_extension as pe
    if KEY in model.model_options.get("transformer_options", {}):
        raise QuickstepInputError(node, "the model already carries a Quickstep cache; apply only one")
    out = model.clone()
    out.model_options["transformer_options"][KEY] = CacheSetup(node, cache, layout, config, run_class)
    out.add_wrapper_with_key(pe.WrappersMP.OUTER_SAMPLE, KEY, _outer_sample_wrapper)
    return out


def _config(node, **values):
    """A CacheConfig from a node's inputs; an invalid value is the node's input error."""
    try:
        return qc.CacheConfig(**values)
    except ValueError as e:
        raise QuickstepInputError(node, str(e))


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


# -------------------------------------------------------------------------------------------------------- Calibration

CALIBRATION_FOLDER = "quickstep_cache_calibrations"
POLICIES = qc.POLICIES


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
    patched state of the weights depends on what ran before), so two fine-tunes of one architecture look alike:
    a Wan 2.2 high-noise and low-noise expert are told apart by the sigma range a calibration covers."""
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


def load_calibration(node, name, cache, structure, model):
    """The stored calibration `name` (a samplers.caching.Calibration), checked against this cache and model."""
    path = calibration_path(node, name)
    if not os.path.exists(path):
        raise QuickstepInputError(node, f"calibration = {name!r}: no file {path}; make one with the Calibrate Cache "
                                        "node on this model and sampler")
    try:
        with open(path) as f:
            calibration = qc.Calibration.from_record(name, json.load(f))
    except (OSError, ValueError, TypeError) as e:
        raise QuickstepInputError(node, f"calibration = {name!r} ({path}) is not a usable calibration: {e}")
    try:
        calibration.check(cache, structure, model_signature(model))
    except ValueError as e:
        raise QuickstepInputError(node, str(e))
    return calibration


def _policy_inputs(node, policy, calibration, policy_name="policy"):
    """The calibration name, checked against the policy (or DeepCache's schedule) that uses it."""
    calibration = (calibration or "").strip()
    if (policy == "calibrated") != bool(calibration):
        raise QuickstepInputError(node, f"{policy_name} = {policy!r} with calibration = {calibration!r}: the "
                                        f"calibrated {policy_name} needs a calibration name, and a calibration is "
                                        f"used only by the calibrated {policy_name}")
    return calibration


def few_step_input(default=qc.FEW_STEP_LIMIT):
    return io.Int.Input("few_step_limit", default=default, min=0, max=100, optional=True,
                        tooltip="A run of this many steps or fewer computes every step: distilled few-step "
                                "schedules (Lightning, LCM, CausVid, 4-8 steps) have no step to spare. 0: never "
                                "back off.")


def offload_input():
    return io.Boolean.Input("offload", default=False, optional=True,
                            tooltip="Keep the cached tensors on the offload device (system RAM) instead of the GPU: "
                                    "less VRAM, a copy per cached and computed step.")


# ----------------------------------------------------------------------------------------------------------- DeepCache

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


def _with_argument(executor, args, kwargs, name, value):
    """(args, kwargs) of the intercepted call with argument `name` replaced, wherever the caller put it."""
    bound = signature_of(executor.original).bind(*args, **kwargs)
    bound.arguments[name] = value
    return bound.args, bound.kwargs


def _deepcache_wrapper(executor, *args, **kwargs):
    to = wrapper_argument(executor, args, kwargs, "transformer_options", {})
    state = _run_state(to)
    if not isinstance(state, runs.DeepCacheRun):
        return executor(*args, **kwargs)
    unet = executor.class_obj
    x = wrapper_argument(executor, args, kwargs, "x")
    sigma = _sigma_of(to, "DeepCache")
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
    control = wrapper_argument(executor, args, kwargs, "control")
    if control is not None:
        args, kwargs = _with_argument(executor, args, kwargs, "control", _realign_control(control, m, L))
    saved = (unet.input_blocks, unet.middle_block, unet.output_blocks)
    try:
        unet.input_blocks = torch.nn.ModuleList(list(saved[0])[:m + 1])
        unet.middle_block = None
        unet.output_blocks = torch.nn.ModuleList(list(saved[2])[L - 1 - m:])
        return executor(*args, **kwargs)
    finally:
        unet.input_blocks, unet.middle_block, unet.output_blocks = saved
        state.current = None


def _deepcache_output_patch(h, hsp, transformer_options):
    state = _run_state(transformer_options)
    call = state.current if isinstance(state, runs.DeepCacheRun) else None
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
                                     "(24 steps), but at 64x64 only 1.62x at 18.2 dB (eps) and 2.26x at 16.5 dB "
                                     "(flow, where the host's EasyCache beats it and the Model Cache at threshold "
                                     "0.1 gives 2.18x at 30 dB); 2 kept 32-33 dB there."),
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
                few_step_input(),
                offload_input(),
            ],
            outputs=[io.Model.Output(tooltip="The model with DeepCache.")])

    @classmethod
    def execute(cls, model, interval, schedule, branch, start_percent, end_percent, forecaster, history,
                calibration="", threshold=DEEPCACHE_THRESHOLD, few_step_limit=qc.FEW_STEP_LIMIT, offload=False):
        node = "DeepCache"
        require_finite(node, "interval", interval, 1, 10)
        require_choice(node, "schedule", schedule, DEEPCACHE_SCHEDULES)
        calibration = _policy_inputs(node, schedule, calibration, "schedule")
        require_choice(node, "forecaster", forecaster, qc.FORECASTERS)
        dm = model.model.diffusion_model
        if not isinstance(dm, _unet_class()):
            raise QuickstepInputError(node, f"model family {type(dm).__name__} is not supported: DeepCache works on "
                                            "ComfyUI's UNetModel (SD1.x, SD2, SDXL, SVD). For a DiT use Block Cache "
                                            "(DiT) or Model Cache (any model).")
        L = len(dm.input_blocks)
        if len(dm.output_blocks) != L:
            raise QuickstepInputError(node, f"this UNet has {L} input and {len(dm.output_blocks)} output blocks; "
                                            "DeepCache needs them paired")
        require_finite(node, "branch", branch, 0, L - 1)
        layout = {"branch": branch, "unet_blocks": L, "interval": interval, "schedule": schedule}
        config = _config(node, threshold=threshold, warmup=0, max_consecutive=interval - 1, forecaster=forecaster,
                         history=history, start_percent=start_percent, end_percent=end_percent,
                         few_step_limit=few_step_limit, offload=bool(offload))
        if calibration:
            config = replace(config, calibration=load_calibration(node, calibration, "DeepCache",
                                                                  structure_of(layout), model))
        import comfy.patcher_extension as pe
        out = _attach(node, model, "DeepCache", layout, config, runs.DeepCacheRun)
        out.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, KEY, _deepcache_wrapper)
        out.set_model_output_block_patch(_deepcache_output_patch)
        plan = (f"calibrated by {calibration!r} (threshold {threshold}, at most {interval - 1} partial in a row)"
                if calibration else f"1 full step in {interval}, {schedule}")
        text = (f"DeepCache: branch {branch} of {L} blocks, {plan}, window {start_percent}-{end_percent}, "
                f"{forecaster} forecast from {history} stored deep features"
                + (f", off at <= {few_step_limit} steps" if few_step_limit else "")
                + ("; history on the offload device" if offload else "") + "; each run logs what it skipped")
        return io.NodeOutput(out, ui=ui.PreviewText(text))


# ------------------------------------------------------------------------------------------------------- Block cache

@dataclass(frozen=True)
class DitFamily:
    """A host DiT family whose forward offers patches_replace["dit"] per block. `classes`: the host class names
    served (exact types: a subclass may hand its blocks other arguments, e.g. LTXAV's (video, audio) pair on 0.33).
    `blocks`: (patch name, block list attribute, streams the blocks update) in execution order, one segment each;
    streams: "img+txt" (double stream), "img" (text only read: Wan, LTXV), "joined" (single stream over img + txt).
    text_tokens: a typical prompt's token count, for the memory estimate."""
    name: str
    module: str
    classes: tuple
    blocks: tuple
    text_tokens: int
    video: bool = False


DOUBLE_SINGLE = (("double_block", "double_blocks", "img+txt"), ("single_block", "single_blocks", "joined"))
DIT_FAMILIES = (
    DitFamily("Flux / Flux 2", "comfy.ldm.flux.model", ("Flux",), DOUBLE_SINGLE, 512),
    DitFamily("Chroma", "comfy.ldm.chroma.model", ("Chroma",), DOUBLE_SINGLE, 512),
    DitFamily("Chroma Radiance", "comfy.ldm.chroma_radiance.model", ("ChromaRadiance",), DOUBLE_SINGLE, 512),
    DitFamily("HunyuanVideo / HunyuanImage", "comfy.ldm.hunyuan_video.model", ("HunyuanVideo",), DOUBLE_SINGLE, 256,
              video=True),
    DitFamily("SD3 / SD3.5 (MMDiT)", "comfy.ldm.modules.diffusionmodules.mmdit", ("MMDiT", "OpenAISignatureMMDITWrapper"),
              (("double_block", "joint_blocks", "img+txt"),), 333),
    DitFamily("Wan 2.1 / 2.2", "comfy.ldm.wan.model",
              ("WanModel", "VaceWanModel", "CameraWanModel", "HumoWanModel"), (("double_block", "blocks", "img"),),
              512, video=True),
    DitFamily("Wan 2.2 Animate", "comfy.ldm.wan.model_animate", ("AnimateWanModel",),
              (("double_block", "blocks", "img"),), 512, video=True),
    DitFamily("Qwen-Image", "comfy.ldm.qwen_image.model", ("QwenImageTransformer2DModel",),
              (("double_block", "transformer_blocks", "img+txt"),), 256),
    DitFamily("LTXV", "comfy.ldm.lightricks.model", ("LTXVModel",),
              (("double_block", "transformer_blocks", "img"),), 128, video=True),
)
SUPPORTED_DITS = ", ".join(f.name for f in DIT_FAMILIES)
# Host DiTs without a usable block patch, and why: the Model Cache serves them.
NO_BLOCK_PATCH = {
    "HiDreamImageTransformer2DModel": "HiDream's forward offers no block patch",
    "NextDiT": "Lumina2 / Z-Image's forward offers no block patch",
    "WanModel_S2V": "Wan 2.2 S2V's block patch gets no transformer_options on ComfyUI 0.3.75",
    "LTXAVModel": "LTX-2's block patch carries a (video, audio) pair",
}


def dit_family(dm):
    """The DitFamily serving the diffusion model `dm` (exact class match), or None."""
    import importlib
    for family in DIT_FAMILIES:
        if type(dm).__name__ not in family.classes:
            continue
        try:
            module = importlib.import_module(family.module)
        except ImportError:
            continue
        if type(dm) is getattr(module, type(dm).__name__, None):
            return family
    return None


def _dit_layout(dm):
    """[(patch name, index, segment)] in execution order for a supported DiT, or None."""
    family = dit_family(dm)
    if family is None:
        return None
    return [(patch, i, seg) for seg, (patch, attr, _) in enumerate(family.blocks)
            for i in range(len(getattr(dm, attr)))]


def _unsupported_block_family(node, dm):
    why = NO_BLOCK_PATCH.get(type(dm).__name__, "it is not a host DiT with block patches")
    return QuickstepInputError(node, f"model family {type(dm).__name__} is not supported ({why}); supported: "
                                     f"{SUPPORTED_DITS}. Use Model Cache (any model) for it, or DeepCache (UNet) "
                                     "for SD1.x/SDXL UNets.")


def _make_block_patch(pos, patch_name):
    """The patch of block `pos`. Dynamo skips this frame (not what it calls): the cache's bookkeeping is excluded
    from tracing in samplers.cache_runs and the host block compiles on its own, once per block signature rather
    than once per position."""
    def patch(args, extra):
        to = args.get("transformer_options") or {}
        run = to.get(KEY)
        if not isinstance(run, runs.BlockCacheRun):
            return extra["original_block"](args)
        if not run.enter(pos, args, lambda: _sigma_of(to, "Block Cache"), to.get("uuids", [])):
            return run.skipped(pos, args)
        return run.leave(pos, extra["original_block"](args))
    patch.__qualname__ = f"block_cache_patch_{patch_name}"
    return torch._dynamo.disable(patch, recursive=False)


# Realistic sizes for the memory estimate: an image model at 1024x1024, a video model at 81 frames of 832x480.
REALISTIC_IMAGE = (1024, 1024, 1)
REALISTIC_VIDEO = (832, 480, 81)
# (spatial, temporal) downscale of the VAE by latent format (0.33 carries it on the format; 0.3.75 does not)
VAE_SCALE = {"Wan22": (16, 4), "Wan21": (8, 4), "HunyuanVideo": (8, 4), "HunyuanVideo15": (16, 4), "LTXV": (32, 8)}


def realistic_latent(latent_format, video):
    """(label, latent frames, latent height, latent width, channels) of the realistic size for a model."""
    spatial, temporal = VAE_SCALE.get(type(latent_format).__name__, (8, 1))
    spatial = getattr(latent_format, "spacial_downscale_ratio", spatial)
    width, height, frames = REALISTIC_VIDEO if video else REALISTIC_IMAGE
    label = f"{frames} frames {width}x{height}" if video else f"{width}x{height}"
    return label, (frames - 1) // temporal + 1, height // spatial, width // spatial, latent_format.latent_channels


def _width(unet_config):
    """The hidden width of a DiT from its host config (the keys the host's detection and our tiny configs use)."""
    for key in ("hidden_size", "dim"):
        if key in unet_config:
            return int(unet_config[key])
    if "num_attention_heads" in unet_config:
        return int(unet_config["num_attention_heads"]) * int(unet_config.get("attention_head_dim", 64))
    return 64 * int(unet_config["depth"])               # MMDiT: 64 x depth


def _patch(unet_config):
    p = unet_config.get("patch_size", 1)
    p = tuple(p) if isinstance(p, (list, tuple)) else (1, p, p)
    return (1,) * (3 - len(p)) + p


def extra_bytes_from_config(class_name, unet_config, latent_format, layout, config, element_size, batch=2):
    """(bytes, size label): what a cache holds at its peak for one run of a model of host class `class_name` with
    host config `unet_config` at the realistic size of its family (REALISTIC_IMAGE / REALISTIC_VIDEO), CFG batch
    `batch`: the forecaster's stored steps plus the copies a call keeps while it runs."""
    family = next((f for f in DIT_FAMILIES if class_name in f.classes), None)
    video = family.video if family is not None else getattr(latent_format, "latent_dimensions", 2) == 3
    label, frames, h, w, channels = realistic_latent(latent_format, video)
    points = max(config.history, qc.FORECASTER_POINTS[config.forecaster])
    if layout["cached"] == "denoised prediction":      # the sampler's float32 x and x0, whatever the model's dtype
        return qc.model_cache_bytes(channels * frames * h * w, points, batch, 4), label
    pt, ph, pw = _patch(unet_config)
    img, txt = -(-frames // pt) * (h // ph) * (w // pw), family.text_tokens
    tokens = {"img+txt": (img, txt), "img": (img,), "joined": (img + txt,)}
    segments = layout["segments"]
    front = segments[layout["front"] - 1]
    middle = sorted(set(segments[layout["front"]:len(segments) - layout["back"]]))
    return qc.block_cache_bytes(tokens[family.blocks[front][2]][0], [tokens[family.blocks[m][2]] for m in middle],
                                _width(unet_config), points, batch, element_size), label


def estimate_extra_bytes(model, layout, config, batch=2):
    """extra_bytes_from_config for a loaded model: its class, host config, latent format and activation dtype
    (at least 2 bytes: fp8 weights compute in bf16)."""
    dtype = getattr(model.model, "manual_cast_dtype", None) or next(model.model.diffusion_model.parameters()).dtype
    size = max(torch.finfo(dtype).bits // 8, 2) if dtype.is_floating_point else 2
    return extra_bytes_from_config(type(model.model.diffusion_model).__name__, model.model.model_config.unet_config,
                                   model.model.latent_format, layout, config, size, batch)


def _memory_text(model, layout, config):
    total, label = estimate_extra_bytes(model, layout, config)
    where = "system RAM (offload)" if config.offload else "the model's device"
    return f"extra memory about {total / 2 ** 20:.0f} MiB on {where} at {label}, CFG batch 2"


def _forecast_inputs(residual, warmup, max_consecutive, warmup_note="", consecutive_note="", end_percent=0.95,
                     end_note=" (the last steps compute)"):
    """The forecaster, warm-up, window and history inputs the DiT caches share (Block Cache, Model Cache), with
    each node's own warm-up, run-length and window-end defaults; `residual` names what the cache stores."""
    return [
        io.Combo.Input("forecaster", options=list(qc.FORECASTERS), default="taylor1",
                       tooltip=f"How the {residual} is carried to a skipped step: reuse, Taylor order 1/2 in sigma, "
                               "or Chebyshev least squares over the last computed steps. On the trained digit DiTs "
                               "taylor1 and reuse were within 1 dB of each other; taylor2 and Chebyshev lost 8-12 "
                               "dB there."),
        io.Int.Input("warmup_steps", default=warmup, min=0, max=100,
                     tooltip=f"The first steps that always compute{warmup_note}."),
        io.Int.Input("max_consecutive", default=max_consecutive, min=1, max=100,
                     tooltip=f"At most this many skipped steps in a row{consecutive_note}."),
        io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.01,
                       tooltip="Caching is allowed from this fraction of the denoising on."),
        io.Float.Input("end_percent", default=end_percent, min=0.0, max=1.0, step=0.01,
                       tooltip=f"Caching stops at this fraction of the denoising{end_note}."),
        io.Int.Input("history", default=3, min=1, max=8,
                     tooltip=f"Computed steps the forecaster keeps (memory: this many {residual}s)."),
    ]


def _policy_node_inputs(threshold_tooltip, calibration_tooltip):
    """The policy / calibration / few-step / offload inputs every DiT cache node shares."""
    return [
        io.Combo.Input("policy", options=list(POLICIES), default="residual-probe", optional=True,
                       tooltip=threshold_tooltip),
        io.String.Input("calibration", default="", optional=True, tooltip=calibration_tooltip),
        few_step_input(),
        offload_input(),
    ]


CALIBRATION_TOOLTIP = ("Name of a stored calibration (Calibrate Cache node); needed by, and only used with, the "
                       "calibrated policy. A Wan 2.2 high-noise and low-noise expert each need their own.")


class QuickstepBlockCache(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="QuickstepBlockCache",
            display_name="Block Cache (DiT)",
            category=SUBCATEGORY,
            description="Dual-block cache for DiT models with block patches (Flux, Chroma, SD3, Wan 2.1/2.2, "
                        "Qwen-Image, HunyuanVideo, LTXV): the first and last blocks always run; when the first "
                        "blocks' residual barely changes, the middle blocks are skipped and their residual is reused "
                        "or forecast in sigma from the last computed steps. front 1 / back 0 is First-Block Cache. "
                        "For a Wan 2.2 pair put one on each expert. Returns a patched copy of the model.",
            inputs=[
                io.Model.Input("model", tooltip=f"A DiT model: {SUPPORTED_DITS}."),
                io.Float.Input("threshold", default=0.3, min=0.0, max=2.0, step=0.01,
                               tooltip="Skip the middle while the first blocks' residual differs from its forecast "
                                       "by less than this (relative L1). 0 never skips; larger skips more. At the "
                                       "defaults (24 euler steps) measured 1.32-1.53x less compute at 25-41 dB on "
                                       "the trained 2-4-block digit DiTs, where the first and last blocks leave "
                                       "little to skip; the Model Cache skipped more there."),
                io.Int.Input("front_blocks", default=1, min=1, max=64,
                             tooltip="Fn: blocks always computed at the start; their residual decides."),
                io.Int.Input("back_blocks", default=1, min=0, max=64,
                             tooltip="Bn: blocks always computed at the end, on top of the cached middle."),
                *_forecast_inputs("middle residual", warmup=1, max_consecutive=6,
                                  warmup_note=" (the probe still guards the next ones)",
                                  consecutive_note=": a cap on how far the forecast extrapolates, whatever the "
                                                   "probe says"),
                io.String.Input("compute_steps", default="", optional=True,
                                tooltip="Optional static mask: comma-separated step indices that always compute "
                                        "(negative counts from the end, e.g. 0,1,-1)."),
                *_policy_node_inputs("residual-probe: skip while the front blocks' residual matches its forecast "
                                     "(threshold = relative L1). calibrated: MagCache's rule on a stored "
                                     "calibration (threshold = error budget, sum of |1 - magnitude ratio|).",
                                     CALIBRATION_TOOLTIP),
            ],
            outputs=[io.Model.Output(tooltip="The model with the block cache.")])

    @classmethod
    def execute(cls, model, threshold, front_blocks, back_blocks, forecaster, warmup_steps, max_consecutive,
                start_percent, end_percent, history, compute_steps="", policy="residual-probe", calibration="",
                few_step_limit=qc.FEW_STEP_LIMIT, offload=False):
        node = "Block Cache"
        require_choice(node, "policy", policy, POLICIES)
        calibration = _policy_inputs(node, policy, calibration)
        require_finite(node, "front_blocks", front_blocks, 1, 64)
        require_finite(node, "back_blocks", back_blocks, 0, 64)
        config = _config(node, threshold=threshold, warmup=warmup_steps, max_consecutive=max_consecutive,
                         forecaster=forecaster, history=history, start_percent=start_percent,
                         end_percent=end_percent, always=_parse_mask(node, compute_steps),
                         few_step_limit=few_step_limit, offload=bool(offload))
        dm = model.model.diffusion_model
        blocks = _dit_layout(dm)
        if blocks is None:
            raise _unsupported_block_family(node, dm)
        if front_blocks + back_blocks >= len(blocks):
            raise QuickstepInputError(node, f"front_blocks + back_blocks = {front_blocks + back_blocks} leaves no middle "
                                            f"block to cache: this model has {len(blocks)} blocks")
        layout = {"front_blocks": front_blocks, "back_blocks": back_blocks, "blocks": len(blocks),
                  "front": front_blocks, "back": back_blocks, "segments": [seg for _, _, seg in blocks],
                  "cached": "middle residual"}
        if calibration:
            config = replace(config, calibration=load_calibration(node, calibration, "BlockCache",
                                                                  structure_of(layout), model))
        out = _attach(node, model, "BlockCache", layout, config, runs.BlockCacheRun)
        for pos, (name, index, _) in enumerate(blocks):
            out.set_model_patch_replace(_make_block_patch(pos, name), "dit", name, index)
        text = (f"Block Cache F{front_blocks}B{back_blocks} of {len(blocks)} blocks "
                f"({dit_family(dm).name}): {config.describe()}; {_memory_text(model, layout, config)}; "
                "each run logs what it skipped")
        return io.NodeOutput(out, ui=ui.PreviewText(text))


# -------------------------------------------------------------------------------------------------------- Model cache

def _model_cache_wrapper(executor, *args, **kwargs):
    """APPLY_MODEL wrapper: a forecast denoised prediction instead of the model when the run's policy says so. Every
    host model goes through apply_model (SD3's MMDiT, for one, never calls the DIFFUSION_MODEL wrappers where the
    host's EasyCache hooks in). Dynamo skips this frame only; the diffusion model it calls compiles as usual."""
    to = wrapper_argument(executor, args, kwargs, "transformer_options") or {}
    run = to.get(KEY)
    if not isinstance(run, runs.ModelCacheRun):
        return executor(*args, **kwargs)
    x = wrapper_argument(executor, args, kwargs, "x")
    model_input = executor.class_obj.model_sampling.calculate_input(wrapper_argument(executor, args, kwargs, "t"), x)
    denoised = run.lookup(model_input, _sigma_of(to, "Model Cache"), to.get("uuids", []))
    if denoised is not None:
        return denoised
    return run.store(model_input, executor(*args, **kwargs))


_model_cache_wrapper = torch._dynamo.disable(_model_cache_wrapper, recursive=False)


class QuickstepModelCache(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="QuickstepModelCache",
            display_name="Model Cache (any model)",
            category=SUBCATEGORY,
            description="Model-level forecasting cache for every model the host runs (HiDream, Lumina2 / Z-Image, "
                        "SD3, and all the other DiTs and UNets): the model's denoised prediction is stored at "
                        "computed steps; while the input has moved little (scaled by how much the prediction moved "
                        "per unit of input change between the last two computed steps), or where a calibration says "
                        "so, the model is skipped and the prediction is reused or forecast in sigma. Holds a few "
                        "latents: far less memory than a block cache. Returns a patched copy of the model.",
            inputs=[
                io.Model.Input("model", tooltip="Any diffusion model."),
                io.Float.Input("threshold", default=0.2, min=0.0, max=2.0, step=0.01,
                               tooltip="Skip the model while its predicted change of the denoised prediction since "
                                       "the last computed step (relative L1) stays below this; 0 never skips. With "
                                       "the calibrated policy: MagCache's error budget."),
                *_forecast_inputs("denoised prediction", warmup=2, max_consecutive=2, end_percent=1.0,
                                  consecutive_note=" (2, not more: on the tuning flow UNet 3 in a row left 5 of 9 noise "
                                                   "seeds under 30 dB at any threshold, 2 in a row 1 of 9)",
                                  end_note=" (1: the denoised prediction barely moves over the last steps, so they "
                                           "are skipped too; on the tuning eps UNet ending at 0.95 left the last 6 "
                                           "of 24 karras steps computed for no PSNR)"),
                *_policy_node_inputs("residual-probe: EasyCache-style input-change rule (threshold = predicted "
                                     "relative change of the denoised prediction). calibrated: MagCache's rule on a "
                                     "stored calibration of the denoised prediction (threshold = error budget).",
                                     CALIBRATION_TOOLTIP),
            ],
            outputs=[io.Model.Output(tooltip="The model with the model-level cache.")])

    @classmethod
    def execute(cls, model, threshold, forecaster, warmup_steps, max_consecutive, start_percent, end_percent,
                history, policy="residual-probe", calibration="", few_step_limit=qc.FEW_STEP_LIMIT, offload=False):
        node = "Model Cache"
        require_choice(node, "policy", policy, POLICIES)
        calibration = _policy_inputs(node, policy, calibration)
        config = _config(node, threshold=threshold, warmup=warmup_steps, max_consecutive=max_consecutive,
                         forecaster=forecaster, history=history, start_percent=start_percent,
                         end_percent=end_percent, few_step_limit=few_step_limit, offload=bool(offload))
        layout = {"cached": "denoised prediction"}
        if calibration:
            config = replace(config, calibration=load_calibration(node, calibration, "ModelCache",
                                                                  structure_of(layout), model))
        import comfy.patcher_extension as pe
        out = _attach(node, model, "ModelCache", layout, config, runs.ModelCacheRun)
        out.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL, KEY, _model_cache_wrapper)
        text = (f"Model Cache on {type(model.model.diffusion_model).__name__}: {config.describe()}; "
                f"{_memory_text(model, layout, config)}; each run logs what it skipped")
        return io.NodeOutput(out, ui=ui.PreviewText(text))


# -------------------------------------------------------------------------------------------- Calibrate Cache node

def calibrate(model, positive, negative, cfg, sampler, sigmas, latent, seed, name, node="Calibrate Cache"):
    """Sample once with the model's Quickstep cache computing every step, store the measured magnitude curve as
    calibration `name` and return the record."""
    import comfy.sample
    import comfy.utils
    setup = model.model_options.get("transformer_options", {}).get(KEY)
    if not isinstance(setup, CacheSetup):
        raise QuickstepInputError(node, "the model carries no Quickstep cache: connect the output of DeepCache (UNet), "
                                        "Block Cache (DiT) or Model Cache (any model) with the layout to calibrate")
    if sigmas.ndim != 1 or sigmas.shape[0] < 3:
        raise QuickstepInputError(node, f"sigmas has {max(int(sigmas.shape[0]) - 1, 0)} steps; calibration needs >= 2")
    path = calibration_path(node, name)
    measuring = setup.measuring()
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
        curve = qc.MagnitudeCurve.from_measurements(float(sigmas[0]), measuring.measured or [])
    except ValueError as e:
        raise QuickstepInputError(node, f"the run gave no usable magnitude curve ({e})")
    record = {"format": qc.CALIBRATION_FORMAT, "cache": setup.cache, "structure": setup.structure(),
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
                io.Model.Input("model", tooltip="The output of DeepCache (UNet), Block Cache (DiT) or Model Cache with "
                                                "the branch / front and back blocks you will use."),
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


NODES = [QuickstepDeepCache, QuickstepBlockCache, QuickstepModelCache, QuickstepCacheCalibration]
