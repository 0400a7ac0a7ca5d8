"""Test-only nodes (linked into the test host's custom_nodes, never into a user's): they put the measurement models
of modelzoo/ into graphs, so tests and benchmarks run them through the real executor like any checkpoint."""
import importlib
import importlib.util
import sys
from pathlib import Path

import torch
from typing_extensions import override

from comfy_api.latest import ComfyExtension, io

PACK_DIR = Path(__file__).resolve().parents[2]


def _modelzoo(module):
    """Import modelzoo.<module> from the pack by path: the host loads custom node folders under path-derived names,
    so the pack is not importable by name from here."""
    package = "quickstep_testbed_modelzoo"
    if package not in sys.modules:
        spec = importlib.util.spec_from_file_location(package, PACK_DIR / "modelzoo" / "__init__.py",
                                                      submodule_search_locations=[str(PACK_DIR / "modelzoo")])
        mod = importlib.util.module_from_spec(spec)
        sys.modules[package] = mod
        spec.loader.exec_module(mod)
    return importlib.import_module(f"{package}.{module}")


def _tiny_archs():
    """The tiny host models: tiny_host's SD1.5 UNet, MMDiT and Flux, then tiny_dits' 2026 DiT families."""
    return [*_modelzoo("tiny_host").ARCHITECTURES, *_modelzoo("tiny_dits").FAMILIES]


def _is_tiny_dit(arch):
    return arch in _modelzoo("tiny_dits").FAMILIES


class QuickstepTestOracle(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="QuickstepTestOracle", display_name="Test Gaussian-Mixture Oracle", category="Quickstep/testbed",
            description="Exact Gaussian-mixture denoiser as a host model (test bed).",
            inputs=[io.Combo.Input("family", options=["eps", "v", "flow"], tooltip="Model sampling family."),
                    io.Int.Input("mixture_seed", default=0, min=0, max=2**31, tooltip="Seed of the mixture.")],
            outputs=[io.Model.Output()])

    @classmethod
    def execute(cls, family, mixture_seed):
        return io.NodeOutput(_modelzoo("oracle_host").build_oracle(family, mixture_seed))


class QuickstepTestTinyModel(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="QuickstepTestTinyModel", display_name="Test Tiny Host Model", category="Quickstep/testbed",
            description="A small seeded model of a host model class: SD1.5 UNet, MMDiT, Flux or a 2026 DiT "
                        "family of modelzoo/tiny_dits.py (test bed).",
            inputs=[io.Combo.Input("arch", options=_tiny_archs(), tooltip="Host architecture."),
                    io.Int.Input("seed", default=0, min=0, max=2**31, tooltip="Weight seed.")],
            outputs=[io.Model.Output()])

    @classmethod
    def execute(cls, arch, seed):
        if _is_tiny_dit(arch):
            return io.NodeOutput(_modelzoo("tiny_dits").build_tiny_dit(arch, seed))
        return io.NodeOutput(_modelzoo("tiny_host").build_tiny(arch, seed))


class QuickstepTestConditioning(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="QuickstepTestConditioning", display_name="Test Conditioning", category="Quickstep/testbed",
            description="Seeded CONDITIONING shaped for a tiny host model (test bed).",
            inputs=[io.Combo.Input("arch", options=_tiny_archs(), tooltip="Host architecture."),
                    io.Int.Input("seed", default=0, min=0, max=2**31, tooltip="Seed of the context tokens."),
                    io.Int.Input("context_dim", default=0, min=0, max=4096,
                                 tooltip="Token width; 0 = the tiny model's own (768 for the SD1.5 file). "
                                         "The tiny DiT families have their own width only.")],
            outputs=[io.Conditioning.Output()])

    @classmethod
    def execute(cls, arch, seed, context_dim):
        if _is_tiny_dit(arch):
            return io.NodeOutput(_modelzoo("tiny_dits").tiny_dit_conditioning(arch, seed))
        return io.NodeOutput(_modelzoo("tiny_host").tiny_conditioning(arch, seed, context_dim=context_dim))


class QuickstepTestLatentImage(io.ComfyNode):
    """Stands in for a VAE the test bed does not have (video and 128-channel latents): the image is no decoding,
    only a picture of the latent that a save node accepts."""
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="QuickstepTestLatentImage", display_name="Test Latent as Image", category="Quickstep/testbed",
            description="The latent's first three channels through a sigmoid as an IMAGE; video frames follow each "
                        "other in the batch (test bed).",
            inputs=[io.Latent.Input("samples", tooltip="Any latent, image [B, C, H, W] or video [B, C, T, H, W].")],
            outputs=[io.Image.Output()])

    @classmethod
    def execute(cls, samples):
        x = samples["samples"].float()
        if x.ndim == 5:
            x = x.movedim(2, 1).flatten(0, 1)
        rgb = x[:, :3] if x.shape[1] >= 3 else x[:, :1].expand(-1, 3, -1, -1)
        return io.NodeOutput(torch.sigmoid(rgb).movedim(1, -1).contiguous())


class QuickstepTestCountCalls(io.ComfyNode):
    """Counts sampler-level model calls (one per CFG-combined prediction) with a PREDICT_NOISE wrapper, and the
    batch rows the diffusion model computes with an APPLY_MODEL wrapper (a CFG step computes the negative's rows too,
    a cfg-1 step only the positive's); the counts are in model_options["transformer_options"]["quickstep_test_calls"]
    ["n"] and ["rows"] of the output model."""
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="QuickstepTestCountCalls", display_name="Test Count Model Calls", category="Quickstep/testbed",
            description="Counts the sampler's model calls (test bed).",
            inputs=[io.Model.Input("model", tooltip="Model to count calls of.")],
            outputs=[io.Model.Output()])

    @classmethod
    def execute(cls, model):
        import comfy.patcher_extension
        patched = model.clone()
        calls = {"n": 0, "rows": 0}

        def count(executor, *args, **kwargs):
            calls["n"] += 1
            return executor(*args, **kwargs)

        def count_rows(executor, x, *args, **kwargs):
            calls["rows"] += x.shape[0]
            return executor(x, *args, **kwargs)
        patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.PREDICT_NOISE, "quickstep_test_count", count)
        patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "quickstep_test_count",
                                     count_rows)
        patched.model_options.setdefault("transformer_options", {})["quickstep_test_calls"] = calls
        return io.NodeOutput(patched)


class TestbedExtension(ComfyExtension):
    @override
    async def get_node_list(self):
        return [QuickstepTestOracle, QuickstepTestTinyModel, QuickstepTestConditioning, QuickstepTestCountCalls,
                QuickstepTestLatentImage]


async def comfy_entrypoint():
    return TestbedExtension()
