"""Writes workflows/<name>.json (the frontend's format, laid out and grouped) for every workflows/api/<name>.api.json,
from the live /object_info of the real host. Run after changing an API workflow, its entry in workflows/api/index.json
or a node's inputs; a test fails when the files disagree.

index.json gives each workflow a title and, optionally, titled groups of node ids that explain the graph
("1. Your checkpoint and prompt", ...): each group becomes a box of its own, left to right, its nodes in columns by
their depth in the graph. A workflow without groups is boxed whole under its title.
usage: .host/venv/bin/python scripts/make_ui_workflows.py"""
import json
import sys
from pathlib import Path

PACK_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PACK_DIR))

# _depths: the column of each node in api_to_ui's own layout, reused so a group's columns follow the same order
from batch.workflow_format import _depths, api_to_ui  # noqa: E402
from testbed.host import WORKFLOW_INDEX, api_workflow_path, ui_workflow_path, workflow_names  # noqa: E402

NODE_WIDTH = 320          # at least; a long node title widens its column
NODE_TITLE_CHAR_WIDTH = 8  # rough width of one character of a node title (the frontend widens a node to fit it)
COLUMN_GAP = 40
ROW_GAP = 30
GROUP_GAP = 60
ROW_WIDTH = 2000          # groups wrap to a new row past this x
GROUP_PAD = 15
GROUP_TITLE = 40          # a group's title bar
NODE_TITLE = 30           # a node's title bar, drawn above its position (LiteGraph.NODE_TITLE_HEIGHT)
TITLE_CHAR_WIDTH = 12     # rough width of one character of a group title at font size 20
GROUP_COLORS = ["#3f789e", "#8a6d3b", "#3f7e5a", "#7e3f6a", "#5a5a8a", "#8a4a3b"]


def _node_width(ui_node):
    return max(NODE_WIDTH, len(ui_node["title"]) * NODE_TITLE_CHAR_WIDTH + 60)


def _node_height(ui_node):
    """About the height the frontend draws a node's body at (below its title bar): one row per linked input or
    output, one per widget, room for a text box or an image preview."""
    slots = max(sum(1 for i in ui_node["inputs"] if "widget" not in i), len(ui_node["outputs"]))
    widgets = len(ui_node["widgets_values"])
    extra = {"CLIPTextEncode": 80, "SaveImage": 260, "LoadImage": 260}.get(ui_node["type"], 0)   # text box, preview
    return 20 + 22 * slots + 26 * widgets + extra


def _lay_out_groups(ui, api, groups):
    """Moves the nodes of `ui` (ids numbered as api_to_ui numbers them) into one box per group; boxes run left to
    right and wrap to a new row past ROW_WIDTH, so the recipe reads like text."""
    ui_id = {node_id: i + 1 for i, node_id in enumerate(api)}
    by_id = {n["id"]: n for n in ui["nodes"]}
    depth = _depths(api)
    grouped = [node_id for group in groups for node_id in group["nodes"]]
    if sorted(grouped) != sorted(api):
        raise ValueError(f"groups must hold every node exactly once: {sorted(grouped)} vs {sorted(api)}")
    boxes = []
    x, y, row_height = 10, 10, 0
    for k, group in enumerate(groups):
        columns = sorted({depth[n] for n in group["nodes"]})
        col_width = {d: max(_node_width(by_id[ui_id[n]]) for n in group["nodes"] if depth[n] == d) for d in columns}
        width = max(sum(col_width.values()) + COLUMN_GAP * (len(columns) - 1) + 2 * GROUP_PAD,
                    len(group["title"]) * TITLE_CHAR_WIDTH + 2 * GROUP_PAD)
        if x > 10 and x + width > ROW_WIDTH:
            x, y, row_height = 10, y + row_height + GROUP_GAP, 0
        col_x, left = {}, x + GROUP_PAD
        for d in columns:
            col_x[d], left = left, left + col_width[d] + COLUMN_GAP
        col_y = {d: y + GROUP_TITLE + NODE_TITLE for d in columns}
        for node_id in group["nodes"]:
            node = by_id[ui_id[node_id]]
            height = _node_height(node)
            node["pos"] = [col_x[depth[node_id]], col_y[depth[node_id]]]
            node["size"] = [col_width[depth[node_id]], height]
            col_y[depth[node_id]] += height + ROW_GAP + NODE_TITLE
        height = max(col_y.values()) - y - ROW_GAP - NODE_TITLE + GROUP_PAD
        boxes.append({"title": group["title"], "bounding": [x, y, width, height],
                      "color": GROUP_COLORS[k % len(GROUP_COLORS)], "font_size": 20, "flags": {}})
        x += width + GROUP_GAP
        row_height = max(row_height, height)
    ui["groups"] = boxes
    return ui


def ui_workflow(api, object_info, entry):
    """The UI document for an API workflow and its index.json entry."""
    ui = api_to_ui(api, object_info, entry["title"])
    if entry.get("groups"):
        _lay_out_groups(ui, api, entry["groups"])
    return ui


def write_ui_workflows(object_info):
    index = json.loads(WORKFLOW_INDEX.read_text())
    written = []
    for name in workflow_names():
        ui = ui_workflow(json.loads(api_workflow_path(name).read_text()), object_info, index[name])
        ui_path = ui_workflow_path(name)
        ui_path.write_text(json.dumps(ui, indent=1) + "\n")
        written.append(ui_path)
    return written


def main():
    from testbed.host import HOST_DIR, Client, Server, prepare_base
    server = Server(prepare_base(HOST_DIR / "demobase"), HOST_DIR / "workflows-server.log").start()
    try:
        for path in write_ui_workflows(Client(server.address).object_info()):
            print("wrote", path)
    finally:
        server.stop()


if __name__ == "__main__":
    main()
