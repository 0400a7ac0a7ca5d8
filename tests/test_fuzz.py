"""Property-based fuzzing of every Quickstep node through the real server's POST /prompt.

Graphs are built from the live /object_info: one Quickstep node per graph, each widget input drawn from adversarial
values (beyond min/max, NaN/inf, wrong combo values, odd text), each link input fed by a small stock or test node
(itself fuzzed where it matters: SIGMAS from text such as "", "1", "3,nan", "1,2"). Every prompt must end in a
validation error, a success, or an execution_error raised on purpose (a ValueError naming the node, never an
internal AttributeError/TypeError/...); the server must stay up, and a fixed valid prompt must give the same image
bytes before and after the fuzzing.

The second test sends each node one bad input at a time (every widget input of every Quickstep node, and a wrong-typed
link for every link input) into a graph that runs with the node's defaults, and checks that the refusal names the
node and that input; the defaults themselves either finish within a minute or report progress; and the cached
models the failed prompts used sample exactly as before."""
import json
import math
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batch.workflow_format import widget_defaults
from graphs import oracle_sampling_graph
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
    "SIGMAS": {"class_type": "QuickstepSigmasFromText", "inputs": {"sigmas": "14.6, 3.0, 0.5, 0"}},
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
                    provider["inputs"] = {"sigmas": draw(st.sampled_from(SIGMA_TEXTS))}
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


# Link providers that let a node's defaults run where the oracle does not fit (the caches need a host network).
MODEL_FOR = {"QuickstepDeepCache": {"class_type": "QuickstepTestTinyModel", "inputs": {"arch": "sd15", "seed": 0}},
             "QuickstepBlockCache": {"class_type": "QuickstepTestTinyModel", "inputs": {"arch": "mmdit", "seed": 0}}}
INPUTS_FOR = {"QuickstepBlockCache": {"back_blocks": 0}}   # the 2-block test MMDiT needs a middle block to cache
# Nodes whose defaults cannot run from single cheap providers (their refusal names the node and what to connect):
# their inputs are fuzzed by the first test only.
NEEDS_A_CHAIN = {"QuickstepCacheCalibration": "a model that went through DeepCache / Block Cache",
                 "QuickstepRestorationSampler": "a measurement LATENT (an optional link) for the default method",
                 "QuickstepDigitToImage": "a digit model's latent (the LATENT provider gives a 4x8x8 one)",
                 "QuickstepLoadSchedule": "a schedule saved under the default name",
                 "QuickstepLoadSolver": "a solver saved under the default name",
                 "QuickstepSaveSolver": "the solver text of Optimize Solver For My Model",
                 "QuickstepSolverFromText": "the solver text of Optimize Solver For My Model",
                 "QuickstepRestoreImage": "a VAE for the provider's 4-channel model"}
SILENT_LIMIT_S = 60     # a node's defaults that run longer than this must report progress (the host's bar)
GARBAGE_TEXT = "\x00 ;;,, \u2603 ../../etc/passwd"


def _bad_values(kind, options):
    """(label, value) pairs that a node must refuse for a widget input of this spec; STRING values may be accepted
    (free text), but refused ones must name the input."""
    if isinstance(kind, list) or kind == "COMBO":
        return [("wrong combo", "not-an-option"), ("empty combo", "")]
    if kind == "FLOAT":
        values = [("NaN", math.nan), ("inf", math.inf), ("-inf", -math.inf)]
        values += [("below min", options["min"] - 1.0)] if "min" in options else []
        return values + ([("above max", options["max"] + 1.0)] if "max" in options else [])
    if kind == "INT":
        values = [("below min", options["min"] - 1)] if "min" in options else []
        return values + ([("above max", options["max"] + 1)] if "max" in options else [])
    if kind == "STRING":
        return [("empty text", ""), ("garbage text", GARBAGE_TEXT)]
    return []


def _default_graph(object_info, name):
    """`name` with its widget defaults and a cheap provider on every required link; None if a link has none."""
    spec = object_info[name]
    graph, inputs = {}, {}
    for input_name, entry in spec["input"].get("required", {}).items():
        kind = entry[0]
        if _widget_values(kind, entry[1] if len(entry) > 1 else {}) is not None:
            continue
        provider = MODEL_FOR.get(name) if kind == "MODEL" else None
        provider = dict(provider or PROVIDERS.get(kind) or {})
        if not provider:
            return None
        if provider["inputs"] is None:
            provider["inputs"] = widget_defaults(object_info, provider["class_type"])
        graph[f"p_{input_name}"] = provider
        inputs[input_name] = [f"p_{input_name}", 0]
    graph["fuzzed"] = {"class_type": name,
                       "inputs": {**widget_defaults(object_info, name), **inputs, **INPUTS_FOR.get(name, {})}}
    if spec.get("output"):
        graph["sink"] = {"class_type": "PreviewAny", "inputs": {"source": ["fuzzed", 0]}}
    return graph


def _run_stopping_at_progress(client, graph):
    """Run `graph`; the first progress event of the fuzzed node interrupts it (it says that it is working, which is
    all this test asks of a long run). Returns (result, saw_progress, wall seconds)."""
    seen = []

    def on_event(c, kind, data):
        if kind == "progress" and data.get("node") == "fuzzed" and not seen:
            seen.append(True)
            c.interrupt()

    t0 = time.time()
    result = client.run(graph, timeout=600, on_event=on_event)
    return result, bool(seen), time.time() - t0


def _unclear(display, input_name, outcome):
    """Why a refusal is unclear (None when it names the node and the input)."""
    if isinstance(outcome, PromptRejected):
        errors = outcome.body.get("node_errors", {}).get("fuzzed", {}).get("errors", [])
        text = json.dumps(errors)
        return None if errors and input_name in text else f"validation error without the input: {text[:300]}"
    error = outcome.error()
    message = error["exception_message"]
    missing = [part for part in (display.split(" (")[0], input_name) if part not in message]   # "DeepCache (UNet)"
    return None if not missing else f"{error['exception_type']}: {message[:300]!r} does not name {missing}"


def _reference_latents(client):
    """What the cached oracle model (the fuzzer's MODEL provider) samples: a failed prompt must not change it."""
    result = client.run(oracle_sampling_graph("eps", "qs_dpmpp_2m", 4, batch=1))
    assert result.status == "success", result.error()
    return json.dumps(result.outputs["keep"])


def test_each_bad_input_alone_is_refused_naming_the_node_and_the_input(client, object_info, server):
    before = (_reference_latents(client), _digits_png(client))
    findings, checked, no_provider = [], 0, []
    for name in _quickstep_nodes(object_info):
        display = object_info[name].get("display_name") or name
        graph = _default_graph(object_info, name)
        if graph is None:
            no_provider.append(name)
            continue
        base, reported, wall = _run_stopping_at_progress(client, graph)
        if base.status == "error":
            message = base.error()["exception_message"]
            if name not in NEEDS_A_CHAIN or not message.startswith(display):
                findings.append(f"{name}: its defaults fail: {message[:300]!r}")
            continue
        if not reported and wall > SILENT_LIMIT_S:
            findings.append(f"{name}: its defaults ran {wall:.0f} s without a progress event")
        spec = object_info[name]["input"]
        entries = {**spec.get("optional", {}), **spec.get("required", {})}
        for input_name, entry in entries.items():
            kind, options = entry[0], (entry[1] if len(entry) > 1 else {})
            cases = [(label, value) for label, value in _bad_values(kind, options)]
            if input_name in graph["fuzzed"]["inputs"] and isinstance(graph["fuzzed"]["inputs"][input_name], list):
                cases = [("wrong-typed link", ["p_wrong_type", 0])]
            for label, value in cases:
                bad = json.loads(json.dumps(graph))
                if label == "wrong-typed link":
                    wrong = "LATENT" if kind != "LATENT" else "MODEL"
                    bad["p_wrong_type"] = dict(PROVIDERS[wrong])
                bad["fuzzed"]["inputs"][input_name] = value
                checked += 1
                try:
                    result, _, _ = _run_stopping_at_progress(client, bad)
                except PromptRejected as rejected:
                    problem = _unclear(display, input_name, rejected)
                else:
                    if result.status == "error":
                        error = result.error()
                        if error["exception_type"].split(".")[-1] in INTERNAL_ERRORS:
                            problem = f"internal {error['exception_type']}: {error['exception_message'][:300]!r}"
                        else:
                            problem = _unclear(display, input_name, result)
                    else:
                        problem = None if kind == "STRING" else f"accepted ({result.status})"
                if problem:
                    findings.append(f"{name} ({display}).{input_name} = {label} {value!r}: {problem}")
        assert server.alive(), server.log()[-3000:]
    print(f"\n{checked} single bad inputs over {len(_quickstep_nodes(object_info)) - len(no_provider)} nodes; "
          f"no link provider for {no_provider}")
    print("\n".join(findings))
    assert (_reference_latents(client), _digits_png(client)) == before
    assert not no_provider
    assert not findings, "\n".join(findings)
