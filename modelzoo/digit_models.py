"""The digit model zoo: small class-conditional MNIST models of the host's own architectures, one registry for all.

Every entry is a ComfyUI 0.3.75 `comfy.supported_models` class (SD15, SDXL, SD3, Flux, QwenImage, WAN21_T2V, Lumina2)
built with a small config: the host builds the network, its model sampling, its latent format and its extra_conds,
so a sampler meets exactly what it meets on the full-size model of that family. Nothing of a host model's forward is
copied here.

Latent space: an exact, invertible pixel-unshuffle "VAE" of the 32x32 one-channel digit (background -1) with the
family's channel count: 1 channel at 32x32 for the SD1.5 models (the pixels themselves, modelzoo/mnist_unet.py),
4 channels at 16x16 for SDXL, 16 channels at 8x8 for the 16-channel families (SD3, Flux, Qwen-Image, Wan 2.1 per
frame, Lumina 2). Latents are stored at the raw scale of the family's VAE (unshuffled pixels divided by the 4- or
16-channel families' usual scale factor, 0.13025 for the SD VAE, 0.3611 for the Flux VAE), so each family's own
latent format brings them back to about unit range. Decoding depends on the latent's shape only, so one Digit Latent
to Image node serves every family. Video (Wan) latents are [B, 16, T, 8, 8], a digit moving a few pixels per frame;
Qwen-Image, whose host latent format is the Wan one, takes [B, 16, 1, 8, 8] like its real VAE's.

Real latent spaces: the `*_taesd` / `*_taef1` models were trained in the latent space of a real VAE of their family,
the TAESD-family tiny autoencoders ComfyUI's VAELoader knows by those names (taesd for SD1.5, 4 channels; taef1 for
Flux, 16 channels; their files in the user's models/vae_approx). Their digit is the 32 px digit upscaled to a 64 px
grey RGB image, so their latent is [B, C, 8, 8], stored raw as the host's VAE.encode returns it; the stock empty
latent (zeros) is their blank page, and decoding needs that VAE. The encoder runs only in training and restoration
benchmarks, from ../shared/models/taesd (testbed.mnist_ddpm.MODELS_DIR).

Conditioning: one shared digit token table for every architecture, the SD1.5 eps model's ([11, 4, 64], row 10 the
null digit); every other model was trained with it frozen. Digit Conditioning hands it as the cross-attention context
plus a pooled vector (the tokens' mean, 64 wide) that the families with a pooled input read (SDXL through the host's
encode_adm, SD3's y, Flux's vector_in); the others ignore it.

Importing this module needs only torch; the host-dependent functions import comfy when called.
"""
import dataclasses
import json
import math
from pathlib import Path

import torch

from . import mnist_unet
from .tiny_host import with_newer_host_fields

NETWORK_PREFIX = "model.diffusion_model."   # what the host's diffusion-model loader strips (UNETLoader)
POOLED_DIM = mnist_unet.CONTEXT_DIM
# SDXL's encode_adm appends six 256-wide size embeddings (height, width, crops, target size) to the pooled vector.
SDXL_ADM_CHANNELS = POOLED_DIM + 6 * 256
# Raw-latent scale per channel count: 1/scale_factor of the family's VAE (the 16-channel families vary: SD3 1.5305,
# Flux 0.3611, Wan a per-channel std of 1.1-3.3; Flux's sits in the middle and suits flow models at shift ~1).
LATENT_SCALE = {1: 1.0, 4: 1 / 0.13025, 16: 1 / 0.3611}
VIDEO_FRAMES = 4
MAX_SHIFT_PX = 2     # a clip's digit moves by up to 2 px per frame in x and y (MNIST digits have a 6 px margin)
VAE_IMAGE_SIZE = 64  # a real-VAE family's image of a digit: the 32 px digit upscaled 2x (TAESD's latent is 1/8: 8x8)
VAE_DOWNSCALE = 8


@dataclasses.dataclass(frozen=True)
class Architecture:
    name: str
    title: str
    host_class: str          # the comfy.supported_models class
    network: dict            # its unet_config (small)
    predictions: tuple       # trained prediction types; the first is the default
    channels: int            # latent channels: 1 (pixels, 32x32), 4 (16x16) or 16 (8x8)
    frames: int = 0          # 0: image latent [B, C, H, W]; n: video latent [B, C, n, H, W]
    sampling: tuple = ()     # (key, value) overrides of the host class's sampling_settings
    reads_pooled: bool = False   # the host model reads pooled_output (and fails without it)
    stock_loader: bool = False   # the host's UNETLoader detects this file's config
    vae: str = ""            # trained in the latent space of this real VAE (a VAELoader name); "": pixel-unshuffle

    @property
    def size(self):
        if self.vae:
            return VAE_IMAGE_SIZE // VAE_DOWNSCALE
        return mnist_unet.IMAGE_SIZE // math.isqrt(self.channels)

    def latent_shape(self, batch, frames=None):
        """Shape of a batch of this family's latents (`frames` overrides a video family's frame count; image
        families ignore it)."""
        time = ((frames or self.frames) if self.frames > 1 else self.frames,) if self.frames else ()
        return (batch, self.channels, *time, self.size, self.size)


def _flux_network():
    """Flux: 2 double-stream + 2 single-stream blocks, hidden 128 (4 heads of 32), the guidance input kept.
    Fields a newer host's FluxParams requires are added (tiny_host.with_newer_host_fields)."""
    network = {"image_model": "flux", "in_channels": 16, "out_channels": 16, "vec_in_dim": POOLED_DIM,
               "context_in_dim": mnist_unet.CONTEXT_DIM, "hidden_size": 128, "mlp_ratio": 4.0, "num_heads": 4,
               "depth": 2, "depth_single_blocks": 2, "axes_dim": [8, 12, 12], "theta": 10000, "patch_size": 2,
               "qkv_bias": True, "guidance_embed": True}
    import comfy.ldm.flux.model
    return with_newer_host_fields(comfy.ldm.flux.model.FluxParams, network)


_CONTEXT = mnist_unet.CONTEXT_DIM
# The SD1.5 digit UNet with the real SD1.5 latent's 4 channels at 8x8 (the host's SD15 class, its own head count).
_SD15_TAESD_UNET = {**mnist_unet.UNET_CONFIG, "image_size": VAE_IMAGE_SIZE // VAE_DOWNSCALE, "in_channels": 4,
                    "out_channels": 4}
# SDXL's UNet: no attention at the top level, label_emb reading the host's encode_adm (pooled + size embeddings).
_SDXL_UNET = {
    "image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 32, "channel_mult": [1, 2],
    "num_res_blocks": [1, 1], "transformer_depth": [0, 1], "transformer_depth_output": [0, 0, 1, 1],
    "transformer_depth_middle": 1, "context_dim": _CONTEXT, "use_linear_in_transformer": True,
    "use_spatial_transformer": True, "legacy": False, "num_classes": "sequential",
    "adm_in_channels": SDXL_ADM_CHANNELS, "use_checkpoint": False, "use_temporal_resblock": False,
    "use_temporal_attention": False}
# SD3's MMDiT at the smallest size the host's detection accepts (hidden = 64 x depth, one head per 64): UNETLoader
# loads these files as SD3 (shift 3). 16 tokens of a 2x2 patch: the 8x8 latent of both the pixel and TAESD3 models.
_SD3_MMDIT = {
    "in_channels": 16, "out_channels": 16, "patch_size": 2, "depth": 2, "input_size": None,
    "adm_in_channels": POOLED_DIM, "pos_embed_max_size": 4, "num_patches": 16, "pos_embed_scaling_factor": None,
    "context_embedder_config": {"target": "torch.nn.Linear", "params": {"in_features": _CONTEXT, "out_features": 128}}}
ARCHITECTURES = {a.name: a for a in [
    Architecture("sd15", "SD1.5 UNet", "SD15", mnist_unet.UNET_CONFIG, mnist_unet.PREDICTIONS, channels=1),
    Architecture("sdxl", "SDXL UNet", "SDXL", _SDXL_UNET, ("eps",), channels=4, reads_pooled=True),
    Architecture("sd3", "SD3 MMDiT", "SD3", _SD3_MMDIT, ("flow",), channels=16, reads_pooled=True,
                 stock_loader=True),
    Architecture("flux", "Flux DiT", "Flux", {}, ("flow",), channels=16, reads_pooled=True),  # _flux_network()
    Architecture("qwen_image", "Qwen-Image MMDiT", "QwenImage", {
        "image_model": "qwen_image", "patch_size": 2, "in_channels": 64, "out_channels": 16, "num_layers": 3,
        "attention_head_dim": 32, "num_attention_heads": 4, "joint_attention_dim": _CONTEXT,
        "axes_dims_rope": [8, 12, 12]}, ("flow",), channels=16, frames=1),
    # Wan 2.1 text-to-video: 3D patching (1, 2, 2) over [B, 16, T, 8, 8]. The host's shift 8 is for 480p+ video;
    # on 64 tokens per frame it would spend the 20 steps at high noise.
    Architecture("wan21", "Wan 2.1 video DiT", "WAN21_T2V", {
        "image_model": "wan2.1", "model_type": "t2v", "patch_size": [1, 2, 2], "in_dim": 16, "out_dim": 16,
        "dim": 128, "ffn_dim": 512, "freq_dim": 256, "text_dim": _CONTEXT, "num_heads": 4, "num_layers": 4,
        "window_size": [-1, -1], "qk_norm": True, "cross_attn_norm": True, "eps": 1e-6},
        ("flow",), channels=16, frames=VIDEO_FRAMES, sampling=(("shift", 1.0),)),
    # Lumina 2 (Z-Image's family): NextDiT with noise and context refiners; the host's shift 6 is for 1024 px.
    Architecture("lumina2", "Lumina 2 NextDiT", "Lumina2", {
        "image_model": "lumina2", "patch_size": 2, "in_channels": 16, "dim": 128, "n_layers": 3,
        "n_refiner_layers": 1, "n_heads": 4, "n_kv_heads": 4, "multiple_of": 32, "ffn_dim_multiplier": 4.0,
        "qk_norm": True, "cap_feat_dim": _CONTEXT, "axes_dims": [8, 12, 12], "axes_lens": [32, 32, 32],
        "rope_theta": 10000.0}, ("flow",), channels=16, sampling=(("shift", 1.0),)),
    # The same families in their real latent spaces (TAESD, TAEF1, TAESDXL, TAESD3): the host's own classes unchanged.
    Architecture("sd15_taesd", "SD1.5 UNet (TAESD latents)", "SD15", _SD15_TAESD_UNET, ("eps",), channels=4,
                 vae="taesd"),
    Architecture("flux_taef1", "Flux DiT (TAEF1 latents)", "Flux", {}, ("flow",), channels=16, reads_pooled=True,
                 vae="taef1"),
    Architecture("sdxl_taesdxl", "SDXL UNet (TAESDXL latents)", "SDXL",
                 {**_SDXL_UNET, "image_size": VAE_IMAGE_SIZE // VAE_DOWNSCALE}, ("eps",), channels=4,
                 reads_pooled=True, vae="taesdxl"),
    Architecture("sd3_taesd3", "SD3 MMDiT (TAESD3 latents)", "SD3", _SD3_MMDIT, ("flow",), channels=16,
                 reads_pooled=True, stock_loader=True, vae="taesd3"),
]}


def architecture(name):
    if name not in ARCHITECTURES:
        raise ValueError(f"digit model architecture must be one of {list(ARCHITECTURES)}, got {name!r}")
    return ARCHITECTURES[name]


def weights_path(name, prediction=None):
    """Where the trained weights of architecture `name` live (SD1.5: per prediction; absent if not trained)."""
    arch = architecture(name)
    if name == "sd15":
        return mnist_unet.weights_path(prediction or arch.predictions[0])
    return mnist_unet.WEIGHTS_DIR / f"digit_{name}.safetensors"


def host_config(name, prediction=None):
    """The host supported_models config of architecture `name`, carrying its small network config."""
    arch = architecture(name)
    if name == "sd15":
        return mnist_unet.model_config(prediction or arch.predictions[0])
    import comfy.supported_models
    network = _flux_network() if arch.host_class == "Flux" else arch.network
    config = getattr(comfy.supported_models, arch.host_class)(dict(network))
    config.sampling_settings.update(dict(arch.sampling))
    return config


def build_base_model(name, device=None, dtype=torch.float32, manual_cast_dtype=None, prediction=None):
    """A host BaseModel of architecture `name`, parameters uninitialised (ComfyUI's layers skip init)."""
    config = host_config(name, prediction)
    config.set_inference_dtype(dtype, manual_cast_dtype)
    return config.get_model({}, device=device)


def load_digit_model(name, prediction=None, path=None):
    """A host ModelPatcher around the trained digit model of architecture `name` (weights from `path` if given).
    A file of another architecture or prediction, or one that is not a readable digit model, raises ValueError
    naming the file."""
    arch = architecture(name)
    prediction = prediction or arch.predictions[0]
    if prediction not in arch.predictions:
        raise ValueError(f"the {name} digit model exists for prediction {list(arch.predictions)}, got {prediction!r}")
    path = Path(path) if path is not None else weights_path(name, prediction)
    try:
        network, _, metadata = mnist_unet.read_weights(path, mnist_unet.UNET_PREFIX if name == "sd15"
                                                       else NETWORK_PREFIX)
    except Exception as e:
        raise ValueError(f"{path} is not a readable safetensors file ({type(e).__name__}: {e})") from None
    stored = (json.loads(metadata.get("architecture", '"sd15"')), json.loads(metadata.get("prediction", "null")))
    if stored != (name, prediction):
        raise ValueError(f"{path} holds the {stored[0]} digit model ({stored[1]}), not the {name} one ({prediction})")
    config = host_config(name, prediction)
    # the host's own loader step: a newer host renames some checkpoint keys (0.33: Flux's *_norm.scale -> .weight)
    network = config.process_unet_state_dict(dict(network))
    try:
        return mnist_unet.patcher_for(network, config.supported_inference_dtypes,
                                      lambda **kwargs: build_base_model(name, prediction=prediction, **kwargs))
    except RuntimeError as e:   # load_state_dict: missing, unexpected or mis-shaped tensors
        raise ValueError(f"{path} does not fit the {name} digit model's network: {str(e)[:300]}") from None


# Latents -------------------------------------------------------------------------------------------------------------

def images_to_latent(images, channels):
    """Pixel digits [..., 1, 32, 32] in [-1, 1] -> latent [..., C, 32/r, 32/r] (r = sqrt(C)), exactly invertible."""
    factor = math.isqrt(channels)
    lead = images.shape[:-3]
    flat = images.reshape(-1, 1, mnist_unet.IMAGE_SIZE, mnist_unet.IMAGE_SIZE)
    latent = torch.nn.functional.pixel_unshuffle(flat, factor) * LATENT_SCALE[channels]
    return latent.reshape(*lead, *latent.shape[1:])


def latent_to_images(latent):
    """Any digit family's latent -> pixel digits [N, 1, 32, 32]: image latents [B, C, H, W] give B images, video
    latents [B, C, T, H, W] give B * T (clip after clip, frames in order)."""
    if latent.ndim == 5:
        latent = latent.movedim(2, 1).reshape(-1, latent.shape[1], *latent.shape[3:])
    channels = latent.shape[1]
    if latent.ndim != 4 or channels not in LATENT_SCALE or latent.shape[-1] * math.isqrt(channels) != \
            mnist_unet.IMAGE_SIZE or latent.shape[-2] != latent.shape[-1]:
        raise ValueError(f"a digit latent is [B, C, H, W] or [B, C, T, H, W] with C of {sorted(LATENT_SCALE)} and "
                         f"H = W = 32 / sqrt(C); got {list(latent.shape)}")
    return torch.nn.functional.pixel_shuffle(latent.float() / LATENT_SCALE[channels], math.isqrt(channels))


def latent_to_digits(latent, vae=None):
    """Any digit family's latent -> [N, 28, 28] in [0, 1] (the classifier's input). A latent of a real-VAE family
    (sd15_taesd, flux_taef1) needs that `vae` (a host VAE: VAELoader taesd / taef1). A reading of results: no
    gradient flows back."""
    if vae is not None:
        with torch.no_grad():
            return vae_images_to_digits(vae.decode(latent))
    return mnist_unet.latent_to_digits(latent_to_images(latent))


def digits_to_vae_images(images):
    """Pixel digits [N, 1, 32, 32] in [-1, 1] -> the grey IMAGE a real VAE encodes, [N, 64, 64, 3] in [0, 1]."""
    grey = torch.nn.functional.interpolate((images.float() + 1.0) / 2.0, size=(VAE_IMAGE_SIZE, VAE_IMAGE_SIZE),
                                           mode="bilinear", align_corners=False).clamp(0.0, 1.0)
    return grey.movedim(1, -1).expand(-1, -1, -1, 3)


def vae_images_to_digits(images):
    """A decoded IMAGE [N, 64, 64, 3] in [0, 1] -> digits [N, 28, 28] in [0, 1] (the inverse of
    digits_to_vae_images up to the VAE's own loss)."""
    return mnist_unet.latent_to_digits(decoded_to_pixels(images.movedim(-1, 1) * 2.0 - 1.0))


def decoded_to_pixels(decoded):
    """A decoder's output [N, 3, 64, 64] in [-1, 1] -> pixel digits [N, 1, 32, 32] in [-1, 1]: grey, area-averaged
    back to 32 px. Differentiable: restoration guidance measures a real decoder's output with it."""
    grey = decoded.float().mean(dim=1, keepdim=True)
    return torch.nn.functional.interpolate(grey, size=(mnist_unet.IMAGE_SIZE, mnist_unet.IMAGE_SIZE), mode="area")


def encode_digits(vae, images, batch=500):
    """Pixel digits [N, 1, 32, 32] -> their latents in `vae`'s space (the host's VAE.encode), `batch` at a time."""
    return torch.cat([vae.encode(digits_to_vae_images(chunk)).float() for chunk in images.split(batch)])


def load_taesd(name, directory):
    """The host VAE VAELoader makes of the TAESD-family `name` (taesd, taef1, ...) from the two halves in
    `directory`. FileNotFoundError names the files when they are absent."""
    import folder_paths
    import nodes

    directory = Path(directory)
    halves = [directory / f"{name}_{part}.safetensors" for part in ("encoder", "decoder")]
    missing = [str(f) for f in halves if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"the {name} VAE needs {' and '.join(missing)} (../shared/models/taesd, or a "
                                f"ComfyUI models/vae_approx folder)")
    folder_paths.add_model_folder_path("vae_approx", str(directory))
    return nodes.VAELoader().load_vae(name)[0]


def empty_latent(name, batch=1, frames=None, device=None):
    """The blank page of architecture `name`: the all-background digit's latent (not zeros: under EPS the host adds
    the latent to the scaled noise, and background is what a digit stands on). A real-VAE family's is the stock
    empty latent, zeros, as EmptyLatentImage gives its users."""
    arch = architecture(name)
    shape = arch.latent_shape(batch, frames)
    if arch.vae:
        return torch.zeros(shape, device=device)
    return torch.full(shape, -LATENT_SCALE[arch.channels], device=device)


def moving_clips(images, frames, generator):
    """Clips of digits drifting at a constant random velocity of up to MAX_SHIFT_PX per frame in x and y:
    [N, 1, 32, 32] -> [N, frames, 1, 32, 32]. Frame 1 is the digit where it was (offset 0), so it can be compared
    with still digits; background (-1) wraps round, digit pixels never do (MNIST leaves a 6 px margin)."""
    velocity = torch.randint(-MAX_SHIFT_PX, MAX_SHIFT_PX + 1, (len(images), 2), generator=generator)
    clips = []
    for image, (vy, vx) in zip(images, velocity.tolist()):
        clips.append(torch.stack([torch.roll(image, ((k - 1) * vy, (k - 1) * vx), dims=(-2, -1))
                                  for k in range(frames)]))
    return torch.stack(clips)


def training_latents(name, images, generator):
    """Training latents of architecture `name` from pixel digits [N, 1, 32, 32]: the family's latent layout (a
    real-VAE family's come from its encoder: encode_digits)."""
    arch = architecture(name)
    if arch.vae:
        raise ValueError(f"the {name} digit model's latents come from the {arch.vae} encoder (encode_digits)")
    if arch.frames > 1:
        clips = moving_clips(images, arch.frames, generator)             # [N, T, 1, 32, 32]
        return images_to_latent(clips, arch.channels).movedim(1, 2)     # [N, C, T, h, w]
    latent = images_to_latent(images, arch.channels)
    return latent.unsqueeze(2) if arch.frames == 1 else latent


# Conditioning --------------------------------------------------------------------------------------------------------

# The one conditioning of every digit model: the shared digit tokens and their mean as pooled_output.
digit_conditioning = mnist_unet.digit_conditioning
unconditional_conditioning = mnist_unet.unconditional_conditioning


def model_inputs(model, conditioning, x, prompt_type="positive"):
    """The keyword arguments the host's samplers hand `model.apply_model` for `conditioning` on the batch `x`
    (c_crossattn, y, guidance, num_tokens, ...): the host's own encode_model_conds and process_cond make them, so
    training sees what sampling sees."""
    import comfy.sampler_helpers
    import comfy.samplers

    [cond] = comfy.samplers.encode_model_conds(model.extra_conds, comfy.sampler_helpers.convert_cond(conditioning),
                                               x, x.device, prompt_type, latent_image=x)
    return {k: c.process_cond(batch_size=len(x), area=None).cond for k, c in cond["model_conds"].items()}


def describe_latent(arch):
    time = "T, " if arch.frames > 1 else ("1, " if arch.frames else "")
    return f"[B, {arch.channels}, {time}{arch.size}, {arch.size}]"


def latent_problem(name, shape):
    """Why a latent of `shape` cannot be sampled by architecture `name`'s digit model (None if it can)."""
    arch = architecture(name)
    expected = arch.latent_shape(shape[0] if len(shape) else 1)
    if len(shape) != len(expected) or shape[1] != arch.channels or \
            (arch.frames == 1 and shape[2] != 1):
        return (f"the {arch.title} digit model samples {describe_latent(arch)} latents (Empty Digit Latent with "
                f"architecture = {name!r}); got a latent of shape {list(shape)}")
    return None


def conditioning_problem(name, conds):
    """Why `conds` ({"positive": [cond dict, ...], ...} as a host guider holds them) is not conditioning architecture
    `name`'s digit model reads (None if it is)."""
    arch = architecture(name)
    tokens, width = mnist_unet.CONTEXT_TOKENS, mnist_unet.CONTEXT_DIM
    reads = f"digit tokens [B, {tokens}, {width}]" + (f" and a pooled vector [B, {width}]" if arch.reads_pooled
                                                       else "")
    for kind, entries in conds.items():
        for entry in entries:
            context, pooled = entry.get("cross_attn"), entry.get("pooled_output")
            found = []
            if context is None or context.ndim != 3 or context.shape[-1] != width:
                found.append("a cross-attention context of shape "
                             f"{list(context.shape) if context is not None else None}")
            if arch.reads_pooled and (pooled is None or pooled.shape[-1] != width):
                found.append(f"pooled_output of shape {list(pooled.shape) if pooled is not None else None}")
            if found:
                return (f"the {arch.title} digit model reads Digit Conditioning ({reads}); its {kind} conditioning "
                        f"has {' and '.join(found)}")
    return None
