"""Writes workflows/<name>.ui.json (the frontend's format, laid out and grouped) for every workflows/<name>.api.json,
from the live /object_info of the real host. Run after changing an API workflow or a node's inputs; a test fails
when the two files disagree.
usage: .host/venv/bin/python scripts/make_ui_workflows.py"""
import json
import sys
from pathlib import Path

PACK_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PACK_DIR))

from testbed.host import HOST_DIR, Client, Server, prepare_base  # noqa: E402
from testbed.workflow_format import api_to_ui  # noqa: E402

WORKFLOWS = PACK_DIR / "workflows"


def write_ui_workflows(object_info):
    index = json.loads((WORKFLOWS / "index.json").read_text())
    written = []
    for api_path in sorted(WORKFLOWS.glob("*.api.json")):
        name = api_path.name[:-len(".api.json")]
        api = json.loads(api_path.read_text())
        ui = api_to_ui(api, object_info, index[name]["title"])
        ui_path = WORKFLOWS / f"{name}.ui.json"
        ui_path.write_text(json.dumps(ui, indent=1) + "\n")
        written.append(ui_path)
    return written


def main():
    server = Server(prepare_base(HOST_DIR / "demobase"), HOST_DIR / "workflows-server.log").start()
    try:
        for path in write_ui_workflows(Client(server.address).object_info()):
            print("wrote", path)
    finally:
        server.stop()


if __name__ == "__main__":
    main()
