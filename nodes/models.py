"""The pack's embedded model: a small class-conditional UNet of the host's SD1.5 architecture trained on MNIST
digits (pixel space, 32x32, one channel). It runs the README demo with no download and is what the benchmarks
measure solvers, schedules, caches and restoration on."""
from comfy_api.latest import io

from .common import CATEGORY, QuickstepInputError, require_choice
from ..modelzoo import mnist_unet
from ..modelzoo.students import STUDENTS, TEACHER_PREDICTION, load_student, student_path

PREDICTIONS = mnist_unet.PREDICTIONS


class QuickstepDigitModel(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="QuickstepDigitModel",
            display_name="Digit Model (embedded)",
            category=f"{CATEGORY}/models",
            description="Loads Quickstep's embedded MNIST digit model: a small UNet of ComfyUI's SD1.5 "
                        "architecture working on 32x32 one-channel pixels. No download. 'distilled' picks the "
                        "one-step students of the flow variant (CFG 2 baked in: sample at cfg 1): consistency "
                        "(1-2 steps, e.g. the TCD Sampler at gamma 1) or DSNO-style (exactly one step, from sigma 1).",
            inputs=[io.Combo.Input("prediction", options=list(PREDICTIONS), default="eps",
                                   tooltip="Which trained variant to load (its prediction type)."),
                    io.Combo.Input("distilled", options=["none", *STUDENTS], default="none", optional=True,
                                   tooltip="none: the teacher; consistency / dsno: its one-step students (flow only).")],
            outputs=[io.Model.Output()])

    @classmethod
    def execute(cls, prediction, distilled="none"):
        node = "Digit Model"
        require_choice(node, "prediction", prediction, PREDICTIONS)
        require_choice(node, "distilled", distilled, ["none", *STUDENTS])
        if distilled != "none" and prediction != TEACHER_PREDICTION:
            raise QuickstepInputError(node, f"distilled = {distilled!r} exists for prediction "
                                            f"{TEACHER_PREDICTION!r} only, got prediction = {prediction!r}")
        path = mnist_unet.weights_path(prediction) if distilled == "none" else student_path(distilled)
        if not path.exists():
            raise QuickstepInputError(node, f"prediction = {prediction!r}, distilled = {distilled!r}: its weights "
                                            f"{path.name} are not shipped in this install")
        if distilled == "none":
            return io.NodeOutput(mnist_unet.load_mnist_model(path, prediction=prediction))
        return io.NodeOutput(load_student(distilled))


class QuickstepDigitConditioning(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="QuickstepDigitConditioning",
            display_name="Digit Conditioning",
            category=f"{CATEGORY}/models",
            description="Conditioning for the embedded digit model: which digits to draw, one per image of the "
                        "batch (repeated to fill it); empty gives the unconditional embedding, the negative for CFG.",
            inputs=[io.String.Input("digits", default="0123456789",
                                    tooltip="Digits 0-9 to draw, one per image (e.g. 0123456789); empty for none.")],
            outputs=[io.Conditioning.Output()])

    @classmethod
    def execute(cls, digits):
        digits = digits.replace(" ", "").replace(",", "")
        if not digits:
            return io.NodeOutput(mnist_unet.unconditional_conditioning())
        if not digits.isdecimal() or not digits.isascii():
            raise QuickstepInputError("Digit Conditioning", f"digits = {digits!r} may hold only the digits 0-9")
        return io.NodeOutput(mnist_unet.digit_conditioning([int(d) for d in digits]))


class QuickstepEmptyDigitLatent(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="QuickstepEmptyDigitLatent",
            display_name="Empty Digit Latent",
            category=f"{CATEGORY}/models",
            description="A blank 32x32 one-channel pixel latent (black background) for the embedded digit model.",
            inputs=[io.Int.Input("batch_size", default=1, min=1, max=4096, tooltip="How many digits to draw.")],
            outputs=[io.Latent.Output()])

    @classmethod
    def execute(cls, batch_size):
        import comfy.model_management
        return io.NodeOutput({"samples": mnist_unet.empty_latent(batch_size,
                                                                 comfy.model_management.intermediate_device())})


class QuickstepDigitToImage(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="QuickstepDigitToImage",
            display_name="Digit Latent to Image",
            category=f"{CATEGORY}/models",
            description="Turns the digit model's pixel latent into an IMAGE (28x28, grey in RGB): the digit "
                        "model's 'VAE decode'.",
            inputs=[io.Latent.Input("samples", tooltip="Pixel latent sampled with the digit model.")],
            outputs=[io.Image.Output()])

    @classmethod
    def execute(cls, samples):
        return io.NodeOutput(mnist_unet.latent_to_image(samples["samples"]))


NODES = [QuickstepDigitModel, QuickstepDigitConditioning, QuickstepEmptyDigitLatent, QuickstepDigitToImage]
