"""The batch runner: jobs spread over one or more ComfyUI servers by queue length, followed to the end, images
downloaded under names that carry the job id, and a manifest rewritten atomically after every job so that an
interrupted batch resumes without redoing what is on disk.

Output directory:
  manifest.json   every job: parameters, status, server, timings, NFE, image paths (the record resume reads)
  manifest.csv    the same, one row per job
  images/<job_id>_<k>.png
  contact_sheet.png, speed_vs_quality.png (with a reference)
"""
import asyncio
import collections
import csv
import hashlib
import io
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from atomic_files import is_temp_file, write_atomically
from batch.jobs import BatchInputError, build_jobs, is_ui_format, read_jobs_csv, to_api
from batch.servers import PromptRejected, Server, ServerUnreachable

MANIFEST = "manifest.json"
IMAGES = "images"
UNRECORDED = "unrecorded"
MAX_ATTEMPTS = 3          # a job whose server is lost mid-run is queued again elsewhere, this many times in all


class DiskFull(OSError):
    def __init__(self, path, job_id, error):
        super().__init__(error.errno, f"disk full (or not writable) writing {path} for job {job_id}: {error.strerror}")
        self.path, self.job_id = path, job_id


class Storage:
    """Every file the runner writes goes through `write_bytes` (atomic_files.write_atomically: a file under its final
    name is always complete). A test replaces this to simulate a full disk."""

    def write_bytes(self, path, data):
        write_atomically(path, data)


@dataclass
class BatchResult:
    out_dir: Path
    records: list                       # manifest records, in job order
    wall_s: float
    messages: list = field(default_factory=list)
    skipped: int = 0                    # finished in an earlier run, not redone

    def ids(self, status):
        return [r["job_id"] for r in self.records if r["status"] == status]

    @property
    def exit_code(self):
        return 0 if all(r["status"] == "done" for r in self.records) else 1


def _record(job):
    return {"job_id": job.job_id, "role": job.role, "reference_id": job.reference_id, "status": "not_run",
            "params": job.params, "inputs": job.targets, "seed": job.seeds(), "steps": job.steps(),
            "nfe": None, "nfe_source": "", "server": "", "prompt_id": "", "images": [], "attempts": 0,
            "submitted_at": None, "started_at": None, "finished_at": None,
            "queue_s": None, "run_s": None, "total_s": None, "error": ""}


class Manifest:
    def __init__(self, out_dir, storage, header):
        self.out_dir, self.storage, self.header = Path(out_dir), storage, header
        self.records = {}

    def load(self):
        path = self.out_dir / MANIFEST
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise BatchInputError(f"{path} is not a readable manifest ({e}); move it away to start over") from e
        return {r["job_id"]: r for r in data.get("jobs", [])}

    def save(self, job_id=None):
        """Both manifest files, atomically; DiskFull names the job whose record could not be written."""
        records = list(self.records.values())
        data = dict(self.header, updated=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), jobs=records)
        try:
            self.storage.write_bytes(self.out_dir / MANIFEST, json.dumps(data, indent=1).encode())
            self.storage.write_bytes(self.out_dir / "manifest.csv", _csv(records).encode())
        except OSError as e:
            raise DiskFull(self.out_dir / MANIFEST, job_id or "-", e) from e


def _csv(records):
    fixed = ["job_id", "role", "status", "server", "seed", "steps", "nfe", "nfe_source"]
    keys = sorted({k for r in records for k in r["params"]} - set(fixed))   # `seed`/`steps` are fixed columns
    columns = [*fixed, *keys, "images",
               "queue_s", "run_s", "total_s", "rmse_vs_reference", "reference_id", "attempts", "error"]
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(columns)
    for r in records:
        row = {**r, **r["params"], "images": ";".join(r["images"]), "seed": ";".join(map(str, r["seed"]))}
        writer.writerow(["" if row.get(c) is None else row.get(c, "") for c in columns])
    return out.getvalue()


def check_manifest(out_dir):
    """What disagrees between manifest.json and the images on disk: ([listed but missing], [on disk, unlisted])."""
    out_dir = Path(out_dir)
    records = json.loads((out_dir / MANIFEST).read_text())["jobs"]
    listed = {p for r in records for p in r["images"]}
    missing = sorted(p for p in listed if not (out_dir / p).is_file())
    on_disk = {f"{IMAGES}/{p.name}" for p in (out_dir / IMAGES).glob("*") if p.is_file() and not p.name.startswith(".")}
    return missing, sorted(on_disk - listed)


class _Progress:
    """One overall bar and one bar per running job (tqdm, on stderr); silent when disabled."""

    def __init__(self, total, initial, enabled):
        self.enabled = enabled
        self.slots = []
        if enabled:
            from tqdm import tqdm
            self.tqdm = tqdm
            self.overall = tqdm(total=total, initial=initial, desc="batch", unit="job", position=0, file=sys.stderr)

    def job_bar(self, job_id, server, tracker):
        """The job's bar, opened when the server starts the job, so that its clock and s/step leave out the time
        the job waited in the server's queue. None when disabled."""
        return _JobBar(self, f"{job_id} @{server.split('//')[-1]}", tracker) if self.enabled else None

    def open_bar(self, label):
        slot = next(i for i in range(len(self.slots) + 1) if i == len(self.slots) or self.slots[i] is None)
        if slot == len(self.slots):
            self.slots.append(None)
        bar = self.tqdm(total=1, desc=label, unit="step", position=slot + 1, leave=False, file=sys.stderr)
        self.slots[slot] = bar
        return bar

    def job_done(self, job_bar):
        if self.enabled:
            if job_bar is not None and job_bar.bar is not None:
                self.slots[next(i for i, b in enumerate(self.slots) if b is job_bar.bar)] = None
                job_bar.bar.close()
            self.overall.update(1)

    def write(self, text):
        if self.enabled:
            self.tqdm.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr)

    def close(self):
        if self.enabled:
            self.overall.close()


class _JobBar:
    """One job's tqdm bar, opened at the job's first sign of running on the server (or of progress)."""

    def __init__(self, progress, label, tracker):
        self.progress, self.label, self.bar = progress, label, None
        tracker.on_start, tracker.on_progress = self.open, self.update
        if tracker.started is not None:   # the server began it before its POST /prompt answer was read
            self.open()

    def open(self):
        if self.bar is None:
            self.bar = self.progress.open_bar(self.label)

    def update(self, value, total):
        self.open()
        self.bar.total = total
        self.bar.update(value - self.bar.n)


class _Batch:
    def __init__(self, out_dir, servers, jobs, manifest, storage, progress, queue_depth, timeout_s, max_jobs):
        self.out_dir, self.servers, self.manifest, self.storage = out_dir, servers, manifest, storage
        self.jobs = {job.job_id: job for job in jobs}
        self.progress, self.queue_depth, self.timeout_s, self.max_jobs = progress, queue_depth, timeout_s, max_jobs
        self.pending = collections.deque()
        self.messages = []
        self.rejections = {}          # server's message -> first job that got it (printed once)
        self.stop_reason = None
        self.finished_here = 0

    def say(self, text):
        self.messages.append(text)
        self.progress.write(text)

    async def _pick_server(self):
        """The live server with the shortest queue (GET /queue, every client's prompts) among those holding fewer
        than `queue_depth` of ours; None when all are full. A server that stays unreachable is marked dead."""
        best = None
        for server in self.servers:
            if server.dead or server.in_flight >= self.queue_depth:
                continue
            try:
                length = await server.queue_length()
            except ServerUnreachable as e:
                self._server_lost(server, e)
                continue
            key = (length, server.in_flight)
            if best is None or key < best[0]:
                best = (key, server)
        return None if best is None else best[1]

    def _server_lost(self, server, error):
        if not server.dead:
            server.dead = True
            self.say(f"server {server.url} unreachable after {server.retries} retries: {error}")

    async def run(self):
        running = set()
        while True:
            while self.pending and self.stop_reason is None and (
                    self.max_jobs is None or self.finished_here + len(running) < self.max_jobs):
                server = await self._pick_server()
                if server is None:
                    break
                job = self.pending.popleft()
                server.in_flight += 1
                running.add(asyncio.ensure_future(self._run_job(server, job)))
            if not running:
                break
            finished, running = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
            for task in finished:
                task.result()   # an unexpected error in the runner itself stops the batch loudly
        if self.pending and all(s.dead for s in self.servers):
            self.stop_reason = self.stop_reason or "no server reachable"

    async def _run_job(self, server, job):
        record = self.manifest.records[job.job_id]
        record["attempts"] += 1
        bar = None
        try:
            t_submit = time.time()
            tracker = await server.submit(job.prompt)
            record.update(server=server.url, prompt_id=tracker.prompt_id, submitted_at=t_submit, status="running")
            bar = self.progress.job_bar(job.job_id, server.url, tracker)
            entry = await server.wait(tracker, self.timeout_s)
            t_end = time.time()
            started = tracker.started or t_submit
            record.update(started_at=started, finished_at=t_end, queue_s=round(started - t_submit, 3),
                          run_s=round(t_end - started, 3), total_s=round(t_end - t_submit, 3))
            if tracker.status != "success":
                record.update(status="failed", error=tracker.error or tracker.status)
                self.say(f"job {job.job_id} failed on {server.url}: {record['error']}")
            else:
                images = [image for output in entry.get("outputs", {}).values()
                          for image in output.get("images", []) if image.get("type", "output") == "output"]
                blobs = [await server.view(image) for image in images]
                record["images"] = self._write_images(job.job_id, blobs)
                if tracker.progress:
                    record.update(nfe=sum(total for _, total in tracker.progress.values()),
                                  nfe_source="server progress events (sampler steps)")
                else:
                    record.update(nfe=job.steps(), nfe_source="steps input (the server reported no progress)")
                record.update(status="done", error="")
            self.finished_here += 1
        except PromptRejected as e:
            record.update(status="failed", error=str(e))
            first = self.rejections.setdefault(e.detail, job.job_id)
            self.say(f"job {job.job_id}: {e}" if first == job.job_id else
                     f"job {job.job_id}: rejected with the same node errors as job {first}")
        except TimeoutError as e:   # the server answers but the job outlived --timeout: the job fails, not the server
            record.update(status="failed", error=str(e))
            self.say(f"job {job.job_id}: {e}")
        except ServerUnreachable as e:
            self._server_lost(server, e)
            record.update(status="not_run", error=str(e), server="", prompt_id="")
            if record["attempts"] < MAX_ATTEMPTS and not all(s.dead for s in self.servers):
                self.pending.appendleft(job)   # another server takes it
        except DiskFull as e:
            record.update(status="failed", error=str(e))
            self.stop_reason = str(e)
            self.say(str(e))
        finally:
            server.in_flight -= 1
            self.progress.job_done(bar)
        try:
            self.manifest.save(job.job_id)
        except DiskFull as e:
            self.stop_reason = str(e)
            self.say(str(e))

    def _write_images(self, job_id, blobs):
        written = []
        for k, data in enumerate(blobs):
            rel = f"{IMAGES}/{job_id}_{k:02d}.png"
            path = self.out_dir / rel
            if path.exists():   # never overwrite: an earlier file under this name stays, this one gets a suffix
                rel = f"{IMAGES}/{job_id}_{k:02d}_{hashlib.sha1(data).hexdigest()[:8]}.png"
                path = self.out_dir / rel
            try:
                self.storage.write_bytes(path, data)
            except OSError as e:
                for done in written:   # the job is recorded as not done: its other images would be unlisted
                    (self.out_dir / done).unlink(missing_ok=True)
                raise DiskFull(path, job_id, e) from e
            written.append(rel)
        return written


def _set_aside_unrecorded(out_dir, records, say):
    """Images on disk that the manifest does not list (a run killed between writing an image and its manifest):
    moved to images/unrecorded/, never deleted, so the manifest matches images/ again."""
    listed = {p for r in records.values() for p in r.get("images", [])}
    images = out_dir / IMAGES
    for path in sorted(images.glob("*")):
        if is_temp_file(path.name):
            path.unlink()   # an incomplete write (the runner holds the folder: no other writer)
        elif path.is_file() and f"{IMAGES}/{path.name}" not in listed:
            (images / UNRECORDED).mkdir(exist_ok=True)
            shutil.move(str(path), images / UNRECORDED / path.name)
            say(f"{path.name} is not in the manifest (interrupted write): moved to {IMAGES}/{UNRECORDED}/")


async def _run(workflow, servers, out_dir, grid, rows, reference, resume, storage, progress, queue_depth,
               timeout_s, max_jobs, retries, backoff_s):
    out_dir = Path(out_dir)
    t0 = time.time()
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=120)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        conns = [Server(url, session, retries=retries, backoff_s=backoff_s) for url in servers]
        object_info, errors = None, []
        for conn in conns:
            try:
                object_info = await conn.get_json("/object_info")
                break
            except ServerUnreachable as e:
                conn.dead = True
                errors.append(f"server {e} (after {conn.retries} retries)")
        if object_info is None and is_ui_format(workflow):
            raise BatchInputError("a UI-format workflow needs a reachable server to convert it; " + "; ".join(errors))
        api = to_api(workflow, object_info)
        jobs = build_jobs(api, grid=grid, rows=rows, reference=reference, object_info=object_info)
        header = {"version": 1, "servers": [c.url for c in conns], "grid": grid, "reference": reference,
                  "workflow_sha1": hashlib.sha1(json.dumps(api, sort_keys=True).encode()).hexdigest()}
        manifest = Manifest(out_dir, storage, header)
        (out_dir / IMAGES).mkdir(parents=True, exist_ok=True)
        previous = {}
        if (out_dir / MANIFEST).exists():
            if not resume:
                raise BatchInputError(f"{out_dir} already holds a batch ({MANIFEST}); pass --resume to finish it, "
                                      "or choose another --out (nothing there is overwritten)")
            previous = manifest.load()
        messages = []
        _set_aside_unrecorded(out_dir, previous, messages.append)
        skipped = 0
        todo = []
        for job in jobs:
            old = previous.get(job.job_id)
            if old and old["status"] == "done" and all((out_dir / p).is_file() for p in old["images"]):
                manifest.records[job.job_id] = old
                skipped += 1
            else:
                if old and old["status"] == "done":
                    messages.append(f"job {job.job_id}: an image listed in the manifest is missing; running it again")
                manifest.records[job.job_id] = _record(job)
                todo.append(job)
        # Records of an earlier run that this batch no longer names stay in the manifest: their files stay on disk.
        for job_id, old in previous.items():
            manifest.records.setdefault(job_id, old)
        batch_progress = _Progress(len(jobs), skipped, progress)
        batch = _Batch(out_dir, conns, jobs, manifest, storage, batch_progress, queue_depth, timeout_s, max_jobs)
        for text in errors + messages:
            batch.say(text)
        batch.pending.extend(todo)
        try:
            manifest.save()
        except DiskFull as e:
            batch.stop_reason = str(e)
            batch.say(str(e))
        if batch.stop_reason is None:
            for conn in conns:
                if not conn.dead:
                    conn.start_websocket()
            try:
                await batch.run()
            finally:
                for conn in conns:
                    await conn.close()
                batch_progress.close()
        records = list(manifest.records.values())
        if reference and batch.stop_reason is None:
            from batch.report import compare_with_references
            compare_with_references(out_dir, records)
            try:
                manifest.save()
            except DiskFull as e:
                batch.say(str(e))
        not_run = [r["job_id"] for r in records if r["status"] in ("not_run", "running")]
        if not_run:
            why = batch.stop_reason or ("stopped after max_jobs" if max_jobs is not None else "servers lost")
            batch.say(f"{len(not_run)} job(s) did not run ({why}): {', '.join(not_run)}")
        return BatchResult(out_dir, records, time.time() - t0, batch.messages, skipped)


def run_batch(workflow, servers, out_dir, grid=None, jobs=None, reference=None, resume=False, storage=None,
              progress=True, queue_depth=2, timeout_s=600, max_jobs=None, retries=4, backoff_s=0.5, report=True):
    """Run a batch and return a BatchResult (records as in manifest.json; `.exit_code` 0 when every job is done).

    workflow: path or dict, API or UI format. servers: ComfyUI URLs ("http://127.0.0.1:8188"). grid: {key: [values]}
    or ["key=v1,v2", ...]; jobs: a CSV path or a list of {key: value} (one job each) instead of a grid.
    reference: {key: value} applied to each job to make its reference (e.g. {"steps": 50}); adds the
    speed-vs-quality plot. resume: finish a batch in `out_dir`, skipping jobs already on disk.
    queue_depth: prompts of ours held in each server's queue. max_jobs: stop after this many jobs ran (the rest
    stay in the manifest as not_run). Raises BatchInputError for bad input found before anything runs."""
    from batch.jobs import parse_grid
    if isinstance(workflow, (str, os.PathLike)):
        with open(workflow) as f:
            try:
                workflow = json.load(f)
            except json.JSONDecodeError as e:
                raise BatchInputError(f"workflow {workflow} is not JSON: {e}") from e
    if isinstance(grid, (list, tuple)):
        grid = parse_grid(grid)
    rows = read_jobs_csv(jobs) if isinstance(jobs, (str, os.PathLike)) else jobs
    if rows is not None and grid:
        raise BatchInputError("give either a grid or a jobs file, not both")
    if isinstance(reference, (list, tuple)):
        reference = {k: v[0] for k, v in parse_grid(reference).items()}
    if not servers:
        raise BatchInputError("no server given")
    result = asyncio.run(_run(workflow, list(servers), out_dir, grid, rows, reference, resume, storage or Storage(),
                              progress, queue_depth, timeout_s, max_jobs, retries, backoff_s))
    if report:
        from batch.report import contact_sheet, speed_vs_quality
        try:
            contact_sheet(result.out_dir, result.records, storage or Storage())
            if reference:
                speed_vs_quality(result.out_dir, result.records, storage or Storage())
        except OSError as e:
            result.messages.append(f"could not write the contact sheet / plot: {e}")
    return result
