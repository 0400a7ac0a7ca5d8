"""Shared workflows stay valid against the live /object_info of the real host, their UI and API files describe the
same graph (the UI file laid out in titled groups), and every API workflow runs end to end through the HTTP server on
the test models; the pack carries what the Comfy Registry needs.

The workflows name the stock model files a user has (v1-5-pruned-emaonly.safetensors, an SD3 diffusion model, its
text encoders, the Wan / Qwen-Image / HunyuanVideo / LTXV / Chroma / Z-Image files); as shipped, the host's own
validate_prompt accepts each once those files are in the user's folders. Only this test maps them to the test bed's
files, swaps the text encoders for seeded test conditioning (the tiny checkpoint has no CLIP) and shrinks sizes and
step counts so each run takes seconds. The families whose stock loaders detect only full-size files (modelzoo/README.md
"Stock loaders") run their graph with the model, text encoder, empty latent and decoder swapped: the pack's digit
model of that architecture where there is one (Wan, Qwen-Image, Lumina 2 / Z-Image), else a tiny seeded model of the
host's class (HunyuanVideo, LTXV, Chroma; test-bed nodes). The caches, samplers, shift and split steps stay."""
import importlib.util
import json
from pathlib import Path

import pytest

from testbed.host import (WORKFLOW_DIR, WORKFLOW_INDEX, Client, api_workflow_path, host_version, ui_workflow_path,
                          workflow_names)
from testbed.make_model_files import CHECKPOINT, MMDIT_FILE
from testbed.workflow_format import canonical, combo_options, ui_to_api

PACK_DIR = Path(__file__).resolve().parent.parent
INDEX = json.loads(WORKFLOW_INDEX.read_text())
# index order: a workflow that needs another's result (a saved schedule) comes after it
NAMES = sorted(workflow_names(), key=lambda name: list(INDEX).index(name) if name in INDEX else len(INDEX))
TEST_IMAGE = "quickstep_workflow_test.png"

_spec = importlib.util.spec_from_file_location("make_ui_workflows", PACK_DIR / "scripts" / "make_ui_workflows.py")
make_ui_workflows = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_ui_workflows)

# (class_type, input) -> the test bed's file. The SD3 workflow's VAE becomes TAESD3 (test_files): the test bed has
# no full SD3 VAE, and VAELoader takes "taesd3" as one of its own names.
TEST_FILES = {("CheckpointLoaderSimple", "ckpt_name"): CHECKPOINT, ("UNETLoader", "unet_name"): MMDIT_FILE,
              ("VAELoader", "vae_name"): "taesd3", ("LoadImage", "image"): TEST_IMAGE}
# The model files a user picks, by the folder their loader lists
USER_FILE_FOLDERS = {("CheckpointLoaderSimple", "ckpt_name"): "checkpoints", ("UNETLoader", "unet_name"):
                     "diffusion_models", ("VAELoader", "vae_name"): "vae", ("CLIPLoader", "clip_name"): "text_encoders",
                     **{("DualCLIPLoader", f"clip_name{i}"): "text_encoders" for i in (1, 2)},
                     **{("TripleCLIPLoader", f"clip_name{i}"): "text_encoders" for i in (1, 2, 3)}}
USER_FILE_INPUTS = set(USER_FILE_FOLDERS) | {("LoadImage", "image")}
# Families by their text encoder loader's type: the digit model architecture, or the tiny host model, that stands in
DIGIT_STAND_INS = {"wan": "wan21", "qwen_image": "qwen_image", "lumina2": "lumina2"}
TINY_STAND_INS = {"hunyuan_video": "hunyuan_video", "ltxv": "ltxv", "chroma": "chroma"}
MODEL_LOADERS = {"UNETLoader", "CheckpointLoaderSimple"}
EMPTY_LATENTS = {"EmptyHunyuanLatentVideo", "EmptySD3LatentImage", "EmptyLTXVLatentVideo"}
DECODERS = {"VAEDecode", "VAEDecodeTiled"}
# Nodes that only feed others: dropped once nothing reads them (the loaders a stand-in replaced)
FEEDERS = {"CLIPLoader", "DualCLIPLoader", "TripleCLIPLoader", "VAELoader", "T5TokenizerOptions"}
SAVES = {"SaveImage": b"\x89PNG\r\n\x1a\n", "SaveAnimatedWEBP": b"RIFF"}
# Text encoders by the loader their CLIP comes from: (test conditioning arch, context width; 0 = the model's own)
CONDITIONING_FOR = {"CheckpointLoaderSimple": ("sd15", 768), "TripleCLIPLoader": ("mmdit", 0)}
# Small sizes and few steps (the whole module takes about 20 s); the test MMDiT has 2 blocks, so Block Cache keeps one in front and caches the other.
CHEAP = {"EmptyLatentImage": {"width": 64, "height": 64, "batch_size": 1},
         "EmptySD3LatentImage": {"width": 64, "height": 64, "batch_size": 1},
         "EmptyHunyuanLatentVideo": {"width": 64, "height": 64, "length": 9, "batch_size": 1},
         "EmptyLTXVLatentVideo": {"width": 128, "height": 128, "length": 9, "batch_size": 1},
         "ImageScale": {"width": 64, "height": 64},
         "KSampler": {"steps": 3}, "BasicScheduler": {"steps": 3}, "LTXVScheduler": {"steps": 3},
         "KSamplerAdvanced": {"steps": 4},         # its start and end steps scale with it (see _cheap_inputs)
         # the Nelder-Mead search ("ld3") took 101 s here on 4 trajectories (test_schedule_nodes covers it); GITS 3 s
         "QuickstepOptimizeSchedule": {"method": "gits", "steps": 3, "trajectories": 4, "teacher_steps": 10},
         # the learned solver's full run is covered by test_solver_nodes; here a 3-call solver from 2 passes
         "QuickstepOptimizeSolver": {"steps": 3, "trajectories": 4, "teacher_steps": 10, "max_fits": 2},
         # few_step_limit 0: the caches work at 3 steps instead of backing off to computing every one
         "QuickstepBlockCache": {"back_blocks": 0, "few_step_limit": 0}, "QuickstepModelCache": {"few_step_limit": 0},
         "QuickstepRestoreImage": {"model_calls": 3}}


def _api(name):
    return json.loads(api_workflow_path(name).read_text())


def _ui(name):
    return json.loads(ui_workflow_path(name).read_text())


def _without_added_outputs(generated, ui):
    """`generated` with each node's output slots cut to as many as the node has in `ui`, where the cut ones have no
    links: the UI files are made on ComfyUI 0.3.75, and a newer host may give a stock node an output slot more
    (0.33's SaveImage has an IMAGE output)."""
    slots_in_file = {node["id"]: len(node["outputs"]) for node in ui["nodes"]}
    for node in generated["nodes"]:
        kept = slots_in_file.get(node["id"], len(node["outputs"]))
        if not any(slot["links"] for slot in node["outputs"][kept:]):
            node["outputs"] = node["outputs"][:kept]
    return generated


def _without_meta(api):
    return {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in api.items()}


def _is_link(value):
    return isinstance(value, list) and len(value) == 2 and isinstance(value[1], int)


def _text_encoder_type(api):
    """The type of the workflow's CLIPLoader / DualCLIPLoader (the model family it loads text encoders for)."""
    types = {node["inputs"]["type"] for node in api.values() if node["class_type"] in ("CLIPLoader", "DualCLIPLoader")}
    assert len(types) <= 1, f"one family per workflow, got text encoders of types {types}"
    return next(iter(types), None)


def _stand_in(node_id, node, family):
    """The test-bed node that replaces `node` of a family whose files the test bed cannot have, or None to keep it."""
    kind = node["class_type"]
    if family in DIGIT_STAND_INS:
        arch = DIGIT_STAND_INS[family]
        if kind in MODEL_LOADERS:
            return {"class_type": "QuickstepDigitModel",
                    "inputs": {"prediction": "auto", "distilled": "none", "architecture": arch}}
        if kind == "CLIPTextEncode":
            return {"class_type": "QuickstepDigitConditioning", "inputs": {"digits": str(int(node_id) % 10)}}
        if kind in EMPTY_LATENTS:
            return {"class_type": "QuickstepEmptyDigitLatent", "inputs": {"batch_size": 1, "architecture": arch}}
        if kind in DECODERS:
            return {"class_type": "QuickstepDigitToImage", "inputs": {"samples": node["inputs"]["samples"]}}
    if family in TINY_STAND_INS:
        arch = TINY_STAND_INS[family]
        if kind in MODEL_LOADERS:
            return {"class_type": "QuickstepTestTinyModel", "inputs": {"arch": arch, "seed": 0}}
        if kind == "CLIPTextEncode":
            return {"class_type": "QuickstepTestConditioning",
                    "inputs": {"arch": arch, "seed": int(node_id), "context_dim": 0}}
        if kind in DECODERS:
            return {"class_type": "QuickstepTestLatentImage", "inputs": {"samples": node["inputs"]["samples"]}}
    return None


def _cheap_inputs(node):
    """CHEAP's values for `node`; KSamplerAdvanced's start and end steps move with its step count, so a two-expert
    split stays a split."""
    cheap = dict(CHEAP.get(node["class_type"], {}))
    if node["class_type"] == "KSamplerAdvanced":
        steps = node["inputs"]["steps"]
        for name in ("start_at_step", "end_at_step"):
            cheap[name] = min(node["inputs"][name] * cheap["steps"] // steps, 10000)
    return cheap


def for_test_models(api, cheap=True):
    """The workflow on the test bed: model files mapped or their families' stand-ins put in, text encoders replaced,
    small sizes and few steps."""
    api = json.loads(json.dumps(api))
    family = _text_encoder_type(api)
    for node_id, node in list(api.items()):
        replacement = _stand_in(node_id, node, family)
        if replacement is not None:
            api[node_id] = replacement
        elif node["class_type"] == "CLIPTextEncode":
            arch, width = CONDITIONING_FOR[api[node["inputs"]["clip"][0]]["class_type"]]
            api[node_id] = {"class_type": "QuickstepTestConditioning",
                            "inputs": {"arch": arch, "seed": int(node_id), "context_dim": width}}
    while True:
        used = {v[0] for node in api.values() for v in node["inputs"].values() if _is_link(v)}
        unused = [n for n, node in api.items() if node["class_type"] in FEEDERS and n not in used]
        if not unused:
            break
        for node_id in unused:
            del api[node_id]
    for node in api.values():
        for name in node["inputs"]:
            if (node["class_type"], name) in TEST_FILES:
                node["inputs"][name] = TEST_FILES[node["class_type"], name]
        for name, value in (_cheap_inputs(node) if cheap else {}).items():
            if not _is_link(node["inputs"].get(name)):
                node["inputs"][name] = value
    return api


def check_against_object_info(api, object_info, user_files_allowed):
    """Every node type exists, has its required inputs and no unknown ones, and every combo value is allowed; the
    model files a user picks (user_files_allowed) need only be file names."""
    for node_id, node in api.items():
        assert node["class_type"] in object_info, f"node {node_id} type {node['class_type']} unknown"
        spec = object_info[node["class_type"]]["input"]
        known = {**spec.get("required", {}), **spec.get("optional", {})}
        assert set(spec.get("required", {})) <= set(node["inputs"]), (node_id, set(spec["required"]) - set(node["inputs"]))
        for name, value in node["inputs"].items():
            assert name in known, f"node {node_id} ({node['class_type']}) has no input {name}"
            if _is_link(value):
                source = api[value[0]]["class_type"]
                produced = object_info[source]["output"][value[1]]
                wanted = known[name][0] if not isinstance(known[name][0], list) else "COMBO"
                assert produced == wanted or "*" in (produced, wanted) or wanted in produced.split(","), \
                    f"node {node_id}.{name} wants {wanted}, gets {produced} from {source}"
                continue
            options = combo_options(known[name])
            if options is None:
                continue
            if user_files_allowed and (node["class_type"], name) in USER_FILE_INPUTS:
                assert isinstance(value, str) and "." in value, f"node {node_id}.{name}={value!r} is no file name"
            else:
                assert value in options, f"node {node_id} {name}={value!r} not among {options}"


@pytest.fixture(scope="module")
def test_files(host_base, inproc):
    """The input photo for LoadImage and TAESD3 (the SD3 workflow's decoder) in the test base: the real one from
    ../shared/models/taesd, or a seeded stand-in where that is absent."""
    import numpy as np
    from PIL import Image
    from safetensors.torch import save_file

    import comfy.taesd.taesd
    from modelzoo.tiny_host import seeded_init_
    from testbed.host import install_real_taesd

    # 64 px: the super-resolution workflow's DAPS runs its Langevin steps through the decoder at twice that side
    yy, xx = np.mgrid[0:64, 0:64]
    photo = np.stack([xx * 3.9, yy * 3.9, (xx + yy) * 1.95], axis=-1).astype(np.uint8)
    Image.fromarray(photo).save(host_base / "input" / TEST_IMAGE)
    approx = host_base / "models" / "vae_approx"
    # the real one where ../shared has it (the real-latent SD3 digit model's tests decode with the same file)
    if install_real_taesd(host_base, ["taesd3"]) and not (approx / "taesd3_decoder.safetensors").exists():
        taesd3 = comfy.taesd.taesd.TAESD(latent_channels=16)
        seeded_init_(taesd3, 3)
        for part in ("encoder", "decoder"):
            state = {k: v.detach().contiguous() for k, v in getattr(taesd3, f"taesd_{part}").state_dict().items()}
            save_file(state, str(approx / f"taesd3_{part}.safetensors.tmp"))
            (approx / f"taesd3_{part}.safetensors.tmp").rename(approx / f"taesd3_{part}.safetensors")
    return host_base


@pytest.fixture(scope="module")
def object_info(server, test_files):
    return Client(server.address).object_info()


def test_every_workflow_is_indexed_and_has_both_formats():
    assert NAMES
    for name in NAMES:
        assert name in INDEX, name
        assert ui_workflow_path(name).exists(), f"{ui_workflow_path(name).name} missing"
    # the UI folder holds only UI workflows: ComfyUI's Templates browser offers every *.json in it
    assert sorted(p.stem for p in WORKFLOW_DIR.glob("*.json")) == sorted(NAMES)
    capabilities = {entry["capability"] for entry in INDEX.values()}
    assert {"fast samplers", "timestep optimizer", "feature caching", "restoration"} <= capabilities, capabilities


@pytest.mark.parametrize("name", NAMES)
def test_workflow_matches_live_object_info(name, object_info):
    api = _api(name)
    check_against_object_info(api, object_info, user_files_allowed=True)
    check_against_object_info(for_test_models(api, cheap=False), object_info, user_files_allowed=False)
    ui = _ui(name)
    expected = make_ui_workflows.ui_workflow(api, object_info, INDEX[name])
    if host_version() != (0, 3, 75):          # the host the UI files are made on
        expected = _without_added_outputs(expected, ui)
    assert ui == expected, "UI file out of date: run scripts/make_ui_workflows.py (on ComfyUI 0.3.75)"
    assert canonical(ui_to_api(ui, object_info)) == canonical(_without_meta(api))


@pytest.mark.parametrize("name", [name for name in NAMES if INDEX.get(name, {}).get("groups")])
def test_ui_groups_box_every_node_once(name):
    """Each node lies inside exactly one titled group box, so the frontend shows which step of the recipe it is."""
    ui = _ui(name)
    boxes = ui["groups"]
    assert all(box["title"] for box in boxes)
    for a in range(len(boxes)):
        for b in range(a + 1, len(boxes)):
            (ax, ay, aw, ah), (bx, by, bw, bh) = boxes[a]["bounding"], boxes[b]["bounding"]
            assert ax + aw <= bx or bx + bw <= ax or ay + ah <= by or by + bh <= ay, "groups overlap"
    for node in ui["nodes"]:
        (x, y), (w, h) = node["pos"], node["size"]
        y, h = y - make_ui_workflows.NODE_TITLE, h + make_ui_workflows.NODE_TITLE   # the title bar sits above pos
        inside = [box["title"] for box in boxes if box["bounding"][0] <= x and x + w <= sum(box["bounding"][::2])
                  and box["bounding"][1] <= y and y + h <= sum(box["bounding"][1::2])]
        assert len(inside) == 1, (node["title"], inside)


_ran = set()


def _run(client, name):
    result = client.run(for_test_models(_api(name)))
    assert result.status == "success", (name, (result.error() or {}).get("exception_message"))
    _ran.add(name)
    return result


@pytest.mark.parametrize("name", NAMES)
def test_api_workflow_runs_end_to_end(name, client, test_files):
    required = INDEX.get(name, {}).get("requires")
    if required and required not in _ran:
        _run(client, required)
    result = _run(client, name)
    api = _api(name)
    saves = {node_id: SAVES[node["class_type"]] for node_id, node in api.items() if node["class_type"] in SAVES}
    assert saves and set(saves) <= set(result.outputs), f"workflow saved no image from {sorted(saves)}"
    for node_id, magic in saves.items():
        image = result.outputs[node_id]["images"][0]
        data = client.view(image["filename"], image.get("subfolder", ""), image["type"])
        assert data[:len(magic)] == magic, (node_id, data[:16])


@pytest.mark.parametrize("name", NAMES)
def test_shipped_workflow_passes_host_validation(name, inproc, test_files, monkeypatch):
    """The API file as shipped, with the user's model files in the folders their loaders list (the photo is the
    test image), passes the host's own validate_prompt: node types, links, types and every combo value."""
    import folder_paths
    api = _without_meta(_api(name))
    user_files = {}
    for node in api.values():
        for input_name, value in node["inputs"].items():
            folder = USER_FILE_FOLDERS.get((node["class_type"], input_name))
            if folder:
                user_files.setdefault(folder, []).append(value)
            elif (node["class_type"], input_name) == ("LoadImage", "image"):
                node["inputs"][input_name] = TEST_IMAGE
    listed = folder_paths.get_filename_list
    monkeypatch.setattr(folder_paths, "get_filename_list",
                        lambda folder: sorted(set(listed(folder)) | set(user_files.get(folder, []))))
    saves = {n for n, node in api.items() if node["class_type"] in SAVES}
    assert saves and saves <= set(inproc.validate(api))


def test_registry_metadata():
    """What the Comfy Registry reads (pyproject [project] and [tool.comfy]), a licence and a changelog for this
    version, and runtime requirements that never pin torch (it comes from the user's ComfyUI)."""
    import re
    import tomllib
    meta = tomllib.loads((PACK_DIR / "pyproject.toml").read_text())
    project, comfy = meta["project"], meta["tool"]["comfy"]
    assert re.fullmatch(r"[A-Za-z][A-Za-z0-9_.-]{0,98}", project["name"]) and "comfyui" not in project["name"].lower()
    assert re.fullmatch(r"\d+\.\d+\.\d+", project["version"])
    assert project["urls"]["Repository"].startswith("https://")
    assert comfy["PublisherId"] and comfy["DisplayName"]
    assert (PACK_DIR / project["license"]["file"]).read_text().strip()
    assert f"## {project['version']}" in (PACK_DIR / "CHANGELOG.md").read_text()
    requirements = [line.split("#")[0].strip() for line in (PACK_DIR / "requirements.txt").read_text().splitlines()]
    for requirement in [r for r in requirements if r] + project["dependencies"]:
        assert re.match(r"[A-Za-z0-9_.-]+", requirement).group(0).lower() not in {"torch", "torchvision",
                                                                                 "torchaudio"}, requirement
