"""Soak: a long run of mixed Quickstep prompts through one real ComfyUI server, with the server's RSS after each.

Prompt kinds (cycled, with batch size, resolution, steps and sampler varied by a seeded generator): the embedded
digit model with a Quickstep sampler in the stock KSampler (saved image), the same behind DeepCache, a distilled
family preset on the exact oracle, and the tiny host SD1.5 UNet with the qs_dmn scheduler at three resolutions. A fixed-seed digit prompt
runs first and last: its image bytes must be identical.
    python -m bench.soak [--prompts 200]        (starts its own server on the test base)
"""
import argparse
import json
import random
import time
from pathlib import Path

from testbed.host import api_workflow_path

DIGITS = json.loads(api_workflow_path("digits_fast_sampling").read_text())


def digits_prompt(seed, steps, batch, sampler, deep_cache=None):
    """The shipped digit workflow; `deep_cache`: the DeepCache node's widget values, to put it before the KSampler."""
    prompt = json.loads(json.dumps(DIGITS))
    prompt["4"]["inputs"]["batch_size"] = batch
    prompt["5"]["inputs"].update(seed=seed, steps=steps, sampler_name=sampler)
    if deep_cache is not None:
        # DeepCache is for UNets: the SD1.5 digit model (the shipped workflow draws with the Qwen-Image one)
        for node in ("1", "4"):
            prompt[node]["inputs"]["architecture"] = "sd15"
        prompt["cache"] = {"class_type": "QuickstepDeepCache", "inputs": {**deep_cache, "model": ["1", 0]}}
        prompt["5"]["inputs"]["model"] = ["cache", 0]
    return prompt


def oracle_prompt(rng):
    """A distilled family preset on the exact oracle (its latent is fixed: 64x64 images)."""
    family = rng.choice(["lcm", "tcd", "turbo", "dmd2", "flow_distilled"])
    return {"model": {"class_type": "QuickstepTestOracle",
                      "inputs": {"family": "flow" if family == "flow_distilled" else "eps", "mixture_seed": 0}},
            "cond": {"class_type": "QuickstepTestConditioning", "inputs": {"arch": "sd15", "seed": 0,
                                                                          "context_dim": 0}},
            "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64,
                                                                    "batch_size": rng.randint(1, 3)}},
            "setup": {"class_type": "QuickstepDistilledSetup",
                      "inputs": {"model": ["model", 0], "family": family, "gamma": 0.3,
                                 "steps": {"turbo": 2, "dmd2": 4}.get(family, 4)}},
            "out": {"class_type": "SamplerCustom",
                    "inputs": {"model": ["setup", 0], "add_noise": True, "noise_seed": rng.randint(0, 99),
                               "cfg": 1.0, "positive": ["cond", 0], "negative": ["cond", 0],
                               "sampler": ["setup", 1], "sigmas": ["setup", 2], "latent_image": ["latent", 0]}},
            "keep": {"class_type": "PreviewAny", "inputs": {"source": ["out", 0]}}}


def tiny_unet_prompt(rng):
    """The tiny host SD1.5 UNet with the qs_dmn scheduler at a changing resolution."""
    size = rng.choice([64, 96, 128])
    return {"model": {"class_type": "QuickstepTestTinyModel", "inputs": {"arch": "sd15", "seed": 0}},
            "cond": {"class_type": "QuickstepTestConditioning", "inputs": {"arch": "sd15", "seed": 0,
                                                                          "context_dim": 0}},
            "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size,
                                                                    "batch_size": rng.randint(1, 3)}},
            "out": {"class_type": "KSampler",
                    "inputs": {"model": ["model", 0], "seed": rng.randint(0, 99), "steps": rng.randint(3, 8),
                               "cfg": 2.0, "sampler_name": rng.choice(["qs_dpmpp_2m", "qs_unipc_bh2", "qs_deis"]),
                               "scheduler": "qs_dmn", "positive": ["cond", 0], "negative": ["cond", 0],
                               "latent_image": ["latent", 0], "denoise": 1.0}},
            "keep": {"class_type": "PreviewAny", "inputs": {"source": ["out", 0]}}}


def mixed_prompts(count, deep_cache, seed=0):
    rng = random.Random(seed)
    for i in range(count):
        kind = ("digits", "deepcache", "distilled", "tiny-unet")[i % 4]
        if kind in ("digits", "deepcache"):
            yield kind, digits_prompt(rng.randint(0, 99), rng.randint(2, 6), rng.randint(1, 4),
                                      rng.choice(["qs_dpmpp_2m", "qs_unipc_bh2", "euler", "qs_tcd"]),
                                      deep_cache=deep_cache if kind == "deepcache" else None)
        elif kind == "distilled":
            yield kind, oracle_prompt(rng)
        else:
            yield kind, tiny_unet_prompt(rng)


def image_bytes(client, result, node="7"):
    image = result.outputs[node]["images"][0]
    return client.view(image["filename"], image.get("subfolder", ""))


def soak(client, pid, count, log=print):
    """Run `count` mixed prompts; returns {'failed': [...], 'rss_mb': [...], 'identical': bool, 'wall_s': ...}."""
    import psutil
    from batch.workflow_format import widget_defaults
    process = psutil.Process(pid)
    deep_cache = widget_defaults(client.object_info("QuickstepDeepCache"), "QuickstepDeepCache")
    fixed = digits_prompt(seed=42, steps=3, batch=2, sampler="qs_dpmpp_2m")
    first = image_bytes(client, client.run(fixed))
    failed, rss, started = [], [], time.time()
    for i, (kind, prompt) in enumerate(mixed_prompts(count, deep_cache)):
        result = client.run(prompt)
        if result.status != "success":
            failed.append((i, kind, result.error()))
        rss.append(process.memory_info().rss / 2 ** 20)
        if (i + 1) % 25 == 0:
            log(f"{i + 1}/{count} prompts, RSS {rss[-1]:.0f} MB, {time.time() - started:.0f} s")
    last = image_bytes(client, client.run(fixed))
    return {"failed": failed, "rss_mb": rss, "identical": first == last, "wall_s": time.time() - started}


def growth_after_warmup(rss_mb):
    """RSS growth from the end of the first third (warm-up: first loads, caches filling) to the highest point after."""
    warm = len(rss_mb) // 3
    return max(rss_mb[warm:]) - rss_mb[warm]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=200)
    args = parser.parse_args(argv)
    import tempfile
    from testbed.host import HOST_DIR, Client, Server, prepare_base
    base = prepare_base(HOST_DIR / "testbase", with_testbed_nodes=True)      # every model here is built by a node
    server = Server(base, Path(tempfile.mkdtemp()) / "soak_server.log").start()
    try:
        stats = soak(Client(server.address), server.proc.pid, args.prompts)
    finally:
        server.stop()
    rss = stats["rss_mb"]
    print(f"{args.prompts} prompts in {stats['wall_s']:.0f} s, {len(stats['failed'])} failed, fixed-seed image "
          f"identical: {stats['identical']}; RSS {rss[0]:.0f} -> {rss[-1]:.0f} MB (max {max(rss):.0f}), growth after "
          f"warm-up {growth_after_warmup(rss):.1f} MB")


if __name__ == "__main__":
    main()
