"""Shared workflows stay valid against the live /object_info of the real host, their UI and API files describe the
same graph, and every API workflow runs end to end through the HTTP server."""
import json
from pathlib import Path

import pytest

from testbed.host import Client

from testbed.workflow_format import api_to_ui, canonical, combo_options, ui_to_api

WORKFLOWS = Path(__file__).resolve().parent.parent / "workflows"
API_FILES = sorted(WORKFLOWS.glob("*.api.json"))
INDEX = json.loads((WORKFLOWS / "index.json").read_text())


def _name(path):
    return path.name[:-len(".api.json")]


def _without_meta(api):
    return {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in api.items()}


@pytest.fixture(scope="module")
def object_info(server):
    return Client(server.address).object_info()


def test_every_workflow_is_indexed_and_has_both_formats():
    assert API_FILES
    for path in API_FILES:
        assert _name(path) in INDEX, path.name
        assert (WORKFLOWS / f"{_name(path)}.ui.json").exists(), f"{_name(path)}.ui.json missing"


@pytest.mark.parametrize("path", API_FILES, ids=_name)
def test_workflow_matches_live_object_info(path, object_info):
    api = json.loads(path.read_text())
    for node_id, node in api.items():
        assert node["class_type"] in object_info, f"{path.name}: node {node_id} type {node['class_type']} unknown"
        spec = object_info[node["class_type"]]["input"]
        known = {**spec.get("required", {}), **spec.get("optional", {})}
        assert set(spec.get("required", {})) <= set(node["inputs"]), (path.name, node_id)
        for name, value in node["inputs"].items():
            assert name in known, f"{path.name}: node {node_id} has no input {name}"
            options = combo_options(known[name])
            if options is not None and not isinstance(value, list):
                assert value in options, f"{path.name}: node {node_id} {name}={value!r} not among {options}"
    ui = json.loads((WORKFLOWS / f"{_name(path)}.ui.json").read_text())
    assert ui == api_to_ui(api, object_info, INDEX[_name(path)]["title"]), \
        "UI file out of date: run scripts/make_ui_workflows.py"
    assert canonical(ui_to_api(ui, object_info)) == canonical(_without_meta(api))


@pytest.mark.parametrize("path", API_FILES, ids=_name)
def test_api_workflow_runs_end_to_end(path, client):
    result = client.run(json.loads(path.read_text()))
    assert result.status == "success", result.error()
    images = [image for output in result.outputs.values() for image in output.get("images", [])]
    assert images, "workflow saved no image"
    png = client.view(images[0]["filename"], images[0].get("subfolder", ""), images[0]["type"])
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
