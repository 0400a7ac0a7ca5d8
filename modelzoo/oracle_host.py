"""The Gaussian-mixture oracle as a real host model: a `comfy.model_base.BaseModel` inside a `ModelPatcher`, for the
three families ComfyUI samples (EPS with the SD1.5 discrete schedule, V_PREDICTION with the same schedule, CONST
flow with shift 3). The host's own apply_model runs unchanged: calculate_input scales the state, the "network"
returns the exact model output for the family, calculate_denoised turns it back into the exact E[x0 | x].

Imports comfy, so only import this inside a running host (nodes, tests, benchmarks).
"""
import torch

from .gmm import GaussianMixture

FAMILIES = ("eps", "v", "flow")
ORACLE_SHAPE = (4, 8, 8)   # a 64x64 image's SD latent: the stock EmptyLatentImage makes it


class GMMNetwork(torch.nn.Module):
    """Stands where the UNet stands. Receives the host's scaled input and timestep, answers with the model output
    that makes the host's calculate_denoised return the exact denoiser."""

    def __init__(self, mixture_seed=0, components=6, flow=False, device=None, operations=None, **_):
        super().__init__()
        self.gmm = GaussianMixture(ORACLE_SHAPE, components=components, seed=mixture_seed)
        self.flow = flow
        self.dtype = torch.float32
        self.model_sampling = None   # set by build_oracle: the host creates it after the network
        # A parameter so the host's memory management has something to place and count.
        self.anchor = torch.nn.Parameter(torch.zeros(1, device=device), requires_grad=False)

    def forward(self, xc, timesteps, context=None, transformer_options={}, **kwargs):
        ms = self.model_sampling
        # The exact sigma: the host's timestep() is not invertible for shifted flow schedules, so take the sigma
        # the sampling path records for every call.
        if "sigmas" not in transformer_options:
            raise ValueError("the Gaussian-mixture oracle needs transformer_options['sigmas'] (set by the host's "
                             "sampling path); pass it when calling apply_model directly")
        sigma = transformer_options["sigmas"].to(torch.float64)
        sigma_b = sigma.reshape(-1, *([1] * (xc.ndim - 1)))
        # The host's calculate_input and calculate_denoised are affine in their tensor argument: invert them.
        x = xc.to(torch.float64) / ms.calculate_input(sigma_b, torch.ones_like(sigma_b))
        denoised = self.gmm.denoise(x, sigma, self.flow)
        base = ms.calculate_denoised(sigma_b, torch.zeros_like(x), x)
        slope = ms.calculate_denoised(sigma_b, torch.ones_like(x), x) - base
        return ((denoised - base) / slope).to(xc.dtype)


def build_oracle(family="eps", mixture_seed=0):
    """A ModelPatcher around the exact oracle for `family` in FAMILIES."""
    import comfy.latent_formats
    import comfy.model_base
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models_base

    if family not in FAMILIES:
        raise ValueError(f"oracle family must be one of {FAMILIES}, got {family!r}")

    class OracleLatent(comfy.latent_formats.LatentFormat):
        latent_channels = ORACLE_SHAPE[0]
        scale_factor = 1.0

    class OracleConfig(comfy.supported_models_base.BASE):
        unet_config = {}
        latent_format = OracleLatent
        sampling_settings = {"shift": 3.0} if family == "flow" else {}

    config = OracleConfig({"mixture_seed": mixture_seed, "flow": family == "flow"})
    config.set_inference_dtype(torch.float32, None)
    model_type = {"eps": comfy.model_base.ModelType.EPS, "v": comfy.model_base.ModelType.V_PREDICTION,
                  "flow": comfy.model_base.ModelType.FLOW}[family]
    load_device = comfy.model_management.get_torch_device()
    offload_device = comfy.model_management.unet_offload_device()
    model = comfy.model_base.BaseModel(config, model_type=model_type, device=offload_device, unet_model=GMMNetwork)
    model.diffusion_model.model_sampling = model.model_sampling
    return comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=offload_device)
