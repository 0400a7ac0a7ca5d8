"""Writes, deterministically, model files that the host's own loaders accept, into a ComfyUI base directory:
  models/checkpoints/qs_tiny_sd15.safetensors      SD1.5-detectable UNet (model_channels 320, one level) + TAESD as VAE
  models/diffusion_models/qs_tiny_sd3.safetensors  SD3-detectable MMDiT (depth 2) for UNETLoader (flow, shift 3)
Random seeded weights: they test loading, detection and graphs, not image quality.
usage (host Python): python -m testbed.make_model_files BASE_DIR
"""
import sys
from pathlib import Path

import torch

SD15_DETECTABLE_UNET = {  # keeps SD15's match keys: model_channels 320, context_dim 768, no linear proj, no adm
    "use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
    "adm_in_channels": None, "in_channels": 4, "out_channels": 4, "model_channels": 320,
    "num_res_blocks": [1], "channel_mult": [1], "transformer_depth": [1], "transformer_depth_output": [1, 1],
    "transformer_depth_middle": 1, "use_linear_in_transformer": False, "context_dim": 768,
    "use_temporal_resblock": False, "use_temporal_attention": False,
}
CHECKPOINT = "qs_tiny_sd15.safetensors"
MMDIT_FILE = "qs_tiny_sd3.safetensors"


def _state(module):
    return {k: v.detach().contiguous() for k, v in module.state_dict().items()}


def write_model_files(base):
    from safetensors.torch import save_file

    import comfy.supported_models
    import comfy.taesd.taesd
    from modelzoo.tiny_host import _MMDIT, seeded_init_

    base = Path(base)
    ckpt_path = base / "models" / "checkpoints" / CHECKPOINT
    mmdit_path = base / "models" / "diffusion_models" / MMDIT_FILE
    if not ckpt_path.exists():
        cfg = comfy.supported_models.SD15(dict(SD15_DETECTABLE_UNET))
        cfg.set_inference_dtype(torch.float32, None)
        unet = cfg.get_model({}).diffusion_model
        seeded_init_(unet, 0)
        taesd = comfy.taesd.taesd.TAESD()
        seeded_init_(taesd, 1)
        ckpt = {"model.diffusion_model." + k: v.half() for k, v in _state(unet).items()}
        ckpt.update({"first_stage_model.taesd_encoder." + k: v for k, v in _state(taesd.taesd_encoder).items()})
        ckpt.update({"first_stage_model.taesd_decoder." + k: v for k, v in _state(taesd.taesd_decoder).items()})
        ckpt["first_stage_model.vae_scale"] = torch.tensor(0.18215)
        ckpt["first_stage_model.vae_shift"] = torch.tensor(0.0)
        save_file(ckpt, str(ckpt_path) + ".tmp")
        Path(str(ckpt_path) + ".tmp").rename(ckpt_path)
    if not mmdit_path.exists():
        cfg = comfy.supported_models.SD3(dict(_MMDIT))
        cfg.set_inference_dtype(torch.float32, None)
        mmdit = cfg.get_model({}).diffusion_model
        seeded_init_(mmdit, 2)
        save_file({"model.diffusion_model." + k: v for k, v in _state(mmdit).items()}, str(mmdit_path) + ".tmp")
        Path(str(mmdit_path) + ".tmp").rename(mmdit_path)
    return ckpt_path, mmdit_path


if __name__ == "__main__":
    from testbed.host import ensure_python_path, PACK_DIR
    ensure_python_path()
    sys.path.append(str(PACK_DIR))
    from comfy.cli_args import args
    args.cpu = True
    print(*write_model_files(sys.argv[1]), sep="\n")
