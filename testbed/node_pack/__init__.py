"""Test-only nodes (linked into the test host's custom_nodes, never into a user's): they put the measurement models
of modelzoo/ into graphs, so tests and benchmarks run them through the real executor like any checkpoint."""
import importlib
import importlib.util
import sys
from pathlib import Path

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
            description="A small seeded model of the host's own SD1.5 UNet, MMDiT or Flux class (test bed).",
            inputs=[io.Combo.Input("arch", options=["sd15", "mmdit", "flux"], tooltip="Host architecture."),
                    io.Int.Input("seed", default=0, min=0, max=2**31, tooltip="Weight seed.")],
            outputs=[io.Model.Output()])

    @classmethod
    def execute(cls, arch, seed):
        return io.NodeOutput(_modelzoo("tiny_host").build_tiny(arch, seed))


class QuickstepTestConditioning(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="QuickstepTestConditioning", display_name="Test Conditioning", category="Quickstep/testbed",
            description="Seeded CONDITIONING shaped for a tiny host model (test bed).",
            inputs=[io.Combo.Input("arch", options=["sd15", "mmdit", "flux"], tooltip="Host architecture."),
                    io.Int.Input("seed", default=0, min=0, max=2**31, tooltip="Seed of the context tokens."),
                    io.Int.Input("context_dim", default=0, min=0, max=4096,
                                 tooltip="Token width; 0 = the tiny model's own (768 for the SD1.5 file).")],
            outputs=[io.Conditioning.Output()])

    @classmethod
    def execute(cls, arch, seed, context_dim):
        return io.NodeOutput(_modelzoo("tiny_host").tiny_conditioning(arch, seed, context_dim=context_dim))


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
        return [QuickstepTestOracle, QuickstepTestTinyModel, QuickstepTestConditioning, QuickstepTestCountCalls]


async def comfy_entrypoint():
    return TestbedExtension()
