"""The real ComfyUI frontend (comfyui_frontend_package, served by the real host) in headless Debian chromium, driven
by tests/frontend/check_workflows.js: the Templates browser lists exactly the pack's UI workflows, and each, fetched
as the browser fetches it, loads through the app's own load path with no missing node type and no broken link, and the frontend makes the same API graph of it as the workflow's .api.json; every Quickstep
node sits in the node library under the Quickstep menu with its display name; a workflow queued from the UI
finishes. The screenshot lands in test-artifacts/frontend.png.

Needs /usr/bin/chromium and npm playwright-core, which scripts/install_browser.sh installs (`make test` runs it
first); the test runs it too (a no-op once installed) and skips, with its reason, only where it cannot install."""
import json
import os
import subprocess
from pathlib import Path

import pytest

from testbed.host import HOST_DIR, WORKFLOW_INDEX, api_workflow_path
from testbed.workflow_format import canonical

PACK_DIR = Path(__file__).resolve().parent.parent
INDEX = json.loads(WORKFLOW_INDEX.read_text())
SCREENSHOT = PACK_DIR / "test-artifacts" / "frontend.png"
QUEUED = "digits_fast_sampling"   # needs no model file: the embedded digit model


def _graph(api):
    return canonical({k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in api.items()})


@pytest.fixture(scope="module")
def frontend(server, tmp_path_factory):
    install = subprocess.run(["bash", str(PACK_DIR / "scripts" / "install_browser.sh")], capture_output=True,
                             text=True, env=dict(os.environ, QS_HOST_DIR=str(HOST_DIR)))
    if install.returncode != 0:
        pytest.skip(f"chromium cannot be installed here: {install.stderr.strip()[-500:]}")
    SCREENSHOT.parent.mkdir(exist_ok=True)
    SCREENSHOT.unlink(missing_ok=True)
    result_path = tmp_path_factory.mktemp("frontend") / "result.json"
    env = dict(os.environ, COMFY_URL=f"http://{server.address}", PACK="quickstep", QUEUE=QUEUED,
               RESULT=str(result_path), SCREENSHOT=str(SCREENSHOT),
               NODE_PATH=str(HOST_DIR / "browser" / "node_modules"))
    run = subprocess.run(["node", str(PACK_DIR / "tests" / "frontend" / "check_workflows.js")], capture_output=True,
                         text=True, env=env, timeout=400)
    assert run.returncode == 0, run.stderr[-4000:] + run.stdout[-2000:]
    return json.loads(result_path.read_text())


def test_templates_browser_lists_exactly_the_ui_workflows(frontend):
    # API files and the index sit in workflows/api/, where the Templates browser does not look
    assert sorted(frontend["templates"].get("quickstep", [])) == sorted(INDEX)


def _absent_files(node, info):
    """The values of a flagged node that name a file the server's list for that input does not hold."""
    required = info[node["type"]]["input"]["required"]
    choices = {v for spec in required.values() if isinstance(spec[0], list) for v in spec[0]}
    files = {v for v in node["values"] if isinstance(v, str) and v.endswith((".safetensors", ".ckpt", ".pt", ".png", ".jpg", ".webp"))}
    return files - choices


@pytest.mark.parametrize("name", sorted(INDEX))
def test_ui_workflow_loads_in_the_frontend(name, frontend, client):
    report = frontend["workflows"][name]
    assert not report["missing"], f"frontend does not know node types {report['missing']}"
    # ComfyUI 0.33's frontend flags a loader whose file is not there (the user's SD1.5 checkpoint, photo): the
    # only flag allowed, and only where the file really is absent
    info = client.object_info()
    for node in report["flagged"]:
        assert _absent_files(node, info), f"the frontend flags {node['type']} {node['values']}"
    assert not report["broken"], report["broken"]
    assert (report["nodeCount"], report["linkCount"]) == (report["expectedNodes"], report["expectedLinks"])
    groups = [g["title"] for g in INDEX[name].get("groups", [])] or [INDEX[name]["title"]]
    assert report["groups"] == groups
    if INDEX[name].get("groups"):   # laid out by scripts/make_ui_workflows.py: as the frontend draws it
        assert not report["overlaps"], f"nodes drawn over each other: {report['overlaps']}"
        assert not report["outside"], f"nodes drawn outside every group: {report['outside']}"
    api = json.loads(api_workflow_path(name).read_text())
    assert _graph(report["prompt"]) == _graph(api), "the frontend queues another graph than the .api.json"


def test_quickstep_nodes_in_the_node_library(frontend, client):
    info = client.object_info()
    ours = sorted(n for n in info if n.startswith("Quickstep") and not n.startswith("QuickstepTest"))
    assert ours and set(ours) <= set(frontend["library"]), set(ours) - set(frontend["library"])
    for name in ours:
        entry = frontend["library"][name]
        assert entry["category"].startswith("Quickstep/"), (name, entry["category"])
        assert entry["title"] == info[name]["display_name"] and entry["title"] != name, (name, entry["title"])
        assert entry["description"], name


def test_workflow_queued_from_the_ui_finishes(frontend):
    queued = frontend["queued"]
    assert queued["status"] and queued["status"]["status_str"] == "success", queued
    assert queued["status"]["completed"] and queued["outputs"], queued
    assert SCREENSHOT.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
