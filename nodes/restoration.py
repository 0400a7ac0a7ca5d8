"""Restoration with a diffusion model as the prior: degradation operators, test measurements, the pseudo-inverse
start (CCDF / baseline) and guided samplers (DDNM+, DiffPIR, RePaint resampling, PiGDM, DPS, RED-diff) for
SamplerCustom / SamplerCustomAdvanced.

Without a VAE, operators act on the sampler's state space: exact for pixel-space models (the embedded digit model,
whose latent is the image); for latent models that is the spec's cheap "latent-space operator" level (a latent mask, a
latent block average).  With a VAE connected (PiGDM, DPS, RED-diff only) the operator acts on the decoded image and
the measurement is an IMAGE: the gradient goes through the decoder (a TAESD VAE from VAELoader is the fast option).

CCDF in a graph: Degrade Image (or Pseudo-inverse Estimate) -> its pseudo-inverse LATENT as the latent_image of
SamplerCustom, BasicScheduler with denoise = t0 (e.g. 0.3), and the Restoration Sampler: the host forward-diffuses
the estimate to the first sigma and the sampler runs the few remaining steps with data consistency.
"""
import logging
import math

import torch

from comfy_api.latest import io

from .common import CATEGORY, QuickstepInputError, require_choice, require_finite
from ..samplers import guidance, operators

RESTORATION_CATEGORY = f"{CATEGORY}/restoration"
Operator = io.Custom("QUICKSTEP_OPERATOR")
KINDS = ("super_resolution", "inpaint_box", "inpaint_random", "inpaint_mask", "gaussian_blur", "motion_blur",
         "kernel_blur", "grayscale", "jpeg")
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
                                           "known pixels; gaussian_blur / motion_blur / kernel_blur (the kernel "
                                           "input): circular blur; grayscale: channel mean (colorization); jpeg: "
                                           "differentiable JPEG (no pseudo-inverse: DPS and RED-diff only)."),
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
                    io.Float.Input("angle", default=30.0, min=-360.0, max=360.0, step=1.0,
                                   tooltip="Direction of the motion streak in degrees (motion_blur; its length is "
                                           "kernel_size)."),
                    io.Float.Input("direction", default=0.0, min=-1.0, max=1.0, step=0.1,
                                   tooltip="Weighting along the streak: 0 uniform, -1 / 1 heavier at one end "
                                           "(motion_blur)."),
                    io.Int.Input("jpeg_quality", default=30, min=1, max=100,
                                 tooltip="JPEG quality (jpeg)."),
                    io.Int.Input("channels", default=1, min=1, max=64,
                                 tooltip="Channel count of the image the operator acts on (grayscale)."),
                    io.Mask.Input("mask", optional=True,
                                  tooltip="inpaint_mask: 1 = pixel to fill in, 0 = known (ComfyUI's convention); "
                                          "must have the operated image's height and width (it is not resized: "
                                          "a size mismatch is refused with both sizes named)."),
                    io.Image.Input("kernel", optional=True,
                                   tooltip="kernel_blur: the blur kernel as an image (odd square size, channels "
                                           "averaged, normalised to sum 1).")],
            outputs=[Operator.Output(display_name="operator")])

    @classmethod
    def execute(cls, kind, factor, sigma_y, fraction, side, width, height, mask_seed, kernel_size, blur_sigma,
                angle, direction, jpeg_quality, channels, mask=None, kernel=None):
        label = "Degradation Operator"
        require_choice(label, "kind", kind, KINDS)
        require_finite(label, "sigma_y", sigma_y, 0.0, 10.0)
        require_finite(label, "fraction", fraction, 0.0, 1.0)
        require_finite(label, "blur_sigma", blur_sigma, 0.1, 20.0)
        require_finite(label, "angle", angle, -360.0, 360.0)
        require_finite(label, "direction", direction, -1.0, 1.0)
        # every choice is checked whatever the kind: a wrong value in an unused input is still a broken workflow
        require_choice(label, "factor", factor, ("2", "4", "8"))
        require_choice(label, "side", side, SIDES)
        try:
            if kind == "super_resolution":
                op = operators.Downsample(int(factor), sigma_y)
            elif kind == "inpaint_box":
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
            elif kind == "motion_blur":
                if kernel_size % 2 == 0:
                    raise QuickstepInputError(label, f"kernel_size = {kernel_size} must be odd")
                op = operators.MotionBlur(kernel_size, angle, direction, sigma_y)
            elif kind == "kernel_blur":
                if kernel is None:
                    raise QuickstepInputError(label, "kind = 'kernel_blur' needs the kernel input connected")
                op = operators.Blur(kernel[0].float().mean(dim=-1), sigma_y)
            elif kind == "jpeg":
                op = operators.JPEG(jpeg_quality, sigma_y)
            else:
                op = operators.Grayscale(channels, sigma_y)
        except operators.OperatorError as error:
            raise QuickstepInputError(label, str(error)) from None
        return io.NodeOutput(op)


def _degrade_inputs(clean_input):
    return [Operator.Input("operator", tooltip="The degradation from a Degradation Operator node."), clean_input,
            io.Int.Input("seed", default=0, min=0, max=2 ** 31 - 1,
                         tooltip="Seed of the measurement noise (when sigma_y > 0).")]


def _degrade(label, operator, x, seed):
    """(y = A x + sigma_y z, the pseudo-inverse estimate, or y itself for an operator without one)."""
    try:
        operator.check_image(tuple(x.shape))
        y = operators.add_noise(operator.forward(x), operator.sigma_y, seed)
        return y, (operator.pinv(y) if operator.has_pinv else y)
    except operators.OperatorError as error:
        raise QuickstepInputError(label, str(error)) from None


class QuickstepDegrade(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="QuickstepDegrade", display_name="Degrade Image", category=RESTORATION_CATEGORY,
            description="Makes a test measurement y = A x + sigma_y z from a clean latent, and its pseudo-inverse "
                        "restoration A+ y (the baseline, and the CCDF start; JPEG, which has none, gives y itself).",
            inputs=_degrade_inputs(io.Latent.Input("samples", tooltip="The clean latent to degrade (for the digit "
                                                                      "model: the image).")),
            outputs=[io.Latent.Output(display_name="measurement"),
                     io.Latent.Output(display_name="pseudo_inverse")])

    @classmethod
    def execute(cls, operator, samples, seed):
        label = "Degrade Image"
        y, estimate = _degrade(label, operator, _samples(label, "samples", samples).float(), seed)
        return io.NodeOutput({"samples": y}, {"samples": estimate})


class QuickstepDegradePixels(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="QuickstepDegradePixels", display_name="Degrade Pixels", category=RESTORATION_CATEGORY,
            description="Makes a test measurement y = A x + sigma_y z from a clean IMAGE (the operator acts on pixels "
                        "in [-1, 1]), for the Restoration Sampler with a VAE; also its pseudo-inverse image (the "
                        "baseline; VAE-encode it for a CCDF start). Operators without a pseudo-inverse (JPEG) give "
                        "the measurement itself there.",
            inputs=_degrade_inputs(io.Image.Input("image", tooltip="The clean image to degrade.")),
            outputs=[io.Image.Output(display_name="measurement"),
                     io.Image.Output(display_name="pseudo_inverse")])

    @classmethod
    def execute(cls, operator, image, seed):
        label = "Degrade Pixels"
        if not torch.is_tensor(image) or image.dim() != 4 or not torch.isfinite(image).all():
            raise QuickstepInputError(label, "image must be a finite IMAGE [B, H, W, C]")
        y, estimate = _degrade(label, operator, image.float().movedim(-1, 1) * 2 - 1, seed)
        return io.NodeOutput(((y + 1) / 2).movedim(1, -1), ((estimate + 1) / 2).clamp(0, 1).movedim(1, -1))


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


def _load_with_vae(model, vae, x):
    """Loads the VAE together with the models the host loaded for this run (the diffusion model, ControlNets...),
    with the host's own memory estimate for the batch, as comfy.sampler_helpers.prepare_sampling does: on low VRAM
    the host then splits the memory between them, where loading the VAE alone would evict the diffusion model's
    weights in the middle of the run. Runs before the first model call."""
    import comfy.model_management
    import comfy.sampler_helpers
    guider = getattr(model, "inner_model", None)
    patcher = getattr(guider, "model_patcher", None)
    if patcher is None:
        comfy.model_management.load_models_gpu([vae.patcher])
        return
    required, minimum = comfy.sampler_helpers.estimate_memory(patcher, x.shape, guider.conds)
    comfy.model_management.load_models_gpu([patcher, *getattr(guider, "loaded_models", []), vae.patcher],
                                           memory_required=required, minimum_memory_required=minimum)


def _decoder_for(vae, model):
    """Dec(z) for a sampler state z (the model's processed latent): the VAE's own decoder module, differentiable,
    images in [-1, 1] as [B, C, H, W] (its weights made usable by autograd by the caller: guidance.autograd_weights)."""
    base_model = guidance.host_module(model)

    def decode(z):
        latent = base_model.process_latent_out(z) if base_model is not None else z
        pixels = vae.first_stage_model.decode(latent.to(device=vae.device, dtype=vae.vae_dtype))
        return pixels.float().to(z.device)
    return decode


def _guarded(label, fn, vae=None):
    """The sampler with its options checked and operator/measurement mismatches reported under `label`; with a VAE,
    the decoder is built from the sampling model (its latent format) when sampling starts."""
    from .samplers import checked
    inner = checked(label, fn)

    def sampler(model, x, sigmas, extra_args=None, callback=None, disable=None, **options):
        try:
            if vae is None:
                return inner(model, x, sigmas, extra_args=extra_args, callback=callback, disable=disable, **options)
            _load_with_vae(model, vae, x)
            options["decoder"] = _decoder_for(vae, model)
            with guidance.autograd_weights(vae.first_stage_model):
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
            description="A SAMPLER that restores a measurement with the model as the prior. ddnm: DDNM+ "
                        "(range/null-space replacement, noise-aware); diffpir: DiffPIR (closed-form data proximal step "
                        "on each denoised estimate, weighted by diffpir_lambda, then a step mixing diffpir_zeta of "
                        "fresh noise); repaint: projection of the noisy state onto the "
                        "noised measurement, with resampling; pigdm: PiGDM (pseudo-inverse guidance through the "
                        "model's Jacobian); dps: DPS (gradient of the measurement error through the model; works for "
                        "JPEG); reddiff: RED-diff (Adam on the image with the model as a regulariser). Per step: "
                        "ddnm / diffpir / repaint / reddiff one model call without a model gradient; pigdm / dps one "
                        "model call plus one backward pass (about 3x the time, activations of one step in memory). "
                        "Use with SamplerCustom; for CCDF give the pseudo-inverse latent as latent_image and a "
                        "scheduler with denoise < 1. NaN/inf during sampling stops the run with an error naming the "
                        "step.",
            inputs=[Operator.Input("operator", tooltip="The degradation the measurement went through."),
                    io.Latent.Input("measurement", optional=True,
                                    tooltip="The measured (degraded) latent y (operator on the latent: no VAE)."),
                    io.Combo.Input("method", options=list(guidance.METHODS), default="ddnm",
                                   tooltip="ddnm / diffpir / repaint / pigdm need the operator's pseudo-inverse; dps "
                                           "and reddiff accept any operator (JPEG too); with a VAE: pigdm, dps, "
                                           "reddiff."),
                    io.Float.Input("eta", default=0.85, min=0.0, max=1.0, step=0.05,
                                   tooltip="Fresh-noise share of each step (0: DDIM, 1: ancestral/DDPM); not used "
                                           "by diffpir (see diffpir_zeta) or reddiff."),
                    io.Int.Input("jump_length", default=1, min=1, max=1000,
                                 tooltip="Steps between time-travel back-jumps (RePaint's j; not reddiff)."),
                    io.Int.Input("resample_count", default=1, min=1, max=100,
                                 tooltip="How many times each block of jump_length steps is run (RePaint's r; "
                                         "1 = no resampling). Multiplies the model calls."),
                    io.Float.Input("strength", default=1.0, min=0.0, max=1000.0, step=0.05,
                                   tooltip="Multiplies the method's own guidance strength (DPS zeta, PiGDM weight, "
                                           "RED-diff lambda); ddnm and repaint ignore it. Too large diverges: the run "
                                           "then stops with an error."),
                    io.Float.Input("learning_rate", default=guidance.REDDIFF_LR, min=0.001, max=10.0, step=0.01,
                                   tooltip="Adam learning rate of RED-diff (image units per iteration)."),
                    io.Float.Input("diffpir_lambda", default=guidance.DIFFPIR_LAMBDA, min=0.001, max=1e6, step=0.05,
                                   optional=True,
                                   tooltip="DiffPIR's lambda: the prior's weight against the measurement in the data "
                                           "step (rho = lambda sigma_y^2 / sigma_t^2; with sigma_y = 0 the step is a "
                                           "projection and lambda has no effect). 0.25 is the paper's lambda = 1, "
                                           "whose code measures sigma_y on [0, 1] images."),
                    io.Float.Input("diffpir_zeta", default=guidance.DIFFPIR_ZETA, min=0.0, max=1.0, step=0.05,
                                   optional=True,
                                   tooltip="DiffPIR's zeta: fresh-noise share of each step (0: deterministic, 1: "
                                           "all fresh noise)."),
                    io.Image.Input("measurement_image", optional=True,
                                   tooltip="The measured IMAGE y when a VAE is connected (operator on pixels)."),
                    io.Vae.Input("vae", optional=True,
                                 tooltip="Decoder for pixel operators on latent models (pigdm, dps, reddiff): the "
                                         "gradient goes through it. A TAESD VAE (VAELoader taesd / taesdxl / "
                                         "taef1) is the fast approximate option.")],
            outputs=[io.Sampler.Output()])

    @classmethod
    def execute(cls, operator, method, eta, jump_length, resample_count, strength, learning_rate, measurement=None,
                measurement_image=None, vae=None, diffpir_lambda=guidance.DIFFPIR_LAMBDA,
                diffpir_zeta=guidance.DIFFPIR_ZETA):
        import comfy.samplers
        label = "Restoration Sampler"
        require_choice(label, "method", method, guidance.METHODS)
        require_finite(label, "eta", eta, 0.0, 1.0)
        require_finite(label, "strength", strength, 0.0, 1000.0)
        require_finite(label, "learning_rate", learning_rate, 0.001, 10.0)
        require_finite(label, "diffpir_lambda", diffpir_lambda, 0.001, 1e6)
        require_finite(label, "diffpir_zeta", diffpir_zeta, 0.0, 1.0)
        if vae is not None:
            if method not in guidance.ACCEPTS_DECODER:
                raise QuickstepInputError(label, f"method = '{method}' works on the latent and cannot use a VAE; "
                                                 f"use one of {', '.join(guidance.ACCEPTS_DECODER)}, or disconnect vae")
            if measurement_image is None:
                raise QuickstepInputError(label, "with a VAE the operator acts on pixels: connect measurement_image "
                                                 "(the measured IMAGE)")
            if not torch.isfinite(measurement_image).all():
                raise QuickstepInputError(label, "measurement_image holds NaN or inf values")
            y = measurement_image.float().movedim(-1, 1) * 2 - 1
        else:
            if measurement is None:
                raise QuickstepInputError(label, "connect measurement (a LATENT); a measurement_image needs a VAE "
                                                 f"and method pigdm, dps or reddiff (method is '{method}')")
            y = _samples(label, "measurement", measurement).float()
        options = dict(operator=operator, measurement=y, method=method, eta=float(eta), jump_length=jump_length,
                       resample_count=resample_count, strength=float(strength), learning_rate=float(learning_rate),
                       diffpir_lambda=float(diffpir_lambda), diffpir_zeta=float(diffpir_zeta))
        try:
            guidance.validate(**options)
        except ValueError as error:
            raise QuickstepInputError(label, str(error)) from None
        return io.NodeOutput(comfy.samplers.KSAMPLER(_guarded(label, guidance.sample_restoration, vae),
                                                     extra_options=options))




RESTORE_TASKS = ("super_resolution_x2", "super_resolution_x4", "inpaint", "deblur", "colorize")
# Method and settings per task, chosen on tuning digits (bench/restoration_host.py; README "Restoration") at 30
# model calls on a schedule of the model's whole range (SCHEDULER / VAE_SCHEDULER below): without a VAE (the
# operator on the state itself) DiffPIR with all-fresh noise (zeta 1) was best on x2 / x4 SR, inpainting and noisy
# deblurring; through a VAE's decoder only the gradient-free-in-the-model DAPS qualifies (DiffPIR's data step needs
# the operator on the state).
# `particles` chains share the calls and are averaged (the posterior mean, what PSNR rewards): 2 won on x2 / x4 SR
# and, for DAPS on the latent digit models, on x4 SR; 1 on deblurring. Inpainting depends on the hole: averaging
# won on a half-image box (2 chains for DiffPIR, 4 for DAPS) and lost on random pixels and thin strokes, whose
# posterior is narrow, so FAR_HOLE_PARTICLES applies only where a hole pixel lies farther than FAR_HOLE of the
# image's smaller side from every known pixel.
DIFFPIR_FRESH = dict(method="diffpir", diffpir_zeta=1.0)
DAPS_DEFAULT = dict(method="daps", daps_prior_std=1.0, daps_tau=0.01)
RESTORE_DEFAULTS = {"super_resolution_x2": dict(DIFFPIR_FRESH, particles=2),
                    "super_resolution_x4": dict(DIFFPIR_FRESH, particles=2),
                    "inpaint": DIFFPIR_FRESH, "deblur": DIFFPIR_FRESH, "colorize": DIFFPIR_FRESH}  # colorize: not measured
VAE_DEFAULTS = dict({task: DAPS_DEFAULT for task in RESTORE_TASKS},                    # x2 SR, colorize: not measured
                    super_resolution_x4=dict(DAPS_DEFAULT, particles=2))
# The schedule of the model's whole range: karras without a VAE; through a VAE DAPS on the host's 'simple' schedule,
# chosen when it was the better of the two on the tuning digits of four real-latent tasks by +0.29 dB on average
# (best setting of each: SDXL / TAESDXL x4 SR 17.32 vs 16.82 dB, SD3 / TAESD3 box 15.12 vs 14.28, Flux / TAEF1 box
# 14.51 each, SD3 / TAESD3 x4 SR 18.06 vs 18.23); two tasks measured after that went to karras (SDXL box 13.88 vs
# 14.25, SD3 deblurring 20.88 vs 21.29); of five more, four went to simple (SDXL deblurring 19.50 vs 19.39, Flux x4
# SR 19.36 vs 18.15, Flux deblurring 21.05 vs 20.72, SD1.5 x4 SR 19.45 vs 19.38) and one to karras (SD1.5 box 17.02
# vs 17.43); SD1.5 deblurring went to karras too (19.94 vs 20.40): over twelve, simple by 0.10 dB, inside the noise.
SCHEDULER, VAE_SCHEDULER = "karras", "simple"
FAR_HOLE = 1 / 8
FAR_HOLE_PARTICLES = {"diffpir": 2, "daps": 4}


def has_far_hole(keep):
    """Whether some unknown pixel of the mask `keep` [B, 1, H, W] (1 = known) is more than FAR_HOLE of the smaller
    side (Chebyshev distance) from every known pixel: content to invent rather than interpolate."""
    radius = max(1, int(FAR_HOLE * min(keep.shape[-2:])))
    near_known = torch.nn.functional.max_pool2d(keep, 2 * radius + 1, stride=1, padding=radius)
    return bool(((keep < 0.5) & (near_known < 0.5)).any())


def _vae_compression(vae):
    """Pixels per latent side of the VAE (spacial_compression_decode where the host has it, else downscale_ratio)."""
    method = getattr(vae, "spacial_compression_decode", None)
    return int(method()) if callable(method) else int(vae.downscale_ratio)


def _size_multiple_and_limit(model):
    """(the latent size the diffusion model needs a multiple of, the largest latent side it takes or None), read
    from the host network: a UNet halves the size once per level, a DiT patchifies, an MMDiT's position table is
    finite."""
    network = getattr(model.model, "diffusion_model", None)
    multiple, limit = 1, None
    if hasattr(network, "channel_mult"):
        multiple = 2 ** (len(network.channel_mult) - 1)
    patch = getattr(network, "patch_size", None)
    if isinstance(patch, (tuple, list)):
        patch = patch[-1]
    if isinstance(patch, int) and patch > 1:
        multiple = max(multiple, patch)
        max_positions = getattr(network, "pos_embed_max_size", None)
        if isinstance(max_positions, int) and max_positions > 0:
            limit = max_positions * patch
    return multiple, limit


class QuickstepRestoreImage(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="QuickstepRestoreImage", display_name="Restore Image", category=RESTORATION_CATEGORY,
            description="Restores an IMAGE with the model as the prior, in one node: super-resolution x2 / x4, "
                        "inpainting of a painted MASK, deblurring (Gaussian blur of a given width) and colorization. "
                        "It builds the degradation, picks the method and settings measured best for the task "
                        "(DiffPIR or DAPS, decoupled annealed posterior sampling; DAPS through a VAE), spends the given number of model calls and "
                        "returns the restored IMAGE. Latent models need their VAE (the measurement is compared with "
                        "the decoded image, the gradient goes through the decoder only); pixel-space models (the "
                        "digit model) work without one.",
            inputs=[io.Model.Input("model", tooltip="The diffusion model used as the prior."),
                    io.Conditioning.Input("positive", tooltip="What the image shows (an empty prompt works)."),
                    io.Image.Input("image", tooltip="The degraded image: the low-resolution one for "
                                                    "super-resolution, the damaged one for inpainting, the blurred, "
                                                    "or the grey one."),
                    io.Combo.Input("task", options=list(RESTORE_TASKS), default="super_resolution_x4",
                                   tooltip="super_resolution_x2 / _x4: the output is 2 / 4 times larger (the image "
                                           "taken as its block average); inpaint: fill the mask; deblur: undo a "
                                           "Gaussian blur of blur_sigma pixels; colorize: an RGB image whose grey "
                                           "version is the input."),
                    io.Int.Input("model_calls", default=30, min=2, max=200,
                                 tooltip="Model calls per image: the cost. With cfg 1 one call per step, otherwise "
                                         "two (so steps = model_calls / 2); where the task averages several "
                                         "chains, they share these calls."),
                    io.Float.Input("noise_level", default=0.0, min=0.0, max=1.0, step=0.005,
                                   tooltip="Std of the noise in the degraded image, in 0-1 pixel units (0: clean "
                                           "measurement, fitted exactly)."),
                    io.Float.Input("blur_sigma", default=2.0, min=0.3, max=20.0, step=0.1,
                                   tooltip="deblur: the Gaussian blur's std in output pixels."),
                    io.Float.Input("cfg", default=1.0, min=1.0, max=30.0, step=0.1,
                                   tooltip="Classifier-free guidance scale; 1 uses only the positive conditioning "
                                           "(one call per step)."),
                    io.Int.Input("seed", default=0, min=0, max=2 ** 63 - 1, control_after_generate=True,
                                 tooltip="Seed of the sampling noise."),
                    io.Mask.Input("mask", optional=True,
                                  tooltip="inpaint: 1 = fill in, 0 = keep (LoadImage's MASK, a painted mask); the "
                                          "image's own height and width (not resized)."),
                    io.Vae.Input("vae", optional=True,
                                 tooltip="The model's VAE (required for latent models; leave empty for pixel-space "
                                         "models). TAESD (VAELoader taesd / taesdxl / taef1) is faster."),
                    io.Conditioning.Input("negative", optional=True,
                                          tooltip="Negative conditioning for cfg > 1 (default: the positive).")],
            outputs=[io.Image.Output(display_name="image")])

    @classmethod
    def execute(cls, model, positive, image, task, model_calls, noise_level, blur_sigma, cfg, seed, mask=None,
                vae=None, negative=None):
        import comfy.sample
        import comfy.samplers
        label = "Restore Image"
        require_choice(label, "task", task, RESTORE_TASKS)
        require_finite(label, "noise_level", noise_level, 0.0, 1.0)
        require_finite(label, "blur_sigma", blur_sigma, 0.3, 20.0)
        require_finite(label, "cfg", cfg, 1.0, 30.0)
        if isinstance(model_calls, bool) or not isinstance(model_calls, int) or not 2 <= model_calls <= 200:
            raise QuickstepInputError(label, f"model_calls = {model_calls!r} must be an integer in [2, 200]")
        if not torch.is_tensor(image) or image.dim() != 4 or not torch.isfinite(image).all():
            raise QuickstepInputError(label, "image must be a finite IMAGE [B, H, W, C]")
        pixels = image.float().movedim(-1, 1) * 2 - 1                    # [B, C, H, W] in [-1, 1]
        batch, height, width = pixels.shape[0], pixels.shape[2], pixels.shape[3]
        factor = {"super_resolution_x2": 2, "super_resolution_x4": 4}.get(task, 1)
        out_h, out_w = height * factor, width * factor
        latent_format = model.get_model_object("latent_format")
        if vae is None:
            channels = latent_format.latent_channels
            if channels not in (1, 3):
                raise QuickstepInputError(label, f"this model samples {channels}-channel latents: connect its VAE "
                                                 "(vae); only pixel-space models (1 or 3 channels) work without one")
            compression, image_channels = 1, channels
        else:
            compression, image_channels = _vae_compression(vae), 3
        if task == "colorize" and image_channels != 3:
            raise QuickstepInputError(label, "task = 'colorize' needs a model of RGB images; this one makes "
                                             f"{image_channels}-channel images")
        multiple, limit = _size_multiple_and_limit(model)
        if out_h % (compression * multiple) or out_w % (compression * multiple):
            raise QuickstepInputError(label, f"the output {out_w}x{out_h} (image {width}x{height}, task {task}) "
                                             f"must be a multiple of {compression * multiple} pixels for this model "
                                             f"(VAE x{compression}, network x{multiple})")
        latent_h, latent_w = out_h // compression, out_w // compression
        if limit is not None and max(latent_h, latent_w) > limit:
            raise QuickstepInputError(label, f"the output {out_w}x{out_h} (image {width}x{height}, task {task}) "
                                             f"needs a {latent_w}x{latent_h} latent; this model takes at most "
                                             f"{limit}x{limit} (its position table)")
        grey = pixels.mean(dim=1, keepdim=True)
        measured = pixels if pixels.shape[1] == image_channels else \
            grey.expand(-1, image_channels, -1, -1).contiguous()
        sigma_y = 2.0 * float(noise_level)          # [0, 1] pixel units -> the operators' [-1, 1] units
        keep = None
        try:
            if factor > 1:
                op = operators.Downsample(factor, sigma_y)
            elif task == "inpaint":
                if mask is None:
                    raise QuickstepInputError(label, "task = 'inpaint' needs the mask input connected")
                if not torch.isfinite(mask).all():
                    raise QuickstepInputError(label, "mask holds NaN or inf values")
                hole = mask.float().reshape(-1, *mask.shape[-2:]) if mask.dim() >= 2 else mask.float()
                if not (hole >= 0.5).any():     # nothing painted (LoadImage gives 64x64 zeros without alpha)
                    logging.warning("Restore Image: the mask marks no pixel to fill in; the image is returned as "
                                    "it is (paint the area in the Mask Editor)")
                    return io.NodeOutput(image)
                if tuple(hole.shape[-2:]) != (height, width) or hole.shape[0] not in (1, batch):
                    raise QuickstepInputError(label, f"mask of size {hole.shape[-1]}x{hole.shape[-2]} (batch "
                                                     f"{hole.shape[0]}) does not fit the image {width}x{height} "
                                                     f"(batch {batch}); masks are not resized")
                keep = (hole < 0.5).float()[:, None]
                op = operators.Inpaint(keep, sigma_y)
            elif task == "deblur":
                op = operators.GaussianBlur(2 * math.ceil(3 * blur_sigma) + 1, float(blur_sigma), sigma_y)
            else:
                op = operators.Grayscale(3, sigma_y)
            y = op.forward(measured) if task == "colorize" else measured
            if task != "colorize":
                op.check_measurement(tuple(y.shape), (batch, image_channels, out_h, out_w))
        except operators.OperatorError as error:
            raise QuickstepInputError(label, str(error)) from None
        options = dict((RESTORE_DEFAULTS if vae is None else VAE_DEFAULTS)[task], operator=op, measurement=y)
        if keep is not None and has_far_hole(keep):
            options["particles"] = FAR_HOLE_PARTICLES[options["method"]]
        # every step evaluates each chain (and with cfg > 1 the negative too): the calls are shared out
        calls_per_chain = model_calls // options.get("particles", 1)
        steps = max(1, calls_per_chain if cfg == 1.0 else calls_per_chain // 2)
        sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"),
                                                 SCHEDULER if vae is None else VAE_SCHEDULER, steps).cpu()
        try:
            guidance.validate(**options)
        except ValueError as error:
            raise QuickstepInputError(label, str(error)) from None
        sampler = comfy.samplers.KSAMPLER(_guarded(label, guidance.sample_restoration, vae), extra_options=options)
        latent = torch.zeros(batch, latent_format.latent_channels, latent_h, latent_w)
        noise = comfy.sample.prepare_noise(latent, seed)
        try:
            samples = comfy.sample.sample_custom(model, noise, cfg, sampler, sigmas, positive,
                                                 positive if negative is None else negative, latent, seed=seed)
        except RuntimeError as error:
            if "size" not in str(error) and "shape" not in str(error):
                raise
            raise QuickstepInputError(label, f"the model could not take a {latent_w}x{latent_h} latent (output "
                                             f"{out_w}x{out_h}): {str(error)[:300]}") from None
        restored = vae.decode(samples).movedim(-1, 1).float() * 2 - 1 if vae is not None else samples.float()
        restored = restored[:, :3]
        if keep is not None:            # the known pixels are the user's own, exactly
            restored = keep * measured + (1 - keep) * restored
        out = ((restored + 1) / 2).clamp(0, 1)
        if out.shape[1] == 1:
            out = out.expand(-1, 3, -1, -1)
        return io.NodeOutput(out.movedim(1, -1).contiguous())


NODES = [QuickstepDegradationOperator, QuickstepDegrade, QuickstepDegradePixels, QuickstepPseudoInverse,
         QuickstepRestorationSampler, QuickstepRestoreImage]
