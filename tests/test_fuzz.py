"""Property-based fuzzing of every Quickstep node through the real server's POST /prompt.

Graphs are built from the live /object_info: one Quickstep node per graph, each widget input drawn from adversarial
values (beyond min/max, NaN/inf, wrong combo values, odd text), each link input fed by a small stock or test node
(itself fuzzed where it matters: SIGMAS from text such as "", "1", "3,nan", "1,2"). Every prompt must end in a
validation error, a success, or an execution_error raised on purpose (a ValueError naming the node, never an
internal AttributeError/TypeError/...); the server must stay up, and a fixed valid prompt must give the same image
bytes before and after the fuzzing."""
import json
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batch.workflow_format import widget_defaults
from testbed.host import PromptRejected, api_workflow_path

WORKFLOW = api_workflow_path("digits_fast_sampling")
INTERNAL_ERRORS = {"AttributeError", "TypeError", "KeyError", "IndexError", "ZeroDivisionError", "NameError",
                   "UnboundLocalError", "AssertionError"}
PROVIDERS = {          # link type -> a cheap node producing it (graph id "p_<type>")
    "MODEL": {"class_type": "QuickstepTestOracle", "inputs": {"family": "eps", "mixture_seed": 0}},
    "CONDITIONING": {"class_type": "QuickstepTestConditioning", "inputs": {"arch": "sd15", "seed": 0,
                                                                          "context_dim": 0}},
    "LATENT": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
    "SAMPLER": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "qs_dpmpp_2m"}},
    "IMAGE": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0}},
    "MASK": {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 32, "height": 48}},
    "SIGMAS": {"class_type": "QuickstepSigmasFromText", "inputs": {"text": "14.6, 3.0, 0.5, 0"}},
    "QUICKSTEP_OPERATOR": {"class_type": "QuickstepDegradationOperator", "inputs": None},   # its own defaults
}
SIGMA_TEXTS = ["", "1", "0", "3, nan", "inf, 1, 0", "1, 2", "1, 1, 0", "-1, 0", "14.6, 0", "abc", "1e40, 0"]


def _quickstep_nodes(object_info):
    return sorted(name for name, spec in object_info.items()
                  if name.startswith("Quickstep") and not spec.get("category", "").startswith("Quickstep/testbed"))


def _widget_values(kind, options):
    """Adversarial values for one widget input, by its object_info spec."""
    if isinstance(kind, list) or kind == "COMBO":
        choices = kind if isinstance(kind, list) else options.get("options", [])
        return st.sampled_from(list(choices) + ["not-an-option", ""])
    if kind == "INT":
        low, high = options.get("min", -2 ** 31), options.get("max", 2 ** 31)
        return st.sampled_from([low, high, low - 1, high + 1, options.get("default", 0), 0, -1])
    if kind == "FLOAT":
        low, high = options.get("min", -1e9), options.get("max", 1e9)
        return st.sampled_from([low, high, low - 1.0, high + 1.0, math.nan, math.inf, -math.inf,
                                options.get("default", 0.0)])
    if kind == "BOOLEAN":
        return st.sampled_from([True, False])
    if kind == "STRING":
        return st.sampled_from(SIGMA_TEXTS + [options.get("default", "")])
    return None


@st.composite
def fuzz_graphs(draw, object_info):
    name = draw(st.sampled_from(_quickstep_nodes(object_info)))
    spec = object_info[name]
    graph, inputs = {}, {}
    sections = [("required", spec["input"].get("required", {}))]
    sections.append(("optional", spec["input"].get("optional", {})))
    for section, entries in sections:
        for input_name, entry in entries.items():
            kind, options = entry[0], (entry[1] if len(entry) > 1 else {})
            if section == "optional" and not draw(st.booleans()):
                continue
            values = _widget_values(kind, options)
            if values is not None:
                inputs[input_name] = draw(values)
            elif kind in PROVIDERS:
                provider = dict(PROVIDERS[kind])
                if provider["inputs"] is None:
                    provider["inputs"] = widget_defaults(object_info, provider["class_type"])
                elif kind == "SIGMAS":
                    provider["inputs"] = {"text": draw(st.sampled_from(SIGMA_TEXTS))}
                elif kind == "MODEL":
                    provider["inputs"] = {**provider["inputs"], "family": draw(st.sampled_from(["eps", "v", "flow"]))}
                graph[f"p_{kind}"] = provider
                inputs[input_name] = [f"p_{kind}", 0]
            elif section == "required":
                return None                                  # no cheap provider for this link type
    graph["fuzzed"] = {"class_type": name, "inputs": inputs}
    if spec.get("output"):
        graph["sink"] = {"class_type": "PreviewAny", "inputs": {"source": ["fuzzed", 0]}}
    return graph


def _digits_png(client):
    prompt = json.loads(WORKFLOW.read_text())
    prompt["4"]["inputs"]["batch_size"] = 2
    prompt["5"]["inputs"]["steps"] = 3
    result = client.run(prompt)
    assert result.status == "success"
    image = result.outputs["7"]["images"][0]
    return client.view(image["filename"], image.get("subfolder", ""))


@pytest.fixture(scope="module")
def object_info(server):
    from testbed.host import Client
    return Client(server.address).object_info()


FUZZED = []


def test_every_fuzzed_prompt_fails_cleanly_and_the_server_stays_clean(client, object_info, server):
    before = _digits_png(client)

    @settings(max_examples=60, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(fuzz_graphs(object_info))
    def submit(graph):
        if graph is None:
            return
        try:
            result = client.run(graph, timeout=120)
        except PromptRejected as rejected:          # validation error: fine, it names the node and the input
            assert rejected.status == 400 and rejected.body.get("error"), rejected.body
            FUZZED.append(("rejected", graph["fuzzed"]["class_type"]))
            return
        assert result.status in ("success", "error"), result.status
        if result.status == "error":
            error = result.error()
            assert error["exception_type"].split(".")[-1] not in INTERNAL_ERRORS, (graph, error["exception_message"],
                                                                                  error.get("traceback", [])[-3:])
            assert error["exception_message"].strip(), graph
        FUZZED.append((result.status, graph["fuzzed"]["class_type"]))
        assert server.alive(), server.log()[-3000:]

    submit()
    assert server.alive(), server.log()[-3000:]
    kinds = {status for status, _ in FUZZED}
    print(f"\nfuzzed {len(FUZZED)} prompts over {len({n for _, n in FUZZED})} Quickstep nodes: "
          + ", ".join(f"{k} {sum(1 for s, _ in FUZZED if s == k)}" for k in sorted(kinds)))
    assert len(FUZZED) >= 30 and "rejected" in kinds and "error" in kinds
    assert _digits_png(client) == before
