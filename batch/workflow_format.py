"""Converts between ComfyUI's two workflow formats using the live /object_info of a host:
- API format: {node_id: {"class_type", "inputs": {name: value or [source_id, slot]}}} (what POST /prompt takes);
- UI format: the LiteGraph document the frontend saves and loads (nodes with positions, links, widget values,
  groups).
`api_to_ui` lays the graph out in columns by depth and boxes it in one titled group; `ui_to_api` does what the
frontend's graphToPrompt does for plain graphs, so a test can check that both files describe the same graph.
"""
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
SEED_INPUTS = {"seed", "noise_seed"}


def combo_options(spec):
    """The allowed values of a combo input spec (v1: [options, {...}]; v3: ["COMBO", {"options": [...]}]), or None."""
    if isinstance(spec[0], list):
        return spec[0]
    if spec[0] == "COMBO":
        return spec[1].get("options", [])
    return None


def widget_defaults(object_info, class_type):
    """The default value of every required widget input of `class_type` (a combo's first option when it has no
    default): what a node dropped into the frontend starts with."""
    values = {}
    for name, spec in object_info[class_type]["input"].get("required", {}).items():
        if _is_widget(spec):
            options = spec[1] if len(spec) > 1 else {}
            values[name] = options.get("default", (combo_options(spec) or [None])[0])
    return values


def _inputs_in_order(info):
    order = info.get("input_order") or {s: list(info["input"].get(s, {})) for s in ("required", "optional")}
    for section in ("required", "optional"):
        for name in order.get(section, []):
            yield name, info["input"][section][name]


def _is_widget(spec):
    kind = spec[0]
    return isinstance(kind, list) or kind in WIDGET_TYPES


def _has_control_widget(name, spec):
    options = spec[1] if len(spec) > 1 else {}
    return spec[0] == "INT" and (name in SEED_INPUTS or options.get("control_after_generate"))


def _depths(api):
    depth = {}

    def visit(node_id, seen=()):
        if node_id in depth:
            return depth[node_id]
        if node_id in seen:
            raise ValueError(f"workflow has a cycle through node {node_id}")
        sources = [v[0] for v in api[node_id]["inputs"].values() if isinstance(v, list) and len(v) == 2]
        depth[node_id] = 1 + max((visit(s, seen + (node_id,)) for s in sources), default=-1)
        return depth[node_id]
    for node_id in api:
        visit(node_id)
    return depth


def api_to_ui(api, object_info, title):
    ids = {node_id: i + 1 for i, node_id in enumerate(api)}
    depth = _depths(api)
    rows = {}
    nodes, links = [], []
    outputs_of = {}
    for node_id, node in api.items():
        info = object_info[node["class_type"]]
        column = depth[node_id]
        row = rows.get(column, 0)
        rows[column] = row + 1
        inputs, widgets = [], []
        for name, spec in _inputs_in_order(info):
            value = node["inputs"].get(name)
            if isinstance(value, list) and len(value) == 2 and isinstance(value[1], int):
                link_id = len(links) + 1
                source = value[0]
                source_type = object_info[api[source]["class_type"]]["output"][value[1]]
                links.append([link_id, ids[source], value[1], ids[node_id], len(inputs), source_type])
                outputs_of.setdefault((source, value[1]), []).append(link_id)
                entry = {"name": name, "type": spec[0] if not isinstance(spec[0], list) else "COMBO", "link": link_id}
                if _is_widget(spec):   # a widget turned into an input keeps its place among the widget values
                    entry["widget"] = {"name": name}
                    widgets.append(None)
                    if _has_control_widget(name, spec):
                        widgets.append("fixed")
                inputs.append(entry)
            elif _is_widget(spec):
                widgets.append(value)
                if _has_control_widget(name, spec):
                    widgets.append("fixed")
            elif name in node["inputs"]:
                raise ValueError(f"node {node_id} ({node['class_type']}): input {name} must be a link")
        nodes.append({"id": ids[node_id], "type": node["class_type"], "pos": [40 + 340 * column, 60 + 190 * row],
                      "size": [300, 150], "flags": {}, "order": 0, "mode": 0, "inputs": inputs,
                      "outputs": [], "properties": {"Node name for S&R": node["class_type"]},
                      "widgets_values": widgets, "title": node.get("_meta", {}).get("title")
                      or info.get("display_name") or node["class_type"]})
    for order, (node_id, ui_node) in enumerate(sorted(zip(api, nodes), key=lambda kv: depth[kv[0]])):
        ui_node["order"] = order
        info = object_info[api[node_id]["class_type"]]
        ui_node["outputs"] = [{"name": name, "type": kind, "links": outputs_of.get((node_id, slot), []),
                               "slot_index": slot}
                              for slot, (name, kind) in enumerate(zip(info["output_name"], info["output"]))]
    width = 340 * (max(depth.values()) + 1) + 40
    height = 190 * max(rows.values()) + 80
    return {"last_node_id": len(nodes), "last_link_id": len(links), "nodes": nodes, "links": links,
            "groups": [{"title": title, "bounding": [10, 10, width, height], "color": "#3f789e", "font_size": 24}],
            "config": {}, "extra": {"ds": {"scale": 1.0, "offset": [0, 0]}}, "version": 0.4}


def ui_to_api(ui, object_info):
    """The API graph a UI document describes (node ids become the UI ids as strings)."""
    link_source = {link[0]: (str(link[1]), link[2]) for link in ui["links"]}
    api = {}
    for node in ui["nodes"]:
        info = object_info[node["type"]]
        linked = {i["name"]: i["link"] for i in node.get("inputs", []) if i.get("link") is not None}
        values = list(node.get("widgets_values", []))
        inputs = {}
        for name, spec in _inputs_in_order(info):
            if name in linked:
                inputs[name] = list(link_source[linked[name]])
                if _is_widget(spec):
                    values.pop(0)
                    if _has_control_widget(name, spec):
                        values.pop(0)
            elif _is_widget(spec) and values:
                inputs[name] = values.pop(0)
                if _has_control_widget(name, spec):
                    values.pop(0)
        api[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return api


def canonical(api):
    """An API graph with node ids renumbered in a fixed order, for comparing graphs across formats."""
    order = {node_id: str(i + 1) for i, node_id in enumerate(api)}
    out = {}
    for node_id, node in api.items():
        inputs = {k: ([order[v[0]], v[1]] if isinstance(v, list) and len(v) == 2 and v[0] in order else v)
                  for k, v in node["inputs"].items()}
        out[order[node_id]] = {"class_type": node["class_type"], "inputs": inputs}
    return out
