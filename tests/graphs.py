"""API-format graph builders shared by the tests (the same JSON a user or the batch runner posts)."""


def oracle_sampling_graph(family, sampler="euler", steps=10, scheduler="simple", seed=0, batch=2,
                          sampler_node=None, sigmas_node=None):
    """QuickstepTestOracle -> SamplerCustomAdvanced; node "out" holds the sampled latent.
    `sampler_node` / `sigmas_node` replace the stock KSamplerSelect / BasicScheduler (node dicts; may link "model")."""
    graph = {
        "model": {"class_type": "QuickstepTestOracle", "inputs": {"family": family, "mixture_seed": 0}},
        "cond": {"class_type": "QuickstepTestConditioning", "inputs": {"arch": "sd15", "seed": 0, "context_dim": 0}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": batch}},
        "noise": {"class_type": "RandomNoise", "inputs": {"noise_seed": seed}},
        "guider": {"class_type": "BasicGuider", "inputs": {"model": ["model", 0], "conditioning": ["cond", 0]}},
        "sampler": sampler_node or {"class_type": "KSamplerSelect", "inputs": {"sampler_name": sampler}},
        "sigmas": sigmas_node or {"class_type": "BasicScheduler",
                                  "inputs": {"model": ["model", 0], "scheduler": scheduler, "steps": steps,
                                             "denoise": 1.0}},
        "out": {"class_type": "SamplerCustomAdvanced",
                "inputs": {"noise": ["noise", 0], "guider": ["guider", 0], "sampler": ["sampler", 0],
                           "sigmas": ["sigmas", 0], "latent_image": ["latent", 0]}},
        "keep": sink("out"),
    }
    return graph


def sink(node_id, slot=0):
    """The stock PreviewAny output node: makes a graph without an image output executable."""
    return {"class_type": "PreviewAny", "inputs": {"source": [node_id, slot]}}


def oracle_ksampler_graph(family, sampler, steps=10, scheduler="karras", seed=3, batch=4, denoise=1.0, cfg=1.0):
    """QuickstepTestOracle -> the stock KSampler; node "out" holds the sampled latent."""
    return {
        "model": {"class_type": "QuickstepTestOracle", "inputs": {"family": family, "mixture_seed": 0}},
        "cond": {"class_type": "QuickstepTestConditioning", "inputs": {"arch": "sd15", "seed": 0, "context_dim": 0}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": batch}},
        "out": {"class_type": "KSampler",
                "inputs": {"model": ["model", 0], "seed": seed, "steps": steps, "cfg": cfg, "sampler_name": sampler,
                           "scheduler": scheduler, "positive": ["cond", 0], "negative": ["cond", 0],
                           "latent_image": ["latent", 0], "denoise": denoise}},
        "keep": sink("out"),
    }
