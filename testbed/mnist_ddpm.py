"""A real, independently trained pixel-space model for tests and benchmarks: the pretrained MNIST DDPM in
/work/shared/models/mnist_ddpm (the "coursework" eps CNN, 1000 linear-beta steps 1e-4..0.02, 28x28 digits in
[-0.5, 0.5], unconditional) wrapped as a host model: a `comfy.model_base.BaseModel` inside a `ModelPatcher`, whose
model_sampling is the host's ModelSamplingDiscrete (EPS) carrying the checkpoint's own schedule.

The schedule cannot come from sampling_settings: the host's "linear" beta_schedule is linear in sqrt(beta) (the LDM
"scaled linear"), while this DDPM's betas are linear in beta, beta_k = 1e-4 + (0.02 - 1e-4) * k / 1000 for
k = 0..1000, and its training steps 1..1000 use alpha_bar_k = prod_{i<=k} (1 - beta_i) (the checkpoint's `alpha_t`
buffer). The host's betas are therefore derived from `alpha_t` so the host's discrete alphas_cumprod equal
alpha_t[1:] exactly (see `schedule_check`).

Test support only, never part of the pack's runtime: it unpickles the checkpoint (torch.load, weights_only=True).
Imports comfy inside functions.
"""
import importlib.util
import os
from pathlib import Path

import torch

# ../shared/models beside the checkout (where CI puts it), unless QS_MODELS_DIR says otherwise.
MODELS_DIR = Path(os.environ.get("QS_MODELS_DIR", Path(__file__).resolve().parents[2] / "shared" / "models"))
DDPM_DIR = MODELS_DIR / "mnist_ddpm"
CHECKPOINT = DDPM_DIR / "ddpm_mnist.pth"
REFERENCE_LOADER = DDPM_DIR / "reference_loader.py"
LATENT_SHAPE = (1, 28, 28)
DATA_OFFSET = 0.5     # the network's data is pixel/255 - 0.5


class SkipReason(Exception):
    """The shared model files are not on this machine; tests should skip with str(reason)."""


def available():
    """None when the checkpoint and its reference loader are present, else the reason they are not."""
    missing = [str(p) for p in (CHECKPOINT, REFERENCE_LOADER) if not p.is_file()]
    return f"pretrained MNIST DDPM not found: {', '.join(missing)}" if missing else None


def reference_module():
    """The checkpoint's reference_loader.py (its network class and k-diffusion wrapper), imported from its file."""
    reason = available()
    if reason:
        raise SkipReason(reason)
    spec = importlib.util.spec_from_file_location("mnist_ddpm_reference_loader", REFERENCE_LOADER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read_checkpoint():
    """(network state dict, alpha_t [1001]) from the checkpoint; alpha_t[k] = prod_{i<=k} (1 - beta_i)."""
    reason = available()
    if reason:
        raise SkipReason(reason)
    state = torch.load(CHECKPOINT, map_location="cpu", weights_only=True)
    network = {k[len("gt."):]: v for k, v in state.items() if k.startswith("gt.")}
    return network, state["alpha_t"]


def host_betas(alpha_t):
    """Betas whose cumulative product of (1 - beta) is alpha_t[1:], the alpha_bar of training steps 1..1000."""
    alpha_bar = alpha_t.double()[1:]
    previous = torch.cat([alpha_bar.new_ones(1), alpha_bar[:-1]])
    return 1.0 - alpha_bar / previous


class CourseworkAdapter(torch.nn.Module):
    """Stands where the UNet stands. The host hands it the c_in-scaled state and its discrete timestep index
    t = 0..999 (nearest schedule entry to sigma); the network was trained on step k = t + 1 given as k / 1000."""

    def __init__(self, device=None, operations=None, **_):
        super().__init__()
        self.net = reference_module().CourseworkCNN()
        self.num_steps = 1000
        self.dtype = torch.float32
        self.to(device)

    def forward(self, xc, timesteps, context=None, transformer_options={}, **kwargs):
        return self.net(xc, (timesteps.float() + 1) / self.num_steps)


def load_ddpm_model():
    """A ModelPatcher around the pretrained DDPM (raises SkipReason when the shared model files are absent)."""
    import comfy.latent_formats
    import comfy.model_base
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models_base

    network, alpha_t = read_checkpoint()

    class DdpmPixelLatent(comfy.latent_formats.LatentFormat):
        latent_channels = LATENT_SHAPE[0]
        scale_factor = 1.0

    class DdpmConfig(comfy.supported_models_base.BASE):
        unet_config = {}
        latent_format = DdpmPixelLatent
        sampling_settings = {"timesteps": len(alpha_t) - 1}

    config = DdpmConfig({})
    config.set_inference_dtype(torch.float32, None)
    load_device = comfy.model_management.get_torch_device()
    offload_device = comfy.model_management.unet_offload_device()
    model = comfy.model_base.BaseModel(config, model_type=comfy.model_base.ModelType.EPS, device=offload_device,
                                       unet_model=CourseworkAdapter)
    model.model_sampling._register_schedule(given_betas=host_betas(alpha_t))
    model.diffusion_model.net.load_state_dict(network, strict=True)
    # Inference only: no autograd graphs when samplers are driven outside the host's inference mode (tests).
    model.diffusion_model.eval().requires_grad_(False)
    return comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=offload_device)


def latent_to_image(latent):
    """DDPM latent [B, 1, 28, 28] in [-0.5, 0.5] -> ComfyUI IMAGE [B, 28, 28, 3] in [0, 1], grey in RGB."""
    return (latent[:, 0].float() + DATA_OFFSET).clamp(0.0, 1.0).unsqueeze(-1).expand(-1, -1, -1, 3).contiguous()


def schedule_check(patcher):
    """Max |host alphas_cumprod - checkpoint alpha_t[1:]|, the host's alphas_cumprod recovered from its sigmas."""
    _, alpha_t = read_checkpoint()
    sigmas = patcher.get_model_object("model_sampling").sigmas.double()
    return (1.0 / (1.0 + sigmas ** 2) - alpha_t.double()[1:]).abs().max().item()


def reference_check(patcher, sigma_indices=(0, 10, 100, 500, 999), batch=4, seed=0):
    """{sigma: max |host eps - reference eps|} at schedule sigmas: the host's apply_model against the reference loader's
    own k-diffusion wrapper D(x, sigma), on the same random states x = sigma * noise. Compared as the predicted noise
    eps = (x - D) / sigma, the network's own output: D itself carries float32 rounding that grows with sigma (|x| is
    ~600 at sigma 158), which would hide whether the two wrappers feed the network the same input."""
    reference = reference_module()
    net, alpha_bar = reference.load_coursework(str(CHECKPOINT))
    denoiser = reference.DiscreteEpsDenoiser(net, alpha_bar)
    model = patcher.model
    sigmas = model.model_sampling.sigmas
    generator = torch.Generator().manual_seed(seed)
    result = {}
    with torch.no_grad():
        for index in sigma_indices:
            sigma = sigmas[index].expand(batch)
            x = torch.randn(batch, *LATENT_SHAPE, generator=generator) * sigma[0]
            host_eps = (x - model.apply_model(x, sigma)) / sigma[0]
            reference_eps = (x - denoiser(x, sigma)) / sigma[0]
            result[float(sigma[0])] = (host_eps - reference_eps).abs().max().item()
    return result


if __name__ == "__main__":
    import sys
    pack_dir = Path(__file__).resolve().parent.parent
    sys.path.insert(0, str(pack_dir / ".host" / "ComfyUI"))
    from comfy.cli_args import args
    args.cpu = True
    patcher = load_ddpm_model()
    print(f"max |host alphas_cumprod - checkpoint alpha_t[1:]| = {schedule_check(patcher):.3g}")
    for sigma, diff in reference_check(patcher).items():
        print(f"sigma {sigma:9.4f}: max |host eps - reference eps| = {diff:.3g}")
