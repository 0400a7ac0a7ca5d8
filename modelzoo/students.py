"""One-step and few-step students of the embedded digit model, and the sampling both the distillation script and the
benchmark use for teacher and students alike.

The consistency student has the teacher's architecture and format (a flow-prediction host UNet in a safetensors file
with the digit table), so it loads through the same node and samplers as the teacher. It is trained to be the
teacher's consistency function: from any point x_t of a teacher PF-ODE trajectory (DPM-Solver++(2M), 20 steps, CFG
baked in) it predicts that trajectory's end. One step from sigma = 1 is then a sample; more steps re-noise the
estimate (consistency multistep sampling, the TCD sampler at gamma 1).

Imports comfy: only import this inside a running host (nodes, scripts, benchmarks).
"""
from pathlib import Path

import torch

from . import mnist_unet

STUDENTS = {"consistency": "mnist_student_consistency.safetensors", "dsno": "mnist_student_dsno.safetensors"}
TEACHER_PREDICTION = "flow"
TEACHER_STEPS = 20
TEACHER_CFG = 2.0


def student_path(name):
    if name not in STUDENTS:
        raise ValueError(f"student must be one of {', '.join(STUDENTS)}, got {name!r}")
    return Path(__file__).resolve().parent / "weights" / STUDENTS[name]


class GuidedDenoiser:
    """D(x, sigma) of a digit model with CFG against the null digit, called the k-diffusion way (x, sigma[B])."""

    def __init__(self, model, digits, cfg):
        self.model, self.cfg = model, cfg
        self.positive = mnist_unet.digit_context(digits)
        self.negative = mnist_unet.digit_context([mnist_unet.NULL_DIGIT] * len(digits))

    def __call__(self, x, sigma, **_sampler_extras):
        if self.cfg == 1.0:
            return self.model.apply_model(x, sigma, c_crossattn=self.positive)
        both = self.model.apply_model(torch.cat([x, x]), torch.cat([sigma, sigma]),
                                      c_crossattn=torch.cat([self.positive, self.negative]))
        cond, uncond = both.chunk(2)
        return uncond + self.cfg * (cond - uncond)


def flow_sigmas(model, steps):
    import comfy.samplers
    return comfy.samplers.calculate_sigmas(model.model_sampling, "simple", steps).float().cpu()


def start_noise(count, seed):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(count, 1, mnist_unet.IMAGE_SIZE, mnist_unet.IMAGE_SIZE, generator=generator)


@torch.no_grad()
def sample(model, digits, sigmas, cfg, seed, sampler, states=None, **options):
    """Digits from noise of `seed` at sigmas[0] = 1 (flow) with a k-diffusion `sampler` function (samplers/).
    `states` (a list) collects the state entering every step and the result."""
    denoise = GuidedDenoiser(model, digits, cfg)
    x = start_noise(len(digits), seed) * float(sigmas[0])
    record = None if states is None else (lambda info: states.append(info["x"].clone()))
    out = sampler(denoise, x, sigmas, {"seed": seed}, callback=record, disable=True, **options)
    if states is not None:
        states.append(out.clone())
    return out


# ------------------------------------------------------------------------------------------------------- DSNO-style
DSNO_TIMES = 4            # trajectory points produced in one call: the teacher's states at sigma 0.75, 0.5, 0.25, 0
DSNO_MODES = 2            # Fourier modes kept along the time axis (the reference uses 2 for 4 outputs)


class TemporalSpectralConv(torch.nn.Module):
    """DSNO's temporal layer: features [B*T, C, H, W] viewed as [B, T, C, H, W], an rFFT along T, a learned complex
    C x C mixing of the lowest `modes` frequencies, the inverse rFFT, LeakyReLU, added back (zero-initialised, so
    the student starts as its backbone)."""

    def __init__(self, channels, times=DSNO_TIMES, modes=DSNO_MODES):
        super().__init__()
        self.times, self.modes = times, modes
        self.weight = torch.nn.Parameter(torch.zeros(modes, channels, channels, 2))

    def forward(self, h):
        b_t, c, height, width = h.shape
        x = h.float().reshape(b_t // self.times, self.times, c, height, width)
        spectrum = torch.fft.rfft(x, dim=1)
        mixed = torch.zeros_like(spectrum)
        weight = torch.view_as_complex(self.weight)
        mixed[:, :self.modes] = torch.einsum("btchw,tcd->btdhw", spectrum[:, :self.modes], weight)
        out = torch.fft.irfft(mixed, n=self.times, dim=1).reshape(b_t, c, height, width)
        return h + torch.nn.functional.leaky_relu(out).to(h.dtype)


class DSNONetwork(torch.nn.Module):
    """Stands where the UNet stands in a host BaseModel: one call from sigma = 1 returns the flow velocity that lands
    on the end of the predicted trajectory. Inside, the host UNet (the teacher's architecture) runs once on
    DSNO_TIMES copies of the input, each with the time embedding of its output time, and a temporal layer mixes the
    copies before every output block (through the UNet's own output_block_patch, so its forward is the host's).
    One step only: the input is taken to be the start noise whatever sigma it comes with."""

    def __init__(self, output_sigmas=(0.75, 0.5, 0.25, 0.0), **unet_config):
        super().__init__()
        from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
        self.unet = UNetModel(**unet_config)
        self.dtype = self.unet.dtype
        self.register_buffer("output_sigmas", torch.tensor(output_sigmas, dtype=torch.float32))
        channels = self._output_block_channels(unet_config)
        self.temporal = torch.nn.ModuleList(TemporalSpectralConv(c) for c in channels)

    def _output_block_channels(self, unet_config):
        seen = []
        probe = lambda h, hsp, options: (seen.append(h.shape[1]) or h, hsp)   # noqa: E731
        size = unet_config.get("image_size", 32)
        with torch.no_grad():
            self.unet(torch.zeros(1, unet_config["in_channels"], size, size), torch.zeros(1),
                      context=torch.zeros(1, 1, unet_config["context_dim"]),
                      transformer_options={"patches": {"output_block_patch": [probe]}})
        return seen

    def _mix(self, h, hsp, transformer_options):
        return self.temporal[transformer_options["block"][1]](h), hsp

    def trajectory(self, x, context, transformer_options=None):
        """[B, T, ...] predicted states at output_sigmas from start noise x (flow: x_t = x - (1 - t) v_t)."""
        times = len(self.output_sigmas)
        options = dict(transformer_options or {})
        patches = dict(options.get("patches", {}))
        patches["output_block_patch"] = patches.get("output_block_patch", []) + [self._mix]
        options["patches"] = patches
        sigmas = self.output_sigmas.to(x.device)
        velocity = self.unet(x.repeat_interleave(times, 0), (sigmas * 1000.0).repeat(x.shape[0]),
                             context=context.repeat_interleave(times, 0), transformer_options=options)
        velocity = velocity.reshape(x.shape[0], times, *x.shape[1:])
        return x.unsqueeze(1) - (1.0 - sigmas).reshape(1, times, *[1] * (x.dim() - 1)) * velocity

    def forward(self, x, timesteps, context=None, transformer_options={}, **kwargs):
        end = self.trajectory(x, context, transformer_options)[:, -1]
        return x - end                               # calculate_denoised at sigma 1: x - 1 * v = end


def build_dsno_model(prediction=TEACHER_PREDICTION, device=None, dtype=torch.float32, manual_cast_dtype=None):
    """A flow BaseModel whose network is a DSNONetwork of the digit UNet's configuration (weights uninitialised)."""
    import comfy.model_base
    config = mnist_unet.model_config(prediction)
    config.set_inference_dtype(dtype, manual_cast_dtype)
    return comfy.model_base.BaseModel(config, model_type=comfy.model_base.ModelType.FLOW, device=device,
                                      unet_model=DSNONetwork)


def load_student(name):
    """A host ModelPatcher around the shipped student `name` (safetensors only)."""
    build = build_dsno_model if name == "dsno" else mnist_unet.build_base_model
    return mnist_unet.load_mnist_model(student_path(name), prediction=TEACHER_PREDICTION, build=build)
