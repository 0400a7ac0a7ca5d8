"""One ComfyUI server seen from the batch runner: its HTTP API (POST /prompt, GET /queue, /history, /view,
/object_info) and one websocket (/ws?clientId=) whose messages are routed to the prompt they belong to.

The websocket gives progress and the end of a prompt; /history is the record: it is polled as well, so a lost
websocket (reconnected with backoff) never loses a finished prompt.
"""
import asyncio
import json
import time
import uuid

import aiohttp

CONNECTION_ERRORS = (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, asyncio.TimeoutError, OSError)


class ServerUnreachable(ConnectionError):
    def __init__(self, url, error):
        super().__init__(f"{url}: {error}")
        self.url = url


class PromptRejected(Exception):
    """The server refused the prompt at validation (HTTP 400); the message lists its node errors."""

    def __init__(self, url, body):
        self.body, self.detail = body, describe_rejection(body)
        super().__init__(f"{url} rejected the workflow: {self.detail}")


def describe_rejection(body):
    if not isinstance(body, dict):
        return str(body)[:2000]
    error = body.get("error") or {}
    head = error.get("message", "") + (f" ({error['details']})" if error.get("details") else "")
    lines = sorted(f"node {node_id} ({info.get('class_type', '?')}): {err.get('message', '')}"
                   + (f": {err['details']}" if err.get("details") else "")
                   for node_id, info in (body.get("node_errors") or {}).items() for err in info.get("errors", []))
    return "\n  ".join(line for line in [head, *lines] if line)   # sorted: the server's order varies


class PromptTracker:
    """What one queued prompt has done so far, fed by websocket messages and /history."""

    # Messages that show the server has begun the prompt: execution_start first, the others if it was missed.
    START_MESSAGES = ("execution_start", "execution_cached", "executing", "progress")

    def __init__(self, prompt_id):
        self.prompt_id = prompt_id
        self.done = asyncio.Event()
        self.status = None            # "success" / "error" / "interrupted"
        self.error = None
        self.started = None           # when the server began the prompt (this client's clock): queue time ends
        self.progress = {}            # node id -> (value, max): the server's progress counters
        self.on_start = None
        self.on_progress = None

    def handle(self, kind, data, received=None):
        """One websocket message for this prompt; `received`: when it arrived, if not now."""
        ends = kind == "executing" and data.get("node") is None   # sent when the prompt is over
        if self.started is None and kind in self.START_MESSAGES and not ends:
            self.started = received or time.time()
            if self.on_start:
                self.on_start()
        if kind == "progress":
            self.progress[data.get("node")] = (data["value"], data["max"])
            if self.on_progress:
                self.on_progress(data["value"], data["max"])
        elif kind in ("execution_success", "execution_error", "execution_interrupted"):
            self.status = {"execution_success": "success", "execution_error": "error",
                           "execution_interrupted": "interrupted"}[kind]
            if kind == "execution_error":
                self.error = (f"node {data.get('node_id')} ({data.get('node_type')}): "
                              f"{data.get('exception_type', '')}: {data.get('exception_message', '')}")
            self.done.set()


class Server:
    def __init__(self, url, session, retries=4, backoff_s=0.5):
        self.url = url.rstrip("/") if "://" in url else "http://" + url.rstrip("/")
        self.session = session
        self.client_id = uuid.uuid4().hex
        self.retries, self.backoff_s = retries, backoff_s
        self.trackers = {}
        # Messages of a prompt that the server began before its POST /prompt answer was read here (an idle server
        # starts at once): kept with their arrival time and handed to the prompt's tracker when it is made.
        self.unclaimed = {}
        self.in_flight = 0            # prompts this runner has queued here and not yet collected
        self.dead = False             # set by the runner once the server stays unreachable through the retries
        self._closed = False
        self._ws_task = None

    async def _request(self, method, path, **kwargs):
        """An HTTP call retried with exponential backoff on connection errors; ServerUnreachable after the last."""
        delay = self.backoff_s
        for attempt in range(self.retries + 1):
            try:
                async with self.session.request(method, self.url + path, **kwargs) as r:
                    if r.content_type == "application/json":
                        return r.status, await r.json()
                    return r.status, await r.read()
            except CONNECTION_ERRORS as e:
                if attempt == self.retries:
                    raise ServerUnreachable(self.url, f"{type(e).__name__}: {e}") from e
                await asyncio.sleep(delay)
                delay *= 2

    async def get_json(self, path):
        status, body = await self._request("GET", path)
        if status != 200:
            raise ServerUnreachable(self.url, f"GET {path} answered {status}")
        return body if isinstance(body, dict) else json.loads(body)

    async def queue_length(self):
        """Prompts waiting or running on the server, from every client (GET /queue)."""
        queue = await self.get_json("/queue")
        return len(queue.get("queue_running", [])) + len(queue.get("queue_pending", []))

    async def submit(self, prompt):
        status, body = await self._request("POST", "/prompt", json={"prompt": prompt, "client_id": self.client_id})
        if status != 200:
            raise PromptRejected(self.url, body)
        if body.get("node_errors"):
            raise PromptRejected(self.url, body)
        tracker = self.trackers[body["prompt_id"]] = PromptTracker(body["prompt_id"])
        for kind, data, received in self.unclaimed.pop(body["prompt_id"], []):
            tracker.handle(kind, data, received)
        return tracker

    async def history(self, prompt_id):
        entry = (await self.get_json(f"/history/{prompt_id}")).get(prompt_id)
        return entry

    async def view(self, image):
        params = {"filename": image["filename"], "subfolder": image.get("subfolder", ""),
                  "type": image.get("type", "output")}
        status, body = await self._request("GET", "/view", params=params)
        if status != 200:
            raise ServerUnreachable(self.url, f"GET /view {image['filename']} answered {status}")
        return body

    async def wait(self, tracker, timeout_s, poll_s=2.0):
        """The /history entry of a finished prompt. Waits on the websocket, polling /history every `poll_s` in case
        the websocket missed the end; ServerUnreachable when the server is gone, TimeoutError after `timeout_s`."""
        deadline = time.time() + timeout_s
        while True:
            try:
                await asyncio.wait_for(tracker.done.wait(), poll_s)
            except asyncio.TimeoutError:
                pass
            entry = await self.history(tracker.prompt_id)
            if entry is not None and entry.get("status", {}).get("completed") is not None:
                if tracker.status is None:
                    tracker.status = "success" if entry["status"].get("status_str") == "success" else "error"
                    if tracker.status == "error":
                        tracker.error = _history_error(entry)
                return entry
            if entry is None and tracker.done.is_set():
                continue   # the history entry is written just after execution_success is broadcast
            if time.time() > deadline:
                raise TimeoutError(f"{self.url}: prompt {tracker.prompt_id} did not finish in {timeout_s:.0f} s")

    def start_websocket(self):
        self._ws_task = asyncio.ensure_future(self._follow())

    async def _follow(self):
        """Keeps one websocket open, reconnecting with backoff; routes each message to its prompt's tracker."""
        delay = self.backoff_s
        while not self._closed:
            try:
                async with self.session.ws_connect(f"{self.url}/ws?clientId={self.client_id}", heartbeat=30) as ws:
                    delay = self.backoff_s
                    async for msg in ws:
                        if msg.type != aiohttp.WSMsgType.TEXT:
                            continue   # binary frames are previews
                        message = json.loads(msg.data)
                        data = message.get("data") or {}
                        self.route(message.get("type"), data)
            except CONNECTION_ERRORS:
                pass
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)

    def route(self, kind, data):
        """A websocket message to its prompt's tracker (every prompt on this client id is one of ours)."""
        prompt_id = data.get("prompt_id")
        if prompt_id in self.trackers:
            self.trackers[prompt_id].handle(kind, data)
        elif prompt_id is not None:
            self.unclaimed.setdefault(prompt_id, []).append((kind, data, time.time()))

    async def close(self):
        self._closed = True
        if self._ws_task is not None:
            self._ws_task.cancel()
            try:
                await self._ws_task
            except (asyncio.CancelledError, *CONNECTION_ERRORS):
                pass


def _history_error(entry):
    for kind, data in entry.get("status", {}).get("messages", []):
        if kind == "execution_error":
            return f"node {data.get('node_id')} ({data.get('node_type')}): {data.get('exception_message', '')}"
    return "the server reports an error (no message)"
