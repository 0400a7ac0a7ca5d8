"""The real ComfyUI executor in this process (no socket): validate_prompt + PromptExecutor over the real nodes, with
the /ws traffic captured. Import order matters: the host's args must be set before comfy.model_management loads.
"""
import asyncio
import inspect
import uuid
from dataclasses import dataclass, field

from .host import ensure_python_path, host_version, prepare_base

# 0.3.75's prompt validation checks a v1 combo's value against its options but lets any v3 io.Combo value through
# to the node; 0.33.0's checks v3 ones too (the versions between were not tried).
HOST_VALIDATES_V3_COMBOS = host_version() > (0, 3, 75)


class EventRecorder:
    """Stands in for PromptServer.send_sync: collects what the server would have pushed over /ws."""

    def __init__(self):
        self.events = []

    def __call__(self, event, data, sid=None):
        self.events.append((event, data))


@dataclass
class InProcessResult:
    prompt_id: str
    status: str                   # "success", "error" or "interrupted"
    outputs: dict = field(default_factory=dict)   # node id -> the node's output values (tensors, not JSON)
    ui: dict = field(default_factory=dict)        # node id -> the ui dict the node returned (history "outputs")
    events: list = field(default_factory=list)
    messages: list = field(default_factory=list)  # the executor's status messages

    def error(self):
        for kind, data in self.messages:
            if kind == "execution_error":
                return data
        return None

    def progress(self):
        return [(d.get("node"), d["value"], d["max"]) for k, d in self.events if k == "progress"]


class ValidationFailed(Exception):
    def __init__(self, error, node_errors):
        super().__init__(f"prompt failed validation: {error} {node_errors}")
        self.error, self.node_errors = error, node_errors


class InProcessHost:
    def __init__(self, base):
        ensure_python_path()
        prepare_base(base, with_testbed_nodes=True)
        from comfy.cli_args import args   # parse_args([]): pytest's argv is ignored
        args.cpu = True
        args.use_pytorch_cross_attention = True
        args.disable_api_nodes = True
        args.base_directory = str(base)
        # utils.* must be imported before nodes: nodes.py puts ComfyUI/comfy first on sys.path, after which
        # 'utils' would resolve to comfy/utils.py.
        import utils.extra_config  # noqa: F401
        import utils.install_util  # noqa: F401
        import folder_paths
        folder_paths.set_output_directory(str(base / "output"))
        folder_paths.set_temp_directory(str(base / "temp"))
        folder_paths.set_input_directory(str(base / "input"))
        import comfy.model_management
        import comfy.utils
        import execution
        import nodes
        import server
        from comfy_execution.utils import get_executing_context

        self.base = base
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        self.server = server.PromptServer(loop)   # sets PromptServer.instance; its routes are not served
        self.recorder = EventRecorder()
        self.server.send_sync = self.recorder
        recorder = self.recorder

        def progress_hook(value, total, preview_image, prompt_id=None, node_id=None):   # what main.hijack_progress does
            ctx = get_executing_context()
            comfy.model_management.throw_exception_if_processing_interrupted()
            recorder("progress", {"value": value, "max": total, "prompt_id": prompt_id or (ctx and ctx.prompt_id),
                                  "node": node_id or (ctx and ctx.node_id)})
        comfy.utils.set_progress_bar_global_hook(progress_hook)
        self.import_failures = loop.run_until_complete(
            nodes.init_extra_nodes(init_custom_nodes=True, init_api_nodes=False))
        asyncio.set_event_loop(None)              # PromptExecutor.execute() calls asyncio.run(): no loop may be current
        self.loop = loop
        self.nodes = nodes
        self.execution = execution
        self.model_management = comfy.model_management
        # "ram_inactive" is read by newer hosts (0.33+); 0.3.75 ignores it.
        self.executor = execution.PromptExecutor(self.server, cache_type=execution.CacheType.CLASSIC,
                                                 cache_args={"lru": 0, "ram": 0, "ram_inactive": 0})

    @property
    def node_mappings(self):
        return self.nodes.NODE_CLASS_MAPPINGS

    def validate(self, prompt):
        valid, error, outputs, node_errors = asyncio.run(
            self.execution.validate_prompt(str(uuid.uuid4()), prompt, None))
        if not valid:
            raise ValidationFailed(error, node_errors)
        return outputs

    def run(self, prompt, check=True):
        """Validate and execute an API-format prompt. With check=True an execution error raises AssertionError."""
        prompt_id = str(uuid.uuid4())
        outputs_to_execute = self.validate(prompt)
        self.recorder.events.clear()
        self.executor.execute(prompt, prompt_id, {"client_id": "quickstep-tests"}, outputs_to_execute)
        messages = list(self.executor.status_messages)
        status = "success" if self.executor.success else (
            "interrupted" if any(k == "execution_interrupted" for k, _ in messages) else "error")
        outputs = {}
        for node_id in prompt:
            value = self.executor.caches.outputs.get(node_id)
            if inspect.isawaitable(value):        # async in newer hosts
                value = asyncio.run(value)
            if value is not None:
                outputs[node_id] = value
        result = InProcessResult(prompt_id, status, outputs, self.executor.history_result.get("outputs", {}),
                                 list(self.recorder.events), messages)
        if check and status != "success":
            raise AssertionError(f"prompt ended {status}: {result.error()}")
        return result

    def refusal_message(self, prompt, node_id, input_name):
        """The message refusing `prompt` for a bad value of `input_name` on node `node_id`: the node's own error from
        execution; or, where the host validates v3 combo values (HOST_VALIDATES_V3_COMBOS) and refused the value
        before the node ran, its "Value not in list" for that very input ("name: 'value' not in [options]")."""
        try:
            result = self.run(prompt, check=False)
        except ValidationFailed as rejected:
            if not HOST_VALIDATES_V3_COMBOS:
                raise
            errors = rejected.node_errors.get(node_id, {}).get("errors", [])
            details = [e["details"] for e in errors if e["type"] == "value_not_in_list" and
                       e.get("extra_info", {}).get("input_name") == input_name]
            assert details, f"the host refused the prompt, but not for {node_id}.{input_name}: {rejected}"
            return details[0]
        assert result.status == "error", f"prompt ended {result.status}; expected a refusal of {input_name}"
        return result.error()["exception_message"]

    def output(self, result, node_id, index=0):
        """The `index`-th output value of a node in a finished run (first batch entry)."""
        value = result.outputs[node_id]
        value = getattr(value, "outputs", value)  # CacheEntry in 0.3.75 holds .outputs (a list per output slot)
        return value[index][0]

