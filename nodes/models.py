"""The pack's embedded digit models: small class-conditional MNIST models of the host's own architectures (SD1.5,
SDXL, SD3, Flux, Qwen-Image, Wan 2.1 video, Lumina 2), trained in a pixel-unshuffle latent space with one shared
digit conditioning (modelzoo/digit_models.py); SD1.5 and Flux also in their real latent spaces (TAESD, TAEF1). They run the README demo with no download and are what the
benchmarks measure solvers, schedules, caches and restoration on. One graph shape serves them all: Digit Model ->
(Digit Conditioning, Empty Digit Latent) -> any sampler -> Digit Latent to Image."""
from comfy_api.latest import io

from .common import CATEGORY, QuickstepInputError, require_choice
from ..modelzoo import digit_models
from ..modelzoo.students import STUDENTS, TEACHER_PREDICTION, load_student, student_path

ARCHITECTURES = list(digit_models.ARCHITECTURES)
PREDICTIONS = ["auto", *digit_models.ARCHITECTURES["sd15"].predictions]
INPUT_CHECK_KEY = "quickstep_digit_inputs"
# A latent made by Empty Digit Latent carries the VAE its architecture's latent space belongs to ("" for the exact
# pixel-unshuffle one); the host's samplers copy a latent's keys to their output, so the decoder can check it.
LATENT_VAE_KEY = "quickstep_digit_vae"
_ARCH_TOOLTIP = ("Which host architecture: sd15 (UNet, pixels), sdxl (UNet), sd3 (MMDiT), flux, qwen_image, "
                 "wan21 (video), lumina2; sd15_taesd, sdxl_taesdxl, sd3_taesd3 and flux_taef1 are those families "
                 "in their real latent spaces (decode with VAE Loader taesd / taesdxl / taesd3 / taef1).")


def _architecture_input():
    return io.Combo.Input("architecture", options=ARCHITECTURES, default="sd15", optional=True,
                          tooltip=_ARCH_TOOLTIP)


def _check_inputs_wrapper(name):
    """An OUTER_SAMPLE wrapper that refuses, before any model call, a latent or conditioning this digit model was
    not made for, with a message naming the nodes that make the right ones (instead of a shape error deep in the
    network)."""
    def check_inputs(executor, noise, *args, **kwargs):
        problem = (digit_models.latent_problem(name, tuple(noise.shape))
                   or digit_models.conditioning_problem(name, executor.class_obj.conds))
        if problem:
            raise QuickstepInputError("Digit Model", problem)
        return executor(noise, *args, **kwargs)
    return check_inputs


def with_input_check(patcher, name):
    import comfy.patcher_extension
    patcher.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, INPUT_CHECK_KEY,
                                 _check_inputs_wrapper(name))
    return patcher


class QuickstepDigitModel(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="QuickstepDigitModel",
            display_name="Digit Model (embedded)",
            category=f"{CATEGORY}/models",
            description="Loads one of Quickstep's embedded MNIST digit models, small trained models of the host's "
                        "own architectures (no download): sd15 (UNet on 32x32 pixels, eps or flow), sdxl (UNet, "
                        "eps), sd3 (MMDiT), flux (double + single blocks, guidance input; sample with true CFG), "
                        "qwen_image, wan21 (4-frame clips of a moving digit), lumina2; all flow except sdxl. "
                        "sd15_taesd (eps), sdxl_taesdxl (eps), sd3_taesd3 and flux_taef1 were trained in the real "
                        "latent spaces of TAESD, TAESDXL, TAESD3 and TAEF1 (64 px digits, 8x8 latents): decode "
                        "them with the VAE Loader's taesd / taesdxl / taesd3 / taef1. "
                        "'distilled' picks the one-step students of the sd15 flow model (CFG 2 baked in: sample at "
                        "cfg 1): consistency (1-2 steps, e.g. the TCD Sampler at gamma 1) or DSNO-style (exactly one "
                        "step, from sigma 1).",
            inputs=[io.Combo.Input("prediction", options=PREDICTIONS, default="auto",
                                   tooltip="auto: the architecture's own (sd15: eps). sd15 has eps and flow "
                                           "variants; the other architectures one each (sdxl eps, the rest flow)."),
                    io.Combo.Input("distilled", options=["none", *STUDENTS], default="none", optional=True,
                                   tooltip="none: the trained model; consistency / dsno: one-step students of the "
                                           "sd15 flow model."),
                    _architecture_input()],
            outputs=[io.Model.Output()])

    @classmethod
    def execute(cls, prediction, distilled="none", architecture="sd15"):
        node = "Digit Model"
        require_choice(node, "architecture", architecture, ARCHITECTURES)
        require_choice(node, "prediction", prediction, PREDICTIONS)
        require_choice(node, "distilled", distilled, ["none", *STUDENTS])
        trained = digit_models.ARCHITECTURES[architecture].predictions
        if prediction == "auto":
            prediction = trained[0]
        if prediction not in trained:
            raise QuickstepInputError(node, f"architecture = {architecture!r} is trained for prediction "
                                            f"{' or '.join(map(repr, trained))} only, got prediction = "
                                            f"{prediction!r} (auto picks it)")
        if distilled != "none" and (architecture, prediction) != ("sd15", TEACHER_PREDICTION):
            raise QuickstepInputError(node, f"distilled = {distilled!r} exists for architecture 'sd15', prediction "
                                            f"{TEACHER_PREDICTION!r} only, got architecture = {architecture!r}, "
                                            f"prediction = {prediction!r}")
        path = digit_models.weights_path(architecture, prediction) if distilled == "none" else student_path(distilled)
        if not path.exists():
            raise QuickstepInputError(node, f"architecture = {architecture!r}, prediction = {prediction!r}, "
                                            f"distilled = {distilled!r}: its weights {path.name} are not shipped "
                                            f"in this install")
        if distilled != "none":
            return io.NodeOutput(with_input_check(load_student(distilled), architecture))
        try:
            patcher = digit_models.load_digit_model(architecture, prediction, path)
        except ValueError as e:
            raise QuickstepInputError(node, str(e)) from None
        return io.NodeOutput(with_input_check(patcher, architecture))


class QuickstepDigitConditioning(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="QuickstepDigitConditioning",
            display_name="Digit Conditioning",
            category=f"{CATEGORY}/models",
            description="Conditioning for every embedded digit model (all architectures read the same digit "
                        "tokens): which digits to draw, one per image of the batch (repeated to fill it); empty "
                        "gives the unconditional embedding, the negative for CFG. For the digit models only: "
                        "other models read text-encoder conditioning.",
            inputs=[io.String.Input("digits", default="0123456789",
                                    tooltip="Digits 0-9 to draw, one per image (e.g. 0123456789); empty for none.")],
            outputs=[io.Conditioning.Output()])

    @classmethod
    def execute(cls, digits):
        digits = digits.replace(" ", "").replace(",", "")
        if not digits:
            return io.NodeOutput(digit_models.unconditional_conditioning())
        if not digits.isdecimal() or not digits.isascii():
            raise QuickstepInputError("Digit Conditioning", f"digits = {digits!r} may hold only the digits 0-9")
        return io.NodeOutput(digit_models.digit_conditioning([int(d) for d in digits]))


class QuickstepEmptyDigitLatent(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="QuickstepEmptyDigitLatent",
            display_name="Empty Digit Latent",
            category=f"{CATEGORY}/models",
            description="A blank page (black background) in the latent space of the chosen digit architecture: "
                        "sd15 32x32 pixels [B, 1, 32, 32]; sdxl [B, 4, 16, 16]; sd3, flux, lumina2 [B, 16, 8, 8]; "
                        "qwen_image [B, 16, 1, 8, 8]; wan21 video [B, 16, frames, 8, 8]; sd15_taesd and sdxl_taesdxl "
                        "[B, 4, 8, 8], sd3_taesd3 and flux_taef1 [B, 16, 8, 8], zeros as the stock empty latents "
                        "of a 64x64 image.",
            inputs=[io.Int.Input("batch_size", default=1, min=1, max=4096,
                                 tooltip="How many digits (wan21: clips) to draw."),
                    _architecture_input(),
                    io.Int.Input("frames", default=digit_models.VIDEO_FRAMES, min=1, max=64, optional=True,
                                 tooltip="Frames per clip, for the video architecture (wan21, trained on 4); "
                                         "image architectures have none and do not read it.")],
            outputs=[io.Latent.Output()])

    @classmethod
    def execute(cls, batch_size, architecture="sd15", frames=digit_models.VIDEO_FRAMES):
        import comfy.model_management
        require_choice("Empty Digit Latent", "architecture", architecture, ARCHITECTURES)
        latent = digit_models.empty_latent(architecture, batch_size, frames,
                                           comfy.model_management.intermediate_device())
        return io.NodeOutput({"samples": latent, LATENT_VAE_KEY: digit_models.ARCHITECTURES[architecture].vae})


class QuickstepDigitToImage(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="QuickstepDigitToImage",
            display_name="Digit Latent to Image",
            category=f"{CATEGORY}/models",
            description="Decodes any digit model's latent into an IMAGE (28x28, grey in RGB): the digit models' "
                        "exact 'VAE decode' (pixel shuffle), or for the real-latent models (sd15_taesd, sdxl_taesdxl, "
                        "sd3_taesd3, flux_taef1) the real VAE connected to vae. A video latent gives its frames "
                        "as a batch of images, clip after clip.",
            inputs=[io.Latent.Input("samples", tooltip="A latent sampled with a digit model (any architecture)."),
                    io.Vae.Input("vae", optional=True,
                                 tooltip="Only for the real-latent models: the VAE of their latent space (VAE "
                                         "Loader taesd, taesdxl, taesd3 or taef1 by the architecture's "
                                         "suffix). Leave empty for the other architectures.")],
            outputs=[io.Image.Output()])

    @classmethod
    def execute(cls, samples, vae=None):
        node = "Digit Latent to Image"
        needed = samples.get(LATENT_VAE_KEY)
        if needed and vae is None:
            raise QuickstepInputError(node, f"samples are in the {needed} latent space (a digit model trained on a "
                                            f"real VAE's latents): connect VAE Loader ({needed}) to vae")
        if needed == "" and vae is not None:
            raise QuickstepInputError(node, "samples are an exact pixel-unshuffle digit latent, which decodes "
                                            "without a VAE: leave vae unconnected")
        try:
            digits = digit_models.latent_to_digits(samples["samples"], vae)
        except (ValueError, RuntimeError) as e:
            raise QuickstepInputError(node, f"samples: {e}") from None
        return io.NodeOutput(digits.unsqueeze(-1).expand(-1, -1, -1, 3).contiguous())


NODES = [QuickstepDigitModel, QuickstepDigitConditioning, QuickstepEmptyDigitLatent, QuickstepDigitToImage]
