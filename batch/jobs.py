"""Jobs of a batch: a workflow in API format plus, per job, values for some of its inputs.

Inputs are addressed as `node_id.input`, `Node Title.input` (the title in `_meta` or, for UI documents, the node's
title) or a bare alias for the common widget names below, which sets every matching input of the graph (so `seed`
sets both a KSampler's `seed` and a SamplerCustom's `noise_seed`). A key that addresses nothing is an error listing
what the workflow has.
"""
import csv
import hashlib
import itertools
import json
from dataclasses import dataclass, field

from batch.workflow_format import ui_to_api

ALIASES = {"seed": ("seed", "noise_seed"), "steps": ("steps",), "sampler_name": ("sampler_name",),
           "scheduler": ("scheduler",), "cfg": ("cfg",), "denoise": ("denoise",), "text": ("text",)}


class BatchInputError(ValueError):
    """The batch's own input (workflow, grid, jobs file) is wrong; the message says what and what exists."""


@dataclass
class Job:
    job_id: str
    params: dict                 # grid key -> value, as the user gave them
    prompt: dict                 # the API graph with the values applied
    role: str = "job"            # "job" or "reference"
    reference_id: str = ""       # the reference job this one is compared with, if any
    targets: dict = field(default_factory=dict)   # "node.input" -> value actually set

    def steps(self):
        """The `steps` inputs of the graph (the NFE stand-in when the server reports no progress)."""
        return sum(int(node["inputs"]["steps"]) for node in self.prompt.values()
                   if isinstance(node["inputs"].get("steps"), (int, float)))

    def seeds(self):
        return [node["inputs"][name] for node in self.prompt.values() for name in ALIASES["seed"]
                if isinstance(node["inputs"].get(name), int)]


def is_ui_format(workflow):
    return isinstance(workflow, dict) and isinstance(workflow.get("nodes"), list) and "links" in workflow


def load_workflow(path, object_info=None):
    """The API graph in `path` (API or UI format; UI needs the server's /object_info) and the node titles."""
    try:
        with open(path) as f:
            workflow = json.load(f)
    except OSError as e:
        raise BatchInputError(f"cannot read workflow {path}: {e.strerror}") from e
    except json.JSONDecodeError as e:
        raise BatchInputError(f"workflow {path} is not JSON: {e}") from e
    return to_api(workflow, object_info, str(path))


def to_api(workflow, object_info=None, name="workflow"):
    if is_ui_format(workflow):
        if object_info is None:
            raise BatchInputError(f"{name} is a UI-format workflow: converting it needs a server's /object_info")
        missing = sorted({n["type"] for n in workflow["nodes"]} - set(object_info))
        if missing:
            raise BatchInputError(f"{name} uses node types the server does not have: {', '.join(missing)}")
        api = ui_to_api(workflow, object_info)
        for node in workflow["nodes"]:
            if node.get("title"):
                api[str(node["id"])]["_meta"] = {"title": node["title"]}
        return api
    if not isinstance(workflow, dict) or not all(isinstance(v, dict) and "class_type" in v for v in workflow.values()):
        raise BatchInputError(f"{name} is neither an API-format graph ({{id: {{class_type, inputs}}}}) "
                              "nor a UI-format document (nodes + links)")
    return workflow


def _known_inputs(api, object_info):
    """node_id -> input names that may be set: those in the graph plus, with /object_info, those the node type has."""
    known = {}
    for node_id, node in api.items():
        names = set(node.get("inputs", {}))
        info = (object_info or {}).get(node["class_type"])
        if info:
            for section in ("required", "optional"):
                names |= set(info.get("input", {}).get(section, {}))
        known[node_id] = names
    return known


def resolve_key(key, api, object_info=None):
    """The (node_id, input) pairs a grid key addresses; BatchInputError naming what exists if none."""
    known = _known_inputs(api, object_info)
    if "." in key:
        node_ref, name = key.rsplit(".", 1)
        nodes = [nid for nid, node in api.items()
                 if nid == node_ref or node.get("_meta", {}).get("title") == node_ref]
        if not nodes:
            listing = ", ".join(f"{nid} ({node.get('_meta', {}).get('title', node['class_type'])})"
                                for nid, node in api.items())
            raise BatchInputError(f"grid key {key!r}: no node with id or title {node_ref!r}; nodes: {listing}")
        targets = [(nid, name) for nid in nodes if name in known[nid]]
        if not targets:
            raise BatchInputError(f"grid key {key!r}: node {node_ref} ({api[nodes[0]]['class_type']}) has no input "
                                  f"{name!r}; its inputs: {', '.join(sorted(known[nodes[0]]))}")
        return targets
    names = ALIASES.get(key, (key,))
    targets = [(nid, name) for nid, node in api.items() for name in names if name in node.get("inputs", {})
               and not isinstance(node["inputs"][name], list)]
    if not targets:
        widgets = sorted({f"{nid}.{name}" for nid, node in api.items() for name, v in node.get("inputs", {}).items()
                          if not isinstance(v, list)})
        raise BatchInputError(f"grid key {key!r} matches no input of the workflow; use node_id.input or "
                              f"Title.input. Settable inputs: {', '.join(widgets)}")
    return targets


def parse_value(text):
    """A grid value from the command line or a CSV cell: JSON numbers/booleans as such, anything else a string."""
    text = text.strip()
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return text
    return value if isinstance(value, (int, float, bool)) else text


def parse_grid(specs):
    """["seed=1,2,3", "3.sampler_name=euler,qs_dpmpp_2m", "1-4"...] -> {key: [values]} (`a..b` = integer range)."""
    grid = {}
    for spec in specs:
        if "=" not in spec:
            raise BatchInputError(f"grid entry {spec!r} is not KEY=VALUE[,VALUE...]")
        key, values = spec.split("=", 1)
        items = []
        for part in values.split(","):
            if ".." in part and all(p.strip().lstrip("-").isdigit() for p in part.split("..", 1)):
                lo, hi = (int(p) for p in part.split("..", 1))
                items.extend(range(lo, hi + 1))
            elif part.strip():
                items.append(parse_value(part))
        if not items:
            raise BatchInputError(f"grid entry {spec!r} has no values")
        grid[key.strip()] = items
    return grid


def read_jobs_csv(path):
    """One job per row; the header names the grid keys; an empty cell keeps the workflow's value."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError as e:
        raise BatchInputError(f"cannot read jobs file {path}: {e.strerror}") from e
    if not rows:
        raise BatchInputError(f"jobs file {path} has no rows")
    return [{k.strip(): parse_value(v) for k, v in row.items() if k and v is not None and v.strip() != ""}
            for row in rows]


def _job_id(prompt, seen):
    digest = hashlib.sha1(json.dumps(prompt, sort_keys=True).encode()).hexdigest()[:12]
    seen[digest] = seen.get(digest, 0) + 1
    return digest if seen[digest] == 1 else f"{digest}-{seen[digest]}"


def _name_outputs(prompt, job_id):
    """Puts the job id into every saved file's name prefix. Servers that share one output folder (several instances
    of one install) number their files by scanning that folder, so two jobs saving at once could both write
    `prefix_00001_.png` and each server would then serve the other's image as its own job's."""
    for node in prompt.values():
        prefix = node["inputs"].get("filename_prefix")
        if isinstance(prefix, str):
            node["inputs"]["filename_prefix"] = f"{prefix}_{job_id}"


def _apply(api, params, object_info):
    prompt = json.loads(json.dumps(api))
    targets = {}
    for key, value in params.items():
        for node_id, name in resolve_key(key, api, object_info):
            prompt[node_id]["inputs"][name] = value
            targets[f"{node_id}.{name}"] = value
    return prompt, targets


def build_jobs(api, grid=None, rows=None, reference=None, object_info=None):
    """The jobs of a batch: the product of `grid` ({key: [values]}) or one per row of `rows` (list of {key: value}),
    and, with `reference` ({key: value}), one reference job per distinct job-with-reference-values applied.
    Job ids are content hashes of the graph with the values applied, so a resumed batch recognises its finished jobs;
    each job's saved files then carry its id (`_name_outputs`)."""
    if rows is None:
        grid = grid or {}
        keys = list(grid)
        rows = [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]
    problems = []
    for key in dict.fromkeys([k for row in rows for k in row] + list(reference or {})):
        try:
            resolve_key(key, api, object_info)
        except BatchInputError as e:
            problems.append(str(e))
    if problems:   # all of them, before anything runs
        raise BatchInputError("\n".join(problems))
    seen, jobs, references = {}, [], {}
    for params in rows:
        prompt, targets = _apply(api, params, object_info)
        job = Job(_job_id(prompt, seen), params, prompt, targets=targets)
        _name_outputs(prompt, job.job_id)
        if reference:
            ref_params = {**params, **reference}
            ref_prompt, ref_targets = _apply(api, ref_params, object_info)
            key = json.dumps(ref_prompt, sort_keys=True)
            if key not in references:
                references[key] = Job(_job_id(ref_prompt, seen), ref_params, ref_prompt, role="reference",
                                      targets=ref_targets)
                _name_outputs(ref_prompt, references[key].job_id)
            job.reference_id = references[key].job_id
        jobs.append(job)
    return list(references.values()) + jobs
