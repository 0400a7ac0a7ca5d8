"""The real ComfyUI host for tests, benchmarks and the demo: where it is, a base directory holding the custom nodes
and model files a run needs, the HTTP server as a child process on 127.0.0.1, and a small client for its API
(POST /prompt, /ws progress, /history polling, /interrupt, /object_info, /view).

Used outside the pack's runtime only; needs the host installed by scripts/install_host.sh (or QS_COMFYUI_DIR
pointing at an existing ComfyUI with its Python in QS_PYTHON).
"""
import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

PACK_DIR = Path(__file__).resolve().parent.parent
# The host version QS_COMFY_VERSION names (0.3.75 by default) has its own default place, as in install_host.sh.
HOST_DIR = Path(os.environ.get("QS_HOST_DIR", PACK_DIR / {"0.33": ".host033"}.get(
    os.environ.get("QS_COMFY_VERSION", "0.3.75"), ".host")))
COMFY_DIR = Path(os.environ.get("QS_COMFYUI_DIR", HOST_DIR / "ComfyUI"))
HOST_PYTHON = Path(os.environ.get("QS_PYTHON", HOST_DIR / "venv" / "bin" / "python"))
TESTBED_NODES = PACK_DIR / "testbed" / "node_pack"
# UI-format workflows sit directly in workflows/ (ComfyUI's Templates browser lists only that folder's *.json);
# their API-format twins and the index of titles and groups one level down, out of the browser's sight.
WORKFLOW_DIR = PACK_DIR / "workflows"
API_WORKFLOW_DIR = WORKFLOW_DIR / "api"
WORKFLOW_INDEX = API_WORKFLOW_DIR / "index.json"


def host_version():
    """The host's version as a tuple of ints (0, 3, 75), read from its comfyui_version.py without importing it."""
    text = (COMFY_DIR / "comfyui_version.py").read_text()
    return tuple(int(part) for part in re.search(r'__version__\s*=\s*"([0-9.]+)"', text).group(1).split("."))


def ui_workflow_path(name):
    return WORKFLOW_DIR / f"{name}.json"


def api_workflow_path(name):
    return API_WORKFLOW_DIR / f"{name}.api.json"


def workflow_names():
    """The shipped workflows, by the names of their API files."""
    return sorted(p.name[:-len(".api.json")] for p in API_WORKFLOW_DIR.glob("*.api.json"))


def prepare_base(base, with_testbed_nodes=False):
    """A ComfyUI --base-directory: custom_nodes with this pack (and the test-only nodes), models/, input/, output/."""
    base = Path(base)
    for sub in ("custom_nodes", "models/checkpoints", "models/diffusion_models", "models/vae_approx", "models/vae",
                "input", "output", "temp", "user"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    links = {"quickstep": PACK_DIR}
    if with_testbed_nodes:
        links["quickstep_testbed"] = TESTBED_NODES
    for name, target in links.items():
        link = base / "custom_nodes" / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(target, target_is_directory=True)
    return base


def install_real_taesd(base, names):
    """Copy the real TAESD-family files `names` (taesd, taef1, taesdxl, taesd3) from ../shared/models/taesd into the
    base's models/vae_approx, where the stock VAELoader lists them by name, replacing a different file there (a
    seeded stand-in). Returns the files that are missing in ../shared (nothing is copied then)."""
    import filecmp
    import shutil

    from testbed.mnist_ddpm import MODELS_DIR
    files = [MODELS_DIR / "taesd" / f"{name}_{part}.safetensors" for name in names for part in ("encoder", "decoder")]
    missing = [str(f) for f in files if not f.is_file()]
    if not missing:
        approx = Path(base) / "models" / "vae_approx"
        for f in files:
            if not (approx / f.name).exists() or not filecmp.cmp(f, approx / f.name, shallow=False):
                shutil.copyfile(f, approx / f.name)
    return missing


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """The real ComfyUI server (main.py) as a child process on 127.0.0.1 with a free port."""

    def __init__(self, base, log_path, port=None, extra_args=()):
        self.base = Path(base)
        self.port = port or free_port()
        self.log_path = Path(log_path)
        self.extra_args = list(extra_args)
        self.proc = None

    @property
    def address(self):
        return f"127.0.0.1:{self.port}"

    # 0.33 imports far more at start-up than 0.3.75 (about 850 node classes): on this shared 2-core machine, loaded,
    # a 0.33 server took over 120 s to answer.
    def start(self, timeout=300):
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        cmd = [str(HOST_PYTHON), "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--disable-auto-launch", "--use-pytorch-cross-attention", "--base-directory", str(self.base),
               *self.extra_args]
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=COMFY_DIR, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode} during start-up:\n{self.log()[-4000:]}")
            try:
                Client(self.address).get_json("/system_stats")
                return self
            except OSError:   # aiohttp's connection errors are OSErrors: not listening yet
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"ComfyUI did not answer within {timeout} s:\n{self.log()[-4000:]}")

    def log(self):
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if getattr(self, "_log", None):
            self._log.close()


@dataclass
class PromptResult:
    prompt_id: str
    status: str                      # "success", "error" or "interrupted"
    outputs: dict = field(default_factory=dict)
    events: list = field(default_factory=list)   # (type, data) of every /ws text message for this prompt
    wall_s: float = 0.0

    def error(self):
        for kind, data in self.events:
            if kind == "execution_error":
                return data
        return None

    def progress(self):
        return [(d.get("node"), d["value"], d["max"]) for k, d in self.events if k == "progress"]


class PromptRejected(Exception):
    """POST /prompt answered with a validation error; `.body` holds the host's JSON answer."""

    def __init__(self, status, body):
        super().__init__(f"POST /prompt answered {status}: {json.dumps(body)[:2000]}")
        self.status, self.body = status, body


class Client:
    def __init__(self, address):
        self.address = address
        self.client_id = uuid.uuid4().hex

    def url(self, path):
        return f"http://{self.address}{path}"

    def get_json(self, path):
        return asyncio.run(self._get_json(path))

    async def _get_json(self, path):
        async with aiohttp.ClientSession() as session:
            async with session.get(self.url(path)) as r:
                r.raise_for_status()
                return await r.json()

    def object_info(self, node=None):
        return self.get_json("/object_info" + (f"/{node}" if node else ""))

    def interrupt(self):
        asyncio.run(self._post("/interrupt", {}))

    async def _post(self, path, payload):
        async with aiohttp.ClientSession() as session:
            async with session.post(self.url(path), json=payload) as r:
                return r.status, await r.json(content_type=None)

    def view(self, filename, subfolder="", kind="output"):
        async def fetch():
            async with aiohttp.ClientSession() as session:
                params = {"filename": filename, "subfolder": subfolder, "type": kind}
                async with session.get(self.url("/view"), params=params) as r:
                    r.raise_for_status()
                    return await r.read()
        return asyncio.run(fetch())

    def run(self, prompt, timeout=600, on_event=None):
        """Queue `prompt` (API format), follow it on /ws until it ends, then read its /history entry.
        `on_event(client, type, data)` sees every message of this prompt (e.g. to interrupt on progress)."""
        return asyncio.run(self._run(prompt, timeout, on_event))

    async def _run(self, prompt, timeout, on_event):
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(self.url(f"/ws?clientId={self.client_id}")) as ws:
                t0 = time.time()
                async with session.post(self.url("/prompt"), json={"prompt": prompt, "client_id": self.client_id}) as r:
                    body = await r.json()
                    if r.status != 200:
                        raise PromptRejected(r.status, body)
                prompt_id = body["prompt_id"]
                events, status = [], None
                while status is None:
                    msg = await ws.receive(timeout=max(1.0, timeout - (time.time() - t0)))
                    if msg.type != aiohttp.WSMsgType.TEXT:
                        if msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                            raise ConnectionError("websocket closed while the prompt ran")
                        continue   # binary frames are preview images
                    message = json.loads(msg.data)
                    kind, data = message["type"], message.get("data", {})
                    if data.get("prompt_id") not in (None, prompt_id):
                        continue
                    events.append((kind, data))
                    if on_event is not None:
                        await asyncio.to_thread(on_event, self, kind, data)
                    if data.get("prompt_id") == prompt_id:
                        status = {"execution_success": "success", "execution_error": "error",
                                  "execution_interrupted": "interrupted"}.get(kind)
                wall = time.time() - t0
            # The history entry is written after execution_success is broadcast: poll for it.
            outputs = {}
            for _ in range(300):
                async with session.get(self.url(f"/history/{prompt_id}")) as r:
                    history = await r.json()
                if prompt_id in history:
                    outputs = history[prompt_id].get("outputs", {})
                    break
                await asyncio.sleep(0.05)
            return PromptResult(prompt_id, status, outputs, events, wall)


def load_api_workflow(path):
    with open(path) as f:
        return json.load(f)


def ensure_python_path():
    """Make `import comfy` work in this process (for in-process use)."""
    if str(COMFY_DIR) not in sys.path:
        sys.path.insert(0, str(COMFY_DIR))
