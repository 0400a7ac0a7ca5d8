"""Feature caches (issue 11): the forecasters and schedules in plain torch, and the DeepCache / Block Cache nodes run
through the real host on its own UNet, MMDiT and Flux classes (tiny seeded models, 16x16 latents)."""
import functools
import gc
import math
import sys

import pytest
import torch

from graphs import sink
from samplers import caching as qc

# ------------------------------------------------------------------------------------------------ plain torch parts


def test_forecasters_are_exact_on_their_polynomial_order_with_uneven_sigmas():
    times = [14.6, 9.1, 4.3, 2.2]                       # uneven, decreasing like a sigma schedule
    base = torch.randn(3, 5, generator=torch.Generator().manual_seed(0))
    for name, degree in (("reuse", 0), ("taylor1", 1), ("taylor2", 2), ("chebyshev", 2)):
        f = qc.Forecaster(name, history=4)
        poly = lambda t: base * (1 + 0.3 * t + (0.05 * t * t if degree == 2 else 0)) if degree else base  # noqa: E731
        for t in times:
            f.push(t, poly(t))
        pred = f.predict(1.1)
        tol = 2e-3 if name == "chebyshev" else 1e-4      # the ridge term trades exactness for stability
        assert torch.allclose(pred, poly(1.1), rtol=tol, atol=tol), name
        assert len(f) <= max(4, 1)


def test_forecaster_history_is_bounded_and_weights_sum_to_one():
    f = qc.Forecaster("taylor2", history=3)
    for i in range(10):
        f.push(10.0 - i, torch.full((2,), float(i)))
    assert len(f) == 3 and f.nbytes() == 3 * 2 * 4
    for name in qc.FORECASTERS:
        w = qc.forecast_weights(name, [5.0, 3.0, 2.0, 1.5], 1.0)
        assert abs(sum(w) - 1.0) < 1e-9, name
    with pytest.raises(ValueError):
        qc.Forecaster("spline")


def test_schedules_and_step_index():
    assert qc.full_steps(10, 3) == [0, 3, 6, 9]
    assert qc.full_steps(10, 1) == list(range(10))
    nu = qc.full_steps(20, 4, "non-uniform", start=2, end=18)
    assert {0, 1, 18, 19} <= set(nu) and len([i for i in nu if 2 <= i < 18]) == 4
    inner = [i for i in nu if 2 <= i < 18]
    assert inner[1] - inner[0] < inner[2] - inner[1] or inner[-1] - inner[-2] < inner[2] - inner[1]
    sig = [14.6, 7.0, 3.0, 1.0, 0.0]
    assert [qc.step_index(sig, s) for s in (14.6, 7.0, 5.0, 1.0)] == [0, 1, 1, 3]
    with pytest.raises(ValueError):
        qc.full_steps(10, 0)


def test_skip_policy_limits():
    p = qc.SkipPolicy(threshold=0.1, warmup=2, max_consecutive=2, start_sigma=10.0, end_sigma=1.0,
                      always=frozenset({5}))
    assert not p.may_cache(1, 5.0, 0)          # warm-up
    assert p.may_cache(2, 5.0, 1)
    assert not p.may_cache(3, 5.0, 2)          # consecutive cap
    assert not p.may_cache(5, 5.0, 0)          # static compute mask
    assert not p.may_cache(3, 11.0, 0) and not p.may_cache(3, 1.0, 0)   # window
    assert not qc.SkipPolicy(threshold=0.0, warmup=2, max_consecutive=3).may_cache(10, 1.0, 0)   # 0 never skips


# --------------------------------------------------------------------------------------------------- host graphs

SCHEDULER = {"sd15": "normal", "mmdit": "simple", "flux": "simple"}


def cache_graph(arch, cache=None, steps=12, size=128, batch=1, cfg=3.0, seed=0, negative_seed=1):
    """Tiny host model (optionally through a cache node) -> CFGGuider -> SamplerCustomAdvanced; "out" is the latent."""
    latent = ({"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": batch}}
              if arch == "sd15" else
              {"class_type": "EmptySD3LatentImage", "inputs": {"width": size, "height": size, "batch_size": batch}})
    model = ["model", 0]
    graph = {
        "model": {"class_type": "QuickstepTestTinyModel", "inputs": {"arch": arch, "seed": 0}},
        "pos": {"class_type": "QuickstepTestConditioning", "inputs": {"arch": arch, "seed": 0, "context_dim": 0}},
        "neg": {"class_type": "QuickstepTestConditioning", "inputs": {"arch": arch, "seed": negative_seed,
                                                                         "context_dim": 0}},
        "latent": latent,
        "noise": {"class_type": "RandomNoise", "inputs": {"noise_seed": seed}},
        "sampler": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
        "sigmas": {"class_type": "BasicScheduler", "inputs": {"model": ["model", 0], "scheduler": SCHEDULER[arch],
                                                              "steps": steps, "denoise": 1.0}},
    }
    if cache is not None:
        class_type, inputs = cache
        graph["cache"] = {"class_type": class_type, "inputs": {"model": ["model", 0], **inputs}}
        model = ["cache", 0]
    graph["guider"] = {"class_type": "CFGGuider", "inputs": {"model": model, "positive": ["pos", 0],
                                                             "negative": ["neg", 0], "cfg": cfg}}
    graph["out"] = {"class_type": "SamplerCustomAdvanced",
                    "inputs": {"noise": ["noise", 0], "guider": ["guider", 0], "sampler": ["sampler", 0],
                               "sigmas": ["sigmas", 0], "latent_image": ["latent", 0]}}
    graph["keep"] = sink("out")
    return graph


COUNTED = {"ResBlock", "SpatialTransformer", "Downsample", "Upsample",          # UNet layers
           "JointBlock", "DoubleStreamBlock", "SingleStreamBlock"}                 # DiT blocks


class BlockCounter:
    """Counts forward calls of the diffusion model's blocks and layers (a global module forward hook filtered by the
    host's own block classes; the UNet calls its layers directly, not its block containers)."""

    def __init__(self):
        self.count = 0
        self.handle = torch.nn.modules.module.register_module_forward_hook(self._hook)

    def _hook(self, module, *a):
        if type(module).__name__ in COUNTED:
            self.count += 1

    def close(self):
        self.handle.remove()


def run_latent(inproc, graph):
    return inproc.output(inproc.run(graph), "out")["samples"].clone()


def run_counted(inproc, graph):
    counter = BlockCounter()
    try:
        latent = run_latent(inproc, graph)
    finally:
        counter.close()
    return latent, counter.count


def psnr(a, b):
    peak = b.abs().max().item()
    mse = (a.double() - b.double()).pow(2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10(peak * peak / mse)


NEVER = {
    "sd15": ("QuickstepDeepCache", {"interval": 1, "schedule": "uniform", "branch": 0, "start_percent": 0.0,
                                    "end_percent": 1.0, "forecaster": "reuse", "history": 3, "few_step_limit": 0}),
    "flux": ("QuickstepBlockCache", {"threshold": 0.0, "front_blocks": 1, "back_blocks": 1, "forecaster": "taylor1",
                                     "warmup_steps": 0, "max_consecutive": 3, "start_percent": 0.0,
                                     "end_percent": 1.0, "history": 3, "few_step_limit": 0}),
}
NEVER["mmdit"] = ("QuickstepBlockCache", {**NEVER["flux"][1], "back_blocks": 0})     # the tiny MMDiT has 2 blocks

SKIPPING = {
    "sd15": ("QuickstepDeepCache", {**NEVER["sd15"][1], "interval": 3, "start_percent": 0.1, "end_percent": 0.95}),
    "flux": ("QuickstepBlockCache", {**NEVER["flux"][1], "threshold": 1.0, "warmup_steps": 2, "end_percent": 0.95}),
}
SKIPPING["mmdit"] = ("QuickstepBlockCache", {**SKIPPING["flux"][1], "back_blocks": 0})


@pytest.mark.parametrize("arch", ["sd15", "mmdit", "flux"])
def test_never_skipping_cache_is_identical_to_uncached(inproc, arch):
    plain = run_latent(inproc, cache_graph(arch))
    cached = run_latent(inproc, cache_graph(arch, NEVER[arch]))
    assert (plain - cached).abs().max().item() <= 1e-6


@pytest.mark.parametrize("arch", ["sd15", "mmdit", "flux"])
def test_skipping_cache_runs_fewer_blocks_and_stays_close(inproc, arch):
    plain, n_plain = run_counted(inproc, cache_graph(arch, steps=16))
    cached, n_cached = run_counted(inproc, cache_graph(arch, SKIPPING[arch], steps=16))
    assert n_cached < 0.75 * n_plain, (n_cached, n_plain)
    assert psnr(cached, plain) > 20.0, psnr(cached, plain)


def test_back_to_back_batch_and_resolution_changes_leave_nothing_stale(inproc):
    """A cached run gives the same result whatever ran before it (batch 2 then 1, two resolutions)."""
    for arch in ("sd15", "flux"):
        first = run_latent(inproc, cache_graph(arch, SKIPPING[arch], steps=7, batch=1))
        run_latent(inproc, cache_graph(arch, SKIPPING[arch], steps=7, batch=2, seed=3))
        run_latent(inproc, cache_graph(arch, SKIPPING[arch], steps=7, batch=1, size=192, seed=4))
        again = run_latent(inproc, cache_graph(arch, SKIPPING[arch], steps=7, batch=1))
        assert torch.equal(first, again), arch


class InterruptAfterBlocks:
    """Asks the host to interrupt (what POST /interrupt does) once the diffusion model has run `blocks` blocks; the
    host raises at its next progress update, between sampling steps."""

    def __init__(self, blocks):
        import comfy.model_management
        self.left, self.interrupt = blocks, comfy.model_management.interrupt_current_processing
        self.handle = torch.nn.modules.module.register_module_forward_hook(self._hook)

    def _hook(self, module, *a):
        if type(module).__name__ in COUNTED:
            self.left -= 1
            if self.left == 0:
                self.interrupt(True)

    def close(self):
        self.handle.remove()


@pytest.mark.parametrize("arch", ["mmdit", "flux"])
def test_block_cache_interrupted_run_then_a_clean_run_equals_a_fresh_one(inproc, arch):
    """The executor keeps the cache node's patched model between prompts: an interrupt in the middle of a cached
    run (after cached steps) frees the run's cached tensors and leaves nothing in the model, and the next run equals
    the first one. history 4 is used by no
    other test, so the first run starts from a freshly patched model. (DeepCache: tests/test_interrupts.py.)"""
    cache = (SKIPPING[arch][0], {**SKIPPING[arch][1], "history": 4})
    first = inproc.run(cache_graph(arch, cache, steps=8))
    fresh = inproc.output(first, "out")["samples"].clone()
    calls, skipped = last_run(arch)
    assert calls == 8 and skipped > 0, (calls, skipped)
    patched = inproc.output(first, "cache")
    blocks = len(cache_module()._dit_layout(patched.model.diffusion_model))
    stop = InterruptAfterBlocks(5 * blocks)            # well inside step 5 of 8, whatever step 5 skipped
    try:
        result = inproc.run(cache_graph(arch, cache, steps=8, seed=9), check=False)
    finally:
        stop.close()
    assert result.status == "interrupted", result.status
    calls, skipped = last_run(arch)                    # the run's state was finished and freed on the interrupt
    assert 5 <= calls < 8 and skipped > 0, (calls, skipped)
    gc.collect()
    holding = [o for o in gc.get_objects() if issubclass(type(o), cache_module().qc.RunState) and o.groups]
    assert not holding, [o.name for o in holding]      # no run state still holds cached tensors
    assert isinstance(patched.model_options["transformer_options"][cache_module().KEY], cache_module().CacheSetup)
    again = run_latent(inproc, cache_graph(arch, cache, steps=8))
    assert torch.equal(fresh, again)


def test_cfg_batch_of_two_never_skipping_is_exact_and_skipping_keeps_samples_apart(inproc):
    plain = run_latent(inproc, cache_graph("flux", steps=10, batch=2))
    never = run_latent(inproc, cache_graph("flux", NEVER["flux"], steps=10, batch=2))
    assert (plain - never).abs().max().item() <= 1e-6
    cached = run_latent(inproc, cache_graph("flux", SKIPPING["flux"], steps=10, batch=2))
    for i in range(2):
        assert psnr(cached[i], plain[i]) > 10.0


def _error(inproc, graph):
    result = inproc.run(graph, check=False)
    assert result.status == "error", result.status
    return result.error()["exception_message"]


def test_bad_inputs_give_clear_errors(inproc):
    msg = _error(inproc, cache_graph("flux", NEVER["sd15"], steps=4))
    assert "DeepCache" in msg and "not supported" in msg and "UNetModel" in msg
    msg = _error(inproc, cache_graph("sd15", NEVER["flux"], steps=4))
    assert "not supported" in msg and "Flux" in msg and "MMDiT" in msg and "Model Cache" in msg
    msg = _error(inproc, cache_graph("flux", ("QuickstepBlockCache", {**NEVER["flux"][1], "front_blocks": 2,
                                                                        "back_blocks": 2}), steps=4))
    assert "front_blocks + back_blocks = 4" in msg and "4 blocks" in msg
    msg = _error(inproc, cache_graph("sd15", ("QuickstepDeepCache", {**NEVER["sd15"][1], "branch": 9}), steps=4))
    assert "branch = 9" in msg
    msg = _error(inproc, cache_graph("flux", ("QuickstepBlockCache", {**NEVER["flux"][1],
                                                                        "threshold": float("nan")}), steps=4))
    assert "threshold" in msg and "finite" in msg
    msg = _error(inproc, cache_graph("sd15", ("QuickstepDeepCache", {**NEVER["sd15"][1], "start_percent": 0.9,
                                                                       "end_percent": 0.2}), steps=4))
    assert "start_percent" in msg
    msg = inproc.refusal_message(cache_graph("sd15", ("QuickstepDeepCache", {**NEVER["sd15"][1],
                                                                             "forecaster": "taylor3"}), steps=4),
                                 "cache", "forecaster")
    assert "forecaster" in msg and "'taylor3'" in msg and "chebyshev" in msg


# ------------------------------------------------------------------------------------- calibrated (MagCache) policy

def test_magnitude_curve_interpolates_in_sigma_and_the_rule_follows_magcache():
    sig = [10.0, 5.0, 2.0, 1.0, 0.5]
    curve = qc.MagnitudeCurve(sig, [1.0, 1.1, 1.0, 0.9, 0.5])
    assert abs(curve.ratio(10.0, 2.0) - 1.1) < 1e-12 and abs(curve.ratio(5.0, 1.0) - 0.9) < 1e-12
    between = curve.ratio(5.0, math.sqrt(2.0 * 1.0))              # halfway in log sigma between 2 and 1
    assert abs(between - math.sqrt(0.9)) < 1e-12
    assert curve.ratio(20.0, 10.0) == 1.0 and abs(curve.ratio(0.5, 0.1) - 1.0) < 1e-12   # held outside the range
    run = sig + [0.0]
    # err after step 1: |1-1.1| = 0.1 <= 0.15 cached; step 2: 0.1 + |1-1.1| = 0.2 > 0.15 computes; step 3:
    # |1-0.9| = 0.1 cached; step 4: 0.1 + |1-0.45| computes.
    assert qc.calibrated_full_steps(curve, run, 0.15, max_consecutive=5) == [0, 2, 4]
    assert qc.calibrated_full_steps(curve, run, 0.15, max_consecutive=0) == [0, 1, 2, 3, 4]
    assert qc.calibrated_full_steps(curve, run, 0.0, max_consecutive=5) == [0, 1, 2, 3, 4]
    assert qc.calibrated_full_steps(curve, run, 10.0, max_consecutive=5, warmup=2) == [0, 1]
    measured = qc.MagnitudeCurve.from_measurements(10.0, [(5.0, 1.2), (5.0, 1.0), (2.0, 0.8)])
    assert measured.sigmas == [10.0, 5.0, 2.0] and abs(measured.gammas[1] - 1.1) < 1e-12
    with pytest.raises(ValueError):
        qc.MagnitudeCurve([1.0, 2.0], [1.0, 1.0])


CALIBRATE_ONLY = {"sd15": NEVER["sd15"], "flux": NEVER["flux"]}
CALIBRATED = {
    "sd15": ("QuickstepDeepCache", {**NEVER["sd15"][1], "interval": 4, "schedule": "calibrated", "threshold": 0.5,
                                    "start_percent": 0.0, "end_percent": 0.95}),
    "flux": ("QuickstepBlockCache", {**NEVER["flux"][1], "policy": "calibrated", "threshold": 0.5,
                                     "warmup_steps": 1, "end_percent": 0.95}),
}


def calibrated_graph(arch, name, steps=12, calibration_steps=12, sampler="euler", cache=None):
    """cache_graph with a calibrated cache; with calibration_steps, a Calibrate Cache node (its own schedule) makes
    the calibration `name` in the same graph, else the stored one is loaded by name."""
    class_type, inputs = cache or CALIBRATED[arch]
    graph = cache_graph(arch, (class_type, {**inputs, "calibration": name}), steps=steps)
    graph["sampler"]["inputs"]["sampler_name"] = sampler
    if calibration_steps:
        graph["calib_cache"] = {"class_type": CALIBRATE_ONLY[arch][0],
                                "inputs": {"model": ["model", 0], **CALIBRATE_ONLY[arch][1]}}
        graph["calib_sigmas"] = {"class_type": "BasicScheduler",
                                 "inputs": {"model": ["model", 0], "scheduler": SCHEDULER[arch],
                                            "steps": calibration_steps, "denoise": 1.0}}
        graph["calib_sampler"] = {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}}
        graph["calib"] = {"class_type": "QuickstepCacheCalibration",
                          "inputs": {"model": ["calib_cache", 0], "positive": ["pos", 0], "negative": ["neg", 0],
                                     "cfg": 3.0, "sampler": ["calib_sampler", 0], "sigmas": ["calib_sigmas", 0],
                                     "latent_image": ["latent", 0], "noise_seed": 7, "name": name}}
        graph["cache"]["inputs"]["calibration"] = ["calib", 0]
    return graph


def test_calibration_is_stored_and_drives_the_calibrated_policy(inproc):
    """Through the executor: Calibrate Cache's STRING output feeds the Block Cache in the same graph."""
    import json
    import os

    arch = "flux"
    name = f"qs_test_{arch}"
    plain, n_plain = run_counted(inproc, cache_graph(arch, steps=10))
    result = inproc.run(calibrated_graph(arch, name, steps=10))
    path = inproc.base / "models" / "quickstep_cache_calibrations" / f"{name}.json"
    record = json.loads(path.read_text())
    assert record["format"] == qc.CALIBRATION_FORMAT and record["sampler"] == "sample_euler"
    assert len(record["gammas"]) == 12 and record["gammas"][0] == 1.0 and record["steps"] == 12
    assert record["cache"] == "BlockCache" and record["structure"]["front_blocks"] == 1
    assert not [f for f in os.listdir(path.parent) if f.startswith(".tmp")]       # written then renamed
    counter = BlockCounter()
    try:
        cached = run_latent(inproc, calibrated_graph(arch, name, steps=10, calibration_steps=0))
    finally:
        counter.close()
    assert torch.equal(cached, inproc.output(result, "out")["samples"])      # the stored file gives the same run
    assert counter.count < 0.8 * n_plain, (counter.count, n_plain)
    assert psnr(cached, plain) > 20.0, psnr(cached, plain)
    # another step count: the curve is interpolated in sigma
    other = run_latent(inproc, calibrated_graph(arch, name, steps=7, calibration_steps=0))
    assert torch.isfinite(other).all()


def test_calibration_mismatches_and_incompatible_settings_are_errors(inproc):
    import json

    folder = inproc.base / "models" / "quickstep_cache_calibrations"
    if not (folder / "qs_test_flux.json").exists():
        inproc.run(calibrated_graph("flux", "qs_test_flux"))
    msg = _error(inproc, calibrated_graph("flux", "qs_test_flux", sampler="dpmpp_2m", calibration_steps=0))
    assert "sample_euler" in msg and "sample_dpmpp_2m" in msg and "calibrate again" in msg
    record = json.loads((folder / "qs_test_flux.json").read_text())
    record["model"]["parameters"] += 1
    (folder / "qs_test_other_model.json").write_text(json.dumps(record))
    msg = _error(inproc, calibrated_graph("flux", "qs_test_other_model", calibration_steps=0))
    assert "another model" in msg and "parameters" in msg
    deep = ("QuickstepDeepCache", CALIBRATED["sd15"][1])
    msg = _error(inproc, calibrated_graph("sd15", "qs_test_flux", calibration_steps=0, cache=deep))
    assert "made for BlockCache, not DeepCache" in msg
    front2 = ("QuickstepBlockCache", {**CALIBRATED["flux"][1], "front_blocks": 2})
    msg = _error(inproc, calibrated_graph("flux", "qs_test_flux", calibration_steps=0, cache=front2))
    assert "front_blocks" in msg and "calibrate again" in msg
    msg = _error(inproc, calibrated_graph("flux", "qs_test_missing", calibration_steps=0))
    assert "no file" in msg and "Calibrate Cache" in msg
    msg = _error(inproc, cache_graph("flux", ("QuickstepBlockCache", {**NEVER["flux"][1], "policy": "calibrated"}),
                                     steps=4))
    assert "needs a calibration name" in msg
    msg = _error(inproc, cache_graph("sd15", ("QuickstepDeepCache", {**NEVER["sd15"][1], "calibration": "x"}),
                                     steps=4))
    assert "calibration is used only by the calibrated schedule" in msg
    msg = _error(inproc, calibrated_graph("flux", "../etc", calibration_steps=0))
    assert "may hold only letters" in msg
    graph = cache_graph("flux", steps=4)
    graph["calib"] = {"class_type": "QuickstepCacheCalibration",
                      "inputs": {"model": ["model", 0], "positive": ["pos", 0], "negative": ["neg", 0], "cfg": 3.0,
                                 "sampler": ["sampler", 0], "sigmas": ["sigmas", 0], "latent_image": ["latent", 0],
                                 "noise_seed": 0, "name": "qs_test_uncached"}}
    graph["keep_calib"] = sink("calib")
    msg = _error(inproc, graph)
    assert "carries no Quickstep cache" in msg


# ------------------------------- host patch mechanisms: LoRA, ControlNet, torch.compile (tiny SD1.5 UNet and Flux)

DEEPCACHE_SKIPPING = {**SKIPPING["sd15"][1], "interval": 2, "start_percent": 0.0}
# Every other step after the first may be cached: on 6 direct steps both caches skip about half the calls.
PATCH_SKIPPING = {"sd15": ("QuickstepDeepCache", DEEPCACHE_SKIPPING),
                  "flux": ("QuickstepBlockCache", {**SKIPPING["flux"][1], "warmup_steps": 1, "max_consecutive": 1})}


def sample_host(arch, patcher, positive, negative, steps=6, callback=None):
    """The host's own sampling path (SamplerCustom's), batch 1, CFG 3, euler, seeded noise, 16x16 latent."""
    import comfy.sample
    import comfy.samplers
    channels = patcher.model.latent_format.latent_channels
    noise = torch.randn(1, channels, 16, 16, generator=torch.Generator().manual_seed(0))
    sigmas = comfy.samplers.calculate_sigmas(patcher.get_model_object("model_sampling"), SCHEDULER[arch], steps).cpu()
    return comfy.sample.sample_custom(patcher, noise, 3.0, comfy.samplers.sampler_object("euler"), sigmas, positive,
                                      negative, torch.zeros_like(noise), disable_pbar=True, seed=0,
                                      callback=callback)


def apply_cache(patcher, cache):
    import nodes
    class_type, inputs = cache
    return nodes.NODE_CLASS_MAPPINGS[class_type].execute(model=patcher, **inputs)[0]


def cache_module():
    import nodes
    return sys.modules[nodes.NODE_CLASS_MAPPINGS["QuickstepBlockCache"].__module__]


def last_run(arch):
    """(model calls, calls that skipped part of the network) of the cache's last finished run."""
    if arch == "sd15":
        s = cache_module().LAST_SUMMARY["DeepCache"]
        return s["calls"], s["partial"]
    s = cache_module().LAST_SUMMARY["BlockCache"]
    return s["calls"], s["calls"] - s["computed"]


def check_cache_keeps_patch(arch, base_plain, patched, positive, negative):
    """A patch the cache must honour (on the model or in the conditioning): never-skipping equals the patched model
    exactly, and the skipping cache, which did skip, stays nearer the patched model than the unpatched one (the
    patch is not bypassed on the skipped part)."""
    patched_plain = sample_host(arch, patched, positive, negative)
    assert psnr(patched_plain, base_plain) < 25.0                      # the patch changes the result
    never = sample_host(arch, apply_cache(patched, NEVER[arch]), positive, negative)
    assert (never - patched_plain).abs().max().item() <= 1e-6
    skipping = sample_host(arch, apply_cache(patched, PATCH_SKIPPING[arch]), positive, negative)
    assert last_run(arch)[1] > 0, last_run(arch)
    assert psnr(skipping, patched_plain) > max(20.0, psnr(skipping, base_plain) + 3.0), (
        psnr(skipping, patched_plain), psnr(skipping, base_plain))


@functools.cache
def tiny_setup(arch):
    """(arch, base model, positive, different negative, uncached output) for a tiny host model; the host must be
    running (the inproc fixture)."""
    from modelzoo import tiny_host
    base = tiny_host.build_tiny(arch, 0)
    pos, neg = tiny_host.tiny_conditioning(arch, 0), tiny_host.tiny_conditioning(arch, 1)
    return arch, base, pos, neg, sample_host(arch, base, pos, neg)


@pytest.fixture(params=["sd15", "flux"])
def host_setup(inproc, request):
    return tiny_setup(request.param)


def test_deepcache_calibrated_on_another_step_count(inproc):
    """Calibrated on 9 steps with other noise, used on 6: the curve is interpolated in sigma, partial steps happen
    and the result stays near the uncached one."""
    import comfy.samplers
    _, base, pos, neg, base_plain = tiny_setup("sd15")
    module = cache_module()
    sigmas = comfy.samplers.calculate_sigmas(base.get_model_object("model_sampling"), "normal", 9).cpu()
    record = module.calibrate(apply_cache(base, NEVER["sd15"]), pos, neg, 3.0, comfy.samplers.sampler_object("euler"),
                              sigmas, {"samples": torch.zeros(1, 4, 16, 16)}, 1, "qs_test_sd15")
    assert record["cache"] == "DeepCache" and record["structure"] == {"branch": 0} and len(record["gammas"]) == 9
    cached = sample_host("sd15", apply_cache(base, ("QuickstepDeepCache", CALIBRATED["sd15"][1]
                                                    | {"calibration": "qs_test_sd15"})), pos, neg)
    summary = module.LAST_SUMMARY["DeepCache"]
    assert summary["partial"] > 0 and "calibrated by 'qs_test_sd15'" in summary["line"]
    assert psnr(cached, base_plain) > 20.0


# Rank-1 LoRA pairs (key -> (out, in features)) on a layer the skipping cache always runs and one it skips: the
# UNet's last output block and middle block; the Flux's front (double 0), middle (double 1, single 0) and back
# (single 1) blocks.
LORA_LAYERS = {
    "sd15": {"output_blocks.3.1.proj_out": (32, 32), "middle_block.1.proj_out": (64, 64)},
    "flux": {"double_blocks.0.img_attn.proj": (64, 64), "double_blocks.1.img_attn.proj": (64, 64),
             "single_blocks.0.linear2": (64, 320), "single_blocks.1.linear2": (64, 320)},
}


def test_cache_on_a_lora_patched_model(host_setup):
    """LoRA through the host's loader path (comfy.sd.load_lora_for_models, what LoraLoader runs on a file: comfy.lora
    key mapping, then ModelPatcher.add_patches)."""
    import comfy.sd
    arch, base, pos, neg, base_plain = host_setup
    g = torch.Generator().manual_seed(5)
    lora = {}
    for key, (out_f, in_f) in LORA_LAYERS[arch].items():
        lora[f"diffusion_model.{key}.lora_up.weight"] = torch.randn(out_f, 1, generator=g)
        lora[f"diffusion_model.{key}.lora_down.weight"] = torch.randn(1, in_f, generator=g) / in_f ** 0.5
    patched, _ = comfy.sd.load_lora_for_models(base, None, lora, 1.0, 0.0)
    assert len(patched.patches) == len(LORA_LAYERS[arch])
    check_cache_keeps_patch(arch, base_plain, patched, pos, neg)


def tiny_controlnet(arch):
    """A ControlNet built from the host's classes in the shape of the tiny model, as the host's loaders wrap one:
    the UNet's comfy.cldm ControlNet, Flux's XLabs-style ControlNetFlux (load_controlnet_flux_xlabs_mistoline)."""
    import comfy.cldm.cldm
    import comfy.controlnet
    import comfy.ldm.flux.controlnet
    import comfy.model_management
    import comfy.ops
    from modelzoo import tiny_host
    common = {"operations": comfy.ops.disable_weight_init, "dtype": torch.float32, "device": "cpu"}
    if arch == "sd15":
        config = {k: v for k, v in tiny_host.unet_config("sd15").items() if k != "out_channels"}
        model, extra_conds = comfy.cldm.cldm.ControlNet(hint_channels=3, **common, **config), ["y"]
    else:
        config = {k: v for k, v in tiny_host.unet_config("flux").items() if k != "image_model"}
        model, extra_conds = comfy.ldm.flux.controlnet.ControlNetFlux(**common, **config), ["y", "guidance"]
    tiny_host.seeded_init_(model, 3)
    return comfy.controlnet.ControlNet(model, load_device=comfy.model_management.get_torch_device(),
                                       extra_conds=extra_conds)


def test_cache_with_a_controlnet(host_setup):
    """The ControlNet applied by the stock ControlNetApplyAdvanced node. On the Flux, its residuals are added after
    each block, skipped middle blocks included."""
    import nodes
    arch, base, pos, neg, base_plain = host_setup
    hint = torch.rand(1, 128, 128, 3, generator=torch.Generator().manual_seed(2))
    cpos, cneg = nodes.ControlNetApplyAdvanced().apply_controlnet(pos, neg, tiny_controlnet(arch), hint, 0.5, 0.0, 1.0)
    check_cache_keeps_patch(arch, base_plain, base, cpos, cneg)


def test_cfg_negative_in_its_own_model_call_keeps_its_own_cache(host_setup):
    """A negative of 48 tokens against an 8-token positive cannot be batched with it (the host concatenates
    context lengths up to 4x apart only): positive and negative run as separate model calls, each with its own
    history. Two histories of one step each, the skipping cache near the uncached CFG result."""
    from modelzoo import tiny_host
    arch, base, pos, _, _ = host_setup
    neg = tiny_host.tiny_conditioning(arch, 1, tokens=48)
    plain = sample_host(arch, base, pos, neg)
    cached = sample_host(arch, apply_cache(base, PATCH_SKIPPING[arch]), pos, neg)
    calls, skipped = last_run(arch)
    assert calls == 2 * 6 and skipped > 0, (calls, skipped)
    assert psnr(cached, plain) > 25.0, psnr(cached, plain)


def test_cache_under_torch_compile_of_the_diffusion_model(inproc):
    """The host's torch.compile wrapper (what TorchCompileModel sets, here with the CPU-cheap "eager" backend) over
    the cached model: the same numbers as the uncompiled cached model, and dynamo really traced graphs (the Block
    Cache's block patches run inside the compiled forward). Smaller host models cut the tracing time: the tiny UNet
    without attention layers, the tiny Flux with 1 double and 2 single blocks (F1B1 caches the first single one)."""
    import torch._dynamo
    from comfy_api.torch_helpers import set_torch_compile_wrapper
    from modelzoo import tiny_host
    from torch._dynamo.utils import counters
    for arch, overrides in (("sd15", {"transformer_depth": [0, 0], "transformer_depth_output": [0, 0, 0, 0],
                                      "transformer_depth_middle": 0}),
                            ("flux", {"depth": 1})):
        base = tiny_host.build_tiny(arch, 0, **overrides)
        pos, neg = tiny_host.tiny_conditioning(arch, 0), tiny_host.tiny_conditioning(arch, 1)
        cached = apply_cache(base, PATCH_SKIPPING[arch])
        reference = sample_host(arch, cached, pos, neg, steps=3)         # steps 0, 2 full, step 1 cached
        assert last_run(arch) == (3, 1), last_run(arch)
        assert not torch.equal(reference, sample_host(arch, base, pos, neg, steps=3))
        compiled = cached.clone()
        set_torch_compile_wrapper(compiled, backend="eager")
        torch._dynamo.reset()
        counters.clear()
        try:
            out = sample_host(arch, compiled, pos, neg, steps=3)
            graphs = counters["stats"]["unique_graphs"]
        finally:
            torch._dynamo.reset()
        assert graphs > 0, arch
        assert last_run(arch) == (3, 1), last_run(arch)
        assert (out - reference).abs().max().item() <= 1e-5, arch


def test_smooth_time_embedding_makes_flux_mmdit_and_unet_smooth_in_time(inproc):
    """The benchmark's smooth models: one helper restricts the Flux, the MMDiT and the SD1.5 UNet timestep embedder
    to slow sinusoids (all three embed a timestep spanning about 1000 the same way: the DiTs 1000 * sigma, the UNet
    its discrete timestep 999..0). Through the host's own embedders, on a 25-point grid over the timestep's range,
    the largest second difference drops from more than half the embedding's range to under 2% of it, and the
    embedding keeps its scale."""
    import comfy.ldm.flux.layers
    import comfy.ldm.flux.model
    import comfy.ldm.modules.diffusionmodules.openaimodel
    import comfy.ldm.modules.diffusionmodules.util
    from modelzoo import tiny_host
    sigmas = torch.linspace(1, 0, 25)

    def embedding(patcher):
        dm = patcher.model.diffusion_model
        with torch.no_grad():
            if isinstance(dm, comfy.ldm.modules.diffusionmodules.openaimodel.UNetModel):
                t = torch.linspace(999, 0, 25)
                return dm.time_embed(comfy.ldm.modules.diffusionmodules.util.timestep_embedding(t, dm.model_channels))
            t = patcher.get_model_object("model_sampling").timestep(sigmas)
            if isinstance(dm, comfy.ldm.flux.model.Flux):
                return dm.time_in(comfy.ldm.flux.layers.timestep_embedding(t, 256))
            return dm.t_embedder(t, dtype=torch.float32)

    def roughness(e):
        return float((e[2:] - 2 * e[1:-1] + e[:-2]).abs().amax() / (e.amax(0) - e.amin(0)).amax())

    for arch in ("flux", "mmdit", "sd15"):
        patcher = tiny_host.build_tiny(arch, 0)
        before = embedding(patcher)
        tiny_host.smooth_time_embedding_(patcher.model.diffusion_model)
        after = embedding(patcher)
        assert roughness(before) > 0.5 and roughness(after) < 0.02, (arch, roughness(before), roughness(after))
        assert 0.8 < float(after.std() / before.std()) < 1.25, (arch, float(after.std() / before.std()))


# ------------------------------------------------------------------ how the caches read the host (issue 17, items 3, 4, 6)

def test_cache_window_uses_the_shift_node_model_sampling_on_the_first_run(inproc):
    """A ModelSamplingSD3 shift node patches model_sampling as an object patch, applied only when sampling loads the
    model: the cache's percent -> sigma window must come from the patched object on the very first run."""
    window = {"start_percent": 0.3, "end_percent": 0.8}
    run_latent(inproc, cache_graph("mmdit", ("QuickstepBlockCache", {**NEVER["mmdit"][1], **window})))
    graph = cache_graph("mmdit", ("QuickstepBlockCache", {**NEVER["mmdit"][1], **window}))
    graph["shift"] = {"class_type": "ModelSamplingSD3", "inputs": {"model": ["model", 0], "shift": 8.0}}
    graph["cache"]["inputs"]["model"] = ["shift", 0]
    graph["sigmas"]["inputs"]["model"] = ["shift", 0]
    result = inproc.run(graph)
    shifted = inproc.output(result, "shift", 0).get_model_object("model_sampling")
    unshifted = inproc.output(result, "model", 0).get_model_object("model_sampling")
    expected = (shifted.percent_to_sigma(0.3), shifted.percent_to_sigma(0.8))
    assert abs(expected[0] - unshifted.percent_to_sigma(0.3)) > 0.05        # the shift moves the window
    assert cache_module().LAST_SUMMARY["BlockCache"]["window"] == pytest.approx(expected, abs=1e-6)


def test_cache_refuses_parallel_in_time_sampling(inproc):
    """Parallel-in-time sampling evaluates several steps in one model call (one sigma per batch element): the cache,
    which follows one step sequence, refuses it by name instead of using one step for all."""
    for arch in ("sd15", "flux"):
        graph = cache_graph(arch, SKIPPING[arch], steps=6)
        graph["sampler"] = {"class_type": "QuickstepParallelSampling", "inputs": {"window": 4, "tolerance": 0.1}}
        msg = _error(inproc, graph)
        node = "DeepCache" if arch == "sd15" else "Block Cache"
        assert node in msg and "several noise levels" in msg and "parallel-in-time" in msg, msg


def test_cache_wrappers_read_host_arguments_by_name(inproc):
    """Another pack's wrappers in front of the cache's pass the host's arguments by keyword (as a newer host may):
    DeepCache reads them by name and samples exactly as without them."""
    import inspect

    import comfy.patcher_extension as pe
    _, base, pos, neg, _ = tiny_setup("sd15")
    expected = sample_host("sd15", apply_cache(base, PATCH_SKIPPING["sd15"]), pos, neg)

    def by_keyword(executor, *args, **kwargs):
        arguments = dict(inspect.signature(executor.original).bind(*args, **kwargs).arguments)
        extra = arguments.pop("kwargs", {})
        return executor(**arguments, **extra)
    by_name = base.clone()
    by_name.add_wrapper_with_key(pe.WrappersMP.OUTER_SAMPLE, "another_pack", by_keyword)
    by_name.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, "another_pack", by_keyword)
    out = sample_host("sd15", apply_cache(by_name, PATCH_SKIPPING["sd15"]), pos, neg)
    assert last_run("sd15")[1] > 0
    assert torch.equal(out, expected)
