"""The host APIs Quickstep's nodes stand on, checked before they are registered: a ComfyUI that lacks one gets a
clear logged error naming what is missing, and ComfyUI starts without the pack instead of failing on an import.
tests/test_host_api.py checks that every host name the pack's code uses exists in the pinned host."""
import importlib

REQUIRED = {
    "comfy_api.latest": ("ComfyExtension", "io", "ui"),
    "comfy.samplers": ("KSAMPLER", "KSAMPLER_NAMES", "SAMPLER_NAMES", "SCHEDULER_NAMES", "SCHEDULER_HANDLERS",
                       "SchedulerHandler", "calculate_sigmas", "ksampler"),
    "comfy.sample": ("sample_custom", "prepare_noise", "fix_empty_latent_channels"),
    "comfy.k_diffusion.sampling": (),
    "comfy.model_patcher": ("ModelPatcher", "create_model_options_clone"),
    "comfy.patcher_extension": ("WrappersMP",),
    "comfy.sampler_helpers": ("convert_cond", "estimate_memory"),
    "comfy.model_management": ("get_torch_device", "intermediate_device", "load_models_gpu",
                               "throw_exception_if_processing_interrupted", "unet_dtype", "unet_manual_cast",
                               "unet_offload_device"),
    "comfy.model_base": ("BaseModel", "ModelType"),
    "comfy.utils": ("ProgressBar",),
    "comfy.ldm.modules.diffusionmodules.openaimodel": ("UNetModel",),
}


def missing_host_apis(required=REQUIRED):
    """'module.name' for every required host module or attribute this ComfyUI lacks (empty when all are there)."""
    missing = []
    for module_name, names in required.items():
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            missing.append(module_name)
            continue
        missing.extend(f"{module_name}.{name}" for name in names if not hasattr(module, name))
    return missing
