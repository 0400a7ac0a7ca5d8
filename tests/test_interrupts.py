"""Interrupts through the real HTTP server: POST /interrupt in the middle of sampling (a Quickstep sampler over a
DeepCache-patched model, parallel sampling), schedule optimization and guided restoration (DPS); the server stays up
and the next run equals a clean run."""
import io

import numpy
import pytest
from PIL import Image


def digits_graph(seed, sampler="qs_dpmpp_2m_unic", steps=12, cache=True):
    graph = {
        "model": {"class_type": "QuickstepDigitModel", "inputs": {"prediction": "eps"}},
        "pos": {"class_type": "QuickstepDigitConditioning", "inputs": {"digits": "3141"}},
        "neg": {"class_type": "QuickstepDigitConditioning", "inputs": {"digits": ""}},
        "latent": {"class_type": "QuickstepEmptyDigitLatent", "inputs": {"batch_size": 4}},
        "sample": {"class_type": "KSampler",
                   "inputs": {"model": ["cached" if cache else "model", 0], "seed": seed, "steps": steps, "cfg": 2.5,
                              "sampler_name": sampler, "scheduler": "karras", "positive": ["pos", 0],
                              "negative": ["neg", 0], "latent_image": ["latent", 0], "denoise": 1.0}},
        "image": {"class_type": "QuickstepDigitToImage", "inputs": {"samples": ["sample", 0]}},
        "save": {"class_type": "SaveImage", "inputs": {"images": ["image", 0], "filename_prefix": "qs_interrupt"}},
    }
    if cache:
        graph["cached"] = {"class_type": "QuickstepDeepCache",
                           "inputs": {"model": ["model", 0], "interval": 2, "schedule": "uniform", "branch": 0,
                                      "start_percent": 0.1, "end_percent": 0.95, "forecaster": "reuse",
                                      "history": 3}}
    return graph


def interrupt_on_progress(node, at):
    """Interrupts once, at the node's first progress event at or past step `at` (newer hosts throttle progress
    events: a step may send none)."""
    sent = []

    def on_event(client, kind, data):
        if kind == "progress" and data.get("node") == node and data["value"] >= at and not sent:
            sent.append(at)
            client.interrupt()
    return on_event


def _pixels(client, result):
    images = [i for out in result.outputs.values() for i in out.get("images", [])]
    return numpy.stack([numpy.asarray(Image.open(io.BytesIO(client.view(i["filename"], i["subfolder"], i["type"]))))
                        for i in images])


def _inproc_pixels(inproc, graph):
    result = inproc.run(graph)
    image = inproc.output(result, "image")
    return numpy.clip(image.numpy() * 255.0, 0, 255).astype(numpy.uint8)


@pytest.mark.parametrize("sampler", ["qs_dpmpp_2m_unic", "qs_paradigms"])
def test_interrupted_sampling_leaves_the_next_run_clean(client, server, inproc, sampler):
    # the caches refuse parallel-in-time sampling (several noise levels in one call; tests/test_caching.py)
    cache = sampler != "qs_paradigms"
    interrupted = client.run(digits_graph(1001, sampler, cache=cache), on_event=interrupt_on_progress("sample", 3))
    assert interrupted.status == "interrupted", interrupted.events[-3:]
    assert server.alive()
    after = client.run(digits_graph(2002, sampler, cache=cache))
    assert after.status == "success", after.error()
    reference = _inproc_pixels(inproc, digits_graph(2002, sampler, cache=cache))
    diff = numpy.abs(_pixels(client, after).astype(int) - reference.astype(int))
    assert diff.max() <= 1 and diff.mean() < 0.01, (diff.max(), diff.mean())


def test_interrupted_schedule_optimization_leaves_the_server_usable(client, server):
    graph = {
        "model": {"class_type": "QuickstepDigitModel", "inputs": {"prediction": "eps"}},
        "pos": {"class_type": "QuickstepDigitConditioning", "inputs": {"digits": "7"}},
        "neg": {"class_type": "QuickstepDigitConditioning", "inputs": {"digits": ""}},
        "latent": {"class_type": "QuickstepEmptyDigitLatent", "inputs": {"batch_size": 1}},
        "opt": {"class_type": "QuickstepOptimizeSchedule",
                "inputs": {"model": ["model", 0], "positive": ["pos", 0], "negative": ["neg", 0],
                           "latent_image": ["latent", 0], "method": "oss", "solver": "euler", "steps": 4,
                           "cfg": 2.0, "trajectories": 4, "teacher_steps": 40, "training_seed": 5}},
        "keep": {"class_type": "PreviewAny", "inputs": {"source": ["opt", 1]}},
    }
    interrupted = client.run(graph, on_event=interrupt_on_progress("opt", 5))
    assert interrupted.status == "interrupted"
    assert server.alive()
    finished = client.run(digits_graph(3003, cache=False, steps=4))
    assert finished.status == "success", finished.error()


def test_interrupted_guided_restoration_leaves_the_next_run_clean(client, server, inproc, host_base):
    """DPS (a gradient through the model every step) stopped mid-run: no autograd graph or guidance state leaks into
    the next run, which equals the in-process run of the same graph."""
    import safetensors.torch
    import torch
    from modelzoo import mnist_unet
    _, _, pixels, _ = mnist_unet.mnist_split()
    name = "quickstep_interrupt_digits.latent"
    safetensors.torch.save_file({"latent_tensor": mnist_unet.mnist_to_latent(pixels[:2]).contiguous(),
                                 "latent_format_version_0": torch.tensor([])}, str(host_base / "input" / name))

    def graph(seed):
        operator = {"kind": "gaussian_blur", "factor": "4", "sigma_y": 0.05, "fraction": 0.5, "side": "bottom",
                    "width": 32, "height": 32, "mask_seed": 0, "kernel_size": 9, "blur_sigma": 2.0, "angle": 30.0,
                    "direction": 0.0, "jpeg_quality": 30, "channels": 1}
        return {
            "model": {"class_type": "QuickstepDigitModel", "inputs": {"prediction": "eps"}},
            "cond": {"class_type": "QuickstepDigitConditioning", "inputs": {"digits": ""}},
            "clean": {"class_type": "LoadLatent", "inputs": {"latent": name}},
            "op": {"class_type": "QuickstepDegradationOperator", "inputs": operator},
            "degrade": {"class_type": "QuickstepDegrade",
                        "inputs": {"operator": ["op", 0], "samples": ["clean", 0], "seed": 1}},
            "sampler": {"class_type": "QuickstepRestorationSampler",
                        "inputs": {"operator": ["op", 0], "measurement": ["degrade", 0], "method": "dps",
                                   "eta": 1.0, "jump_length": 1, "resample_count": 1, "strength": 1.0,
                                   "learning_rate": 0.1}},
            "sigmas": {"class_type": "BasicScheduler", "inputs": {"model": ["model", 0], "scheduler": "karras",
                                                                  "steps": 8, "denoise": 1.0}},
            "out": {"class_type": "SamplerCustom",
                    "inputs": {"model": ["model", 0], "add_noise": True, "noise_seed": seed, "cfg": 1.0,
                               "positive": ["cond", 0], "negative": ["cond", 0], "sampler": ["sampler", 0],
                               "sigmas": ["sigmas", 0], "latent_image": ["clean", 0]}},
            "image": {"class_type": "QuickstepDigitToImage", "inputs": {"samples": ["out", 0]}},
            "save": {"class_type": "SaveImage", "inputs": {"images": ["image", 0], "filename_prefix": "qs_dps"}},
        }

    interrupted = client.run(graph(11), on_event=interrupt_on_progress("out", 3))
    assert interrupted.status == "interrupted", interrupted.events[-3:]
    assert server.alive()
    after = client.run(graph(12))
    assert after.status == "success", after.error()
    diff = numpy.abs(_pixels(client, after).astype(int) - _inproc_pixels(inproc, graph(12)).astype(int))
    assert diff.max() <= 1 and diff.mean() < 0.01, (diff.max(), diff.mean())


def test_interrupted_cache_calibration_writes_nothing_and_the_next_one_works(client, server, host_base):
    folder = host_base / "models" / "quickstep_cache_calibrations"

    def graph(name):
        return {
            "model": {"class_type": "QuickstepTestTinyModel", "inputs": {"arch": "sd15", "seed": 0}},
            "cached": {"class_type": "QuickstepDeepCache",
                       "inputs": {"model": ["model", 0], "interval": 2, "schedule": "uniform", "branch": 0,
                                  "start_percent": 0.0, "end_percent": 1.0, "forecaster": "reuse", "history": 3}},
            "cond": {"class_type": "QuickstepTestConditioning", "inputs": {"arch": "sd15", "seed": 0,
                                                                          "context_dim": 0}},
            "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
            "sampler": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
            "sigmas": {"class_type": "BasicScheduler", "inputs": {"model": ["model", 0], "scheduler": "normal",
                                                                  "steps": 20, "denoise": 1.0}},
            "calib": {"class_type": "QuickstepCacheCalibration",
                      "inputs": {"model": ["cached", 0], "positive": ["cond", 0], "negative": ["cond", 0],
                                 "cfg": 2.0, "sampler": ["sampler", 0], "sigmas": ["sigmas", 0],
                                 "latent_image": ["latent", 0], "noise_seed": 0, "name": name}},
            "keep": {"class_type": "PreviewAny", "inputs": {"source": ["calib", 0]}},
        }

    interrupted = client.run(graph("qs_interrupted_calibration"), on_event=interrupt_on_progress("calib", 3))
    assert interrupted.status == "interrupted", interrupted.events[-3:]
    assert server.alive()
    assert not (folder / "qs_interrupted_calibration.json").exists()
    finished = client.run(graph("qs_after_interrupt_calibration"))
    assert finished.status == "success", finished.error()
    assert (folder / "qs_after_interrupt_calibration.json").exists()
    assert not [p for p in folder.glob("*") if not p.name.endswith(".json")]     # no temporary file left behind
