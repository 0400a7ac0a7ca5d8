"""Distilled few-step checkpoints sampled the way they were trained: a TCD sampler, consistency-model noise levels,
and one setup node that turns a stock-loaded checkpoint (or a model with a distillation LoRA) of a chosen family
into the MODEL, SAMPLER and SIGMAS of its published recipe. The equations live in samplers/distilled.py.

The model-sampling patches (LCM boundary condition, x0 prediction of the one-step Lightning checkpoint) are mixins
placed in front of the model's own sampling class on a deep copy of its model_sampling object (its own buffers: the
input model's object is never touched), handed to the host as an object patch, so the model's own noise schedule
(beta schedule, zero-SNR rescale) is kept and nothing else of the host's class is re-implemented.
"""
import copy
import logging

import torch

from comfy_api.latest import io

from .common import CATEGORY, QuickstepInputError, require_choice, require_finite
from .samplers import sampler_object
from .. import samplers as qs
from ..samplers import distilled as qd

SUBCATEGORY = f"{CATEGORY}/distilled"
CONSISTENCY_TWO_STEP = (0, 22)     # the official two-step CM indices into a 40-level Karras grid
CONSISTENCY_GRID = 40


def prediction_of(model_sampling):
    """'flow', 'v', 'x0' or 'eps', from the host's sampling class (duck-typed on class names)."""
    names = {cls.__name__ for cls in type(model_sampling).__mro__}
    for name, prediction in (("CONST", "flow"), ("V_PREDICTION", "v"), ("X0", "x0"), ("EPS", "eps")):
        if name in names:
            return prediction
    return "unknown"


class LCMBoundary:
    """The LCM consistency parametrisation f = c_skip(t) x + c_out(t) x0_eps (sigma_data 0.5, timestep x 10)."""

    def calculate_denoised(self, sigma, model_output, model_input):
        sigma = sigma.reshape(sigma.shape[:1] + (1,) * (model_output.ndim - 1))
        scaled = self.timestep(sigma.flatten()).reshape(sigma.shape).to(model_output.dtype) * 10.0
        x0 = model_input - model_output * sigma
        c_skip = 0.25 / (scaled ** 2 + 0.25)
        c_out = scaled / (scaled ** 2 + 0.25) ** 0.5
        return c_out * x0 + c_skip * model_input


class X0Prediction:
    """The network predicts the clean sample itself (SDXL-Lightning's one-step checkpoint)."""

    def calculate_denoised(self, sigma, model_output, model_input):
        return model_output


PATCHES = {"lcm": LCMBoundary, "x0_one_step": X0Prediction}


def patched_sampling(model_sampling, mixin):
    """A new model_sampling module: `mixin` in front of the model's own class, over a deep copy of its state (a
    shallow copy of an nn.Module shares its _buffers dict: moving or re-registering the copy's sigmas would change
    the input model's)."""
    patched = copy.deepcopy(model_sampling)
    patched.__class__ = type(f"Quickstep{mixin.__name__}", (mixin, type(model_sampling)), {})
    return patched


def family_sigmas(family, model_sampling, steps):
    if family.shift is not None:
        return qd.flow_preset_sigmas(family, steps)
    if family.timesteps is not None:
        timesteps = torch.tensor(family.timesteps(steps), dtype=torch.float32)
        sigmas = model_sampling.sigma(timesteps).float().cpu()
        return torch.cat([sigmas, sigmas.new_zeros(1)])
    if family.prediction == "flow":
        import comfy.samplers
        return comfy.samplers.calculate_sigmas(model_sampling, "simple", steps).float().cpu()
    indices = CONSISTENCY_TWO_STEP[:steps]
    return qs.consistency_sigmas(indices, CONSISTENCY_GRID, float(model_sampling.sigma_min),
                                 float(model_sampling.sigma_max)).float()


def check_prediction(node, family_name, family, prediction):
    if family.prediction == "flow" and prediction != "flow":
        raise QuickstepInputError(node, f"family {family_name!r} is for flow (CONST) models; this model predicts "
                                        f"{prediction}")
    if family.prediction != "flow" and prediction == "flow":
        raise QuickstepInputError(node, f"family {family_name!r} is for discrete-time SD-family models; this is a "
                                        f"flow model: use family 'flow_distilled'")
    if family.prediction == "eps" and prediction != "eps":
        raise QuickstepInputError(node, f"family {family_name!r} needs an eps-prediction model (its patch is "
                                        f"eps-based); this model predicts {prediction}")
    if prediction not in ("eps", "flow"):
        logging.warning("Quickstep %s: family %r was published for eps models; this model predicts %s, which is "
                        "used as it is.", node, family_name, prediction)


class QuickstepTCDSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="QuickstepTCDSampler", display_name="TCD Sampler", category=SUBCATEGORY,
            description="Trajectory Consistency Distillation's strategic stochastic sampling: each step jumps to "
                        "(1 - gamma) of the next timestep and re-noises from there. gamma 0 is deterministic "
                        "(DDIM), 1 is consistency-model sampling (like the stock lcm sampler). For TCD, LCM, "
                        "Hyper-SD and other consistency-distilled checkpoints and LoRAs. Also in the KSampler list "
                        "as qs_tcd (gamma 0.3).",
            inputs=[io.Float.Input("gamma", default=0.3, min=0.0, max=1.0, step=0.05,
                                   tooltip="Stochasticity: 0 deterministic, 1 full re-noising; higher with more "
                                           "steps."),
                    io.Boolean.Input("pure_noise_start", default=False,
                                     tooltip="For one-step generators trained on pure noise at a fixed timestep "
                                             "(DMD2 t=399, Hyper-SD t=800): scale the start noise to unit "
                                             "variance. Text-to-image from an empty latent only.")],
            outputs=[io.Sampler.Output()])

    @classmethod
    def execute(cls, gamma, pure_noise_start):
        label = "TCD Sampler"
        require_finite(label, "gamma", gamma, 0.0, 1.0)
        return io.NodeOutput(sampler_object(label, qs.SAMPLERS["tcd"], gamma=gamma,
                                            pure_noise_start=pure_noise_start))


class QuickstepConsistencySigmas(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="QuickstepConsistencySigmas", display_name="Consistency Noise Levels", category=SUBCATEGORY,
            description="Noise levels for consistency-model multistep sampling, chosen as the official sampler "
                        "does: indices into a Karras (rho 7) grid over the model's sigma range, then 0. Pair with "
                        "the TCD Sampler at gamma 1 or the stock lcm sampler.",
            inputs=[io.Model.Input("model", tooltip="The model whose sigma range the grid spans."),
                    io.String.Input("indices", default="0, 22",
                                    tooltip="Comma-separated grid indices, starting at 0 and increasing (one "
                                            "model call each)."),
                    io.Int.Input("grid_steps", default=40, min=2, max=1000,
                                 tooltip="Levels of the Karras grid the indices point into.")],
            outputs=[io.Sigmas.Output()])

    @classmethod
    def execute(cls, model, indices, grid_steps):
        label = "Consistency Noise Levels"
        try:
            parsed = [int(v) for v in indices.replace(" ", "").split(",") if v != ""]
            ms = model.get_model_object("model_sampling")
            return io.NodeOutput(qs.consistency_sigmas(parsed, grid_steps, float(ms.sigma_min),
                                                       float(ms.sigma_max)).float())
        except ValueError as error:
            raise QuickstepInputError(label, f"indices = {indices!r}: {error}") from None


class QuickstepDistilledSetup(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        lines = "; ".join(f"{name}: {f.title}, steps {'/'.join(map(str, f.steps))}"
                          for name, f in qd.FAMILIES.items())
        return io.Schema(
            node_id="QuickstepDistilledSetup", display_name="Distilled Model Setup", category=SUBCATEGORY,
            description="Everything a distilled checkpoint or LoRA needs to be sampled as published: the model "
                        "with the family's model-sampling patch, the family's sampler, its published "
                        "timesteps as SIGMAS (flow presets: at the shift the authors used, whatever shift the "
                        "model was loaded with) and the CFG it was distilled for: connect cfg to the sampler's cfg "
                        "(at 1 the host skips the negative prompt's pass, one model pass per step). "
                        f"Families: {lines}.",
            inputs=[io.Model.Input("model", tooltip="The distilled model (stock loader, or a base model with the "
                                                    "family's LoRA applied)."),
                    io.Combo.Input("family", options=list(qd.FAMILIES), default="lcm",
                                   tooltip="Which distillation the checkpoint or LoRA comes from (wan_lightning, "
                                           "qwen_image_lightning, z_image_turbo, flux_schnell, sd35_turbo: those "
                                           "checkpoints' own published times and shift)."),
                    io.Int.Input("steps", default=4, min=1, max=8,
                                 tooltip="Model calls; each family supports its published counts only."),
                    io.Float.Input("gamma", default=0.3, min=0.0, max=1.0, step=0.05,
                                   tooltip="TCD family only: stochasticity (0 deterministic, 1 full re-noising). "
                                           "The other families use their published sampler.")],
            outputs=[io.Model.Output(display_name="model"), io.Sampler.Output(display_name="sampler"),
                     io.Sigmas.Output(display_name="sigmas"),
                     io.Float.Output(display_name="cfg", tooltip="The CFG scale the family was distilled for; "
                                                                 "1 skips the unconditional pass.")])

    @classmethod
    def execute(cls, model, family, steps, gamma):
        label = "Distilled Model Setup"
        require_choice(label, "family", family, list(qd.FAMILIES))
        require_finite(label, "gamma", gamma, 0.0, 1.0)
        spec = qd.FAMILIES[family]
        if steps not in spec.steps:
            raise QuickstepInputError(label, f"steps = {steps} is not published for family {family!r}; use one "
                                             f"of {', '.join(map(str, spec.steps))}")
        model_sampling = model.get_model_object("model_sampling")
        check_prediction(label, family, spec, prediction_of(model_sampling))
        if spec.patch == "lcm" or (spec.patch == "x0_one_step" and steps == 1):
            model = model.clone()
            model_sampling = patched_sampling(model_sampling, PATCHES[spec.patch])
            model.add_object_patch("model_sampling", model_sampling)
        sampler = sampler_object(label, qs.SAMPLERS["tcd"], gamma=gamma if family == "tcd" else spec.gamma,
                                 pure_noise_start=steps in spec.pure_noise_steps)
        return io.NodeOutput(model, sampler, family_sigmas(spec, model_sampling, steps), spec.cfg)


NODES = [QuickstepDistilledSetup, QuickstepTCDSampler, QuickstepConsistencySigmas]
