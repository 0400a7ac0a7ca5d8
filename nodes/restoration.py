"""Restoration with a diffusion model as the prior: degradation operators, test measurements, the pseudo-inverse
start (CCDF / baseline) and guided samplers (DDNM+, RePaint resampling) for SamplerCustom / SamplerCustomAdvanced.

Operators act on the sampler's state space: exact for pixel-space models (the embedded digit model, whose latent is
the image).  For latent models they act on the latent itself (a latent mask, a latent block average), which is the
spec's cheap "latent-space operator" level, not the pixel operator through the VAE.

CCDF in a graph: Degrade Image (or Pseudo-inverse Estimate) -> its pseudo-inverse LATENT as the latent_image of
SamplerCustom, BasicScheduler with denoise = t0 (e.g. 0.3), and the Restoration Sampler: the host forward-diffuses
the estimate to the first sigma and the sampler runs the few remaining steps with data consistency.
"""
import torch

from comfy_api.latest import io

from .common import CATEGORY, QuickstepInputError, require_choice, require_finite
from ..samplers import guidance, operators

RESTORATION_CATEGORY = f"{CATEGORY}/restoration"
Operator = io.Custom("QUICKSTEP_OPERATOR")
KINDS = ("super_resolution", "inpaint_box", "inpaint_random", "inpaint_mask", "gaussian_blur", "grayscale")
SIDES = ("bottom", "top", "left", "right", "center")


def _samples(node, name, latent):
    if not isinstance(latent, dict) or not torch.is_tensor(latent.get("samples")):
        raise QuickstepInputError(node, f"{name} must be a LATENT with a 'samples' tensor")
    samples = latent["samples"]
    if samples.dim() != 4:
        raise QuickstepInputError(node, f"{name} has shape {tuple(samples.shape)}; only image latents "
                                        "[B, C, H, W] are supported (no video latents)")
    if not torch.isfinite(samples).all():
        raise QuickstepInputError(node, f"{name} holds NaN or inf values")
    return samples


class QuickstepDegradationOperator(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="QuickstepDegradationOperator", display_name="Degradation Operator", category=RESTORATION_CATEGORY,
            description="A linear degradation A (with adjoint and pseudo-inverse) and its measurement noise level: "
                        "what the restoration sampler inverts. Acts on the latent itself (exact for pixel-space "
                        "models such as the digit model).",
            inputs=[io.Combo.Input("kind", options=list(KINDS), default="super_resolution",
                                   tooltip="super_resolution: average-pool downsampling; inpaint_*: keep only the "
                                           "known pixels; gaussian_blur: circular Gaussian blur; grayscale: channel "
                                           "mean (colorization)."),
                    io.Combo.Input("factor", options=["2", "4", "8"], default="4",
                                   tooltip="Downsampling factor (super_resolution)."),
                    io.Float.Input("sigma_y", default=0.0, min=0.0, max=10.0, step=0.01,
                                   tooltip="Std of the measurement noise in latent units (the digit latent spans "
                                           "[-1, 1]); DDNM+ uses it to avoid fitting the noise."),
                    io.Float.Input("fraction", default=0.5, min=0.0, max=1.0, step=0.05,
                                   tooltip="Fraction of the image that is unknown (inpaint_box, inpaint_random)."),
                    io.Combo.Input("side", options=list(SIDES), default="bottom",
                                   tooltip="Where the unknown box lies (inpaint_box)."),
                    io.Int.Input("width", default=32, min=8, max=16384,
                                 tooltip="Latent width of generated masks (inpaint_box, inpaint_random)."),
                    io.Int.Input("height", default=32, min=8, max=16384,
                                 tooltip="Latent height of generated masks (inpaint_box, inpaint_random)."),
                    io.Int.Input("mask_seed", default=0, min=0, max=2 ** 31 - 1,
                                 tooltip="Seed of the random pixel mask (inpaint_random)."),
                    io.Int.Input("kernel_size", default=9, min=3, max=63, step=2,
                                 tooltip="Odd size of the Gaussian kernel (gaussian_blur)."),
                    io.Float.Input("blur_sigma", default=2.0, min=0.1, max=20.0, step=0.1,
                                   tooltip="Std of the Gaussian kernel in pixels (gaussian_blur)."),
                    io.Int.Input("channels", default=1, min=1, max=64,
                                 tooltip="Channel count of the latent (grayscale)."),
                    io.Mask.Input("mask", optional=True,
                                  tooltip="inpaint_mask: 1 = pixel to fill in, 0 = known (ComfyUI's convention); "
                                          "must have the latent's height and width (it is not resized).")],
            outputs=[Operator.Output(display_name="operator")])

    @classmethod
    def execute(cls, kind, factor, sigma_y, fraction, side, width, height, mask_seed, kernel_size, blur_sigma,
                channels, mask=None):
        label = "Degradation Operator"
        require_choice(label, "kind", kind, KINDS)
        require_finite(label, "sigma_y", sigma_y, 0.0, 10.0)
        require_finite(label, "fraction", fraction, 0.0, 1.0)
        require_finite(label, "blur_sigma", blur_sigma, 0.1, 20.0)
        try:
            if kind == "super_resolution":
                require_choice(label, "factor", factor, ("2", "4", "8"))
                op = operators.Downsample(int(factor), sigma_y)
            elif kind == "inpaint_box":
                require_choice(label, "side", side, SIDES)
                op = operators.Inpaint(operators.box_mask(height, width, fraction, side), sigma_y)
            elif kind == "inpaint_random":
                op = operators.Inpaint(operators.random_mask(height, width, fraction, mask_seed), sigma_y)
            elif kind == "inpaint_mask":
                if mask is None:
                    raise QuickstepInputError(label, "kind = 'inpaint_mask' needs the mask input connected")
                op = operators.Inpaint(1.0 - mask.float(), sigma_y)
            elif kind == "gaussian_blur":
                if kernel_size % 2 == 0:
                    raise QuickstepInputError(label, f"kernel_size = {kernel_size} must be odd")
                op = operators.GaussianBlur(kernel_size, blur_sigma, sigma_y)
            else:
                op = operators.Grayscale(channels, sigma_y)
        except operators.OperatorError as error:
            raise QuickstepInputError(label, str(error)) from None
        return io.NodeOutput(op)


class QuickstepDegrade(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="QuickstepDegrade", display_name="Degrade Image", category=RESTORATION_CATEGORY,
            description="Makes a test measurement y = A x + sigma_y z from a clean latent, and its pseudo-inverse "
                        "restoration A+ y (the baseline, and the CCDF start).",
            inputs=[Operator.Input("operator", tooltip="The degradation from a Degradation Operator node."),
                    io.Latent.Input("samples", tooltip="The clean latent to degrade (for the digit model: the image)."),
                    io.Int.Input("seed", default=0, min=0, max=2 ** 31 - 1,
                                 tooltip="Seed of the measurement noise (when sigma_y > 0).")],
            outputs=[io.Latent.Output(display_name="measurement"),
                     io.Latent.Output(display_name="pseudo_inverse")])

    @classmethod
    def execute(cls, operator, samples, seed):
        label = "Degrade Image"
        x = _samples(label, "samples", samples)
        try:
            operator.check_image(tuple(x.shape))
            y = operators.add_noise(operator.forward(x.float()), operator.sigma_y, seed)
            estimate = operator.pinv(y)
        except operators.OperatorError as error:
            raise QuickstepInputError(label, str(error)) from None
        return io.NodeOutput({"samples": y}, {"samples": estimate})


class QuickstepPseudoInverse(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="QuickstepPseudoInverse", display_name="Pseudo-inverse Estimate", category=RESTORATION_CATEGORY,
            description="A+ y: the pseudo-inverse restoration of a measurement (nearest upsampling for SR, the known "
                        "pixels for inpainting). The baseline, and the CCDF start latent (with denoise = t0).",
            inputs=[Operator.Input("operator", tooltip="The degradation the measurement went through."),
                    io.Latent.Input("measurement", tooltip="The measured (degraded) latent y.")],
            outputs=[io.Latent.Output(display_name="estimate")])

    @classmethod
    def execute(cls, operator, measurement):
        label = "Pseudo-inverse Estimate"
        y = _samples(label, "measurement", measurement)
        try:
            return io.NodeOutput({"samples": operator.pinv(y.float())})
        except operators.OperatorError as error:
            raise QuickstepInputError(label, str(error)) from None


def _guarded(label, fn):
    """The sampler with its options checked and operator/measurement mismatches reported under `label`."""
    from .samplers import checked
    inner = checked(label, fn)

    def sampler(model, x, sigmas, extra_args=None, callback=None, disable=None, **options):
        try:
            return inner(model, x, sigmas, extra_args=extra_args, callback=callback, disable=disable, **options)
        except operators.OperatorError as error:
            raise QuickstepInputError(label, str(error)) from None
        except guidance.GuidanceDiverged as error:
            raise QuickstepInputError(label, str(error)) from None
    return sampler


class QuickstepRestorationSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="QuickstepRestorationSampler", display_name="Restoration Sampler", category=RESTORATION_CATEGORY,
            description="A SAMPLER that restores a measurement with the model as the prior: DDNM+ (range/null-space "
                        "replacement of the denoised estimate, noise-aware) or RePaint (projection of the noisy "
                        "state onto the noised measurement, with resampling). No gradient through the model: one "
                        "model call per step (times resample_count). Use with SamplerCustom; for CCDF give the "
                        "pseudo-inverse latent as latent_image and a scheduler with denoise < 1.",
            inputs=[Operator.Input("operator", tooltip="The degradation the measurement went through."),
                    io.Latent.Input("measurement", tooltip="The measured (degraded) latent y."),
                    io.Combo.Input("method", options=list(guidance.METHODS), default="ddnm",
                                   tooltip="ddnm: DDNM+ on the denoised estimate (all operators); repaint: RePaint "
                                           "blend of the noised measurement into the state (best for inpainting)."),
                    io.Float.Input("eta", default=0.85, min=0.0, max=1.0, step=0.05,
                                   tooltip="Fresh-noise share of each step (0: DDIM, 1: ancestral/DDPM)."),
                    io.Int.Input("jump_length", default=1, min=1, max=1000,
                                 tooltip="Steps between time-travel back-jumps (RePaint's j)."),
                    io.Int.Input("resample_count", default=1, min=1, max=100,
                                 tooltip="How many times each block of jump_length steps is run (RePaint's r; "
                                         "1 = no resampling). Multiplies the model calls.")],
            outputs=[io.Sampler.Output()])

    @classmethod
    def execute(cls, operator, measurement, method, eta, jump_length, resample_count):
        import comfy.samplers
        label = "Restoration Sampler"
        require_choice(label, "method", method, guidance.METHODS)
        require_finite(label, "eta", eta, 0.0, 1.0)
        y = _samples(label, "measurement", measurement).float()
        options = dict(operator=operator, measurement=y, method=method, eta=float(eta), jump_length=jump_length,
                       resample_count=resample_count)
        try:
            guidance.validate(**options)
        except ValueError as error:
            raise QuickstepInputError(label, str(error)) from None
        return io.NodeOutput(comfy.samplers.KSAMPLER(_guarded(label, guidance.sample_restoration),
                                                     extra_options=options))


NODES = [QuickstepDegradationOperator, QuickstepDegrade, QuickstepPseudoInverse, QuickstepRestorationSampler]
