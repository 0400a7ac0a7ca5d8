"""The batch runner (batch/) against two real ComfyUI servers on the embedded digit model: a 20-job grid spread over
both with a manifest that matches the files, a killed batch resumed without redoing finished jobs, references,
UI-format input, and the bad-input messages (unknown grid key, rejected workflow, unreachable server, full disk)."""
import errno
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from batch import BatchInputError, Storage, check_manifest, run_batch
from batch.jobs import build_jobs, parse_grid, resolve_key
from bench.batch import start_servers
from testbed.host import api_workflow_path, free_port, ui_workflow_path

API = api_workflow_path("digits_fast_sampling")
UI = ui_workflow_path("digits_fast_sampling")
ONE_DIGIT = ["4.batch_size=1", "Digits to draw.digits=7"]


@pytest.fixture(scope="module")
def server_pair(host_base, tmp_path_factory):
    """Two servers on the test base. One torch thread each: on this shared 2-core machine that is ~20x faster per
    prompt than the default (the digit model needs no model files)."""
    pair = start_servers(host_base, tmp_path_factory.mktemp("batch_servers"), 2, threads=1)
    assert all(s.alive() for s in pair), [s.log()[-2000:] for s in pair]
    yield pair
    for s in pair:
        s.stop()


@pytest.fixture()
def servers(server_pair):
    assert all(s.alive() for s in server_pair), "a server of this module died"
    return [f"http://{s.address}" for s in server_pair]


def _manifest(out):
    return json.loads((Path(out) / "manifest.json").read_text())["jobs"]


def test_grid_keys_resolve_ids_titles_and_aliases():
    api = json.loads(API.read_text())
    assert resolve_key("seed", api) == [("5", "seed")]
    assert resolve_key("Digits to draw.digits", api) == [("2", "digits")]
    assert resolve_key("4.batch_size", api) == [("4", "batch_size")]
    assert parse_grid(["seed=1..3,7", "sampler_name=euler,qs_dpmpp_2m", "cfg=2.5"]) == {
        "seed": [1, 2, 3, 7], "sampler_name": ["euler", "qs_dpmpp_2m"], "cfg": [2.5]}
    jobs = build_jobs(api, grid={"seed": [1, 2], "steps": [3, 4]})
    assert len(jobs) == 4 and len({j.job_id for j in jobs}) == 4
    assert {(j.prompt["5"]["inputs"]["seed"], j.prompt["5"]["inputs"]["steps"]) for j in jobs} == {
        (1, 3), (1, 4), (2, 3), (2, 4)}


def test_every_job_saves_under_its_own_file_names():
    """Two servers of one install share an output folder and number files by scanning it: jobs saving at once under
    one prefix overwrote each other and each server served the other's image (seen as a steps=12 job 0.27 RMSE
    from its identical steps=12 reference). Each job, the reference identical to a job included, gets its own."""
    api = json.loads(API.read_text())
    jobs = build_jobs(api, grid={"seed": [1, 2], "steps": [3, 12]}, reference={"steps": 12})
    prefixes = [j.prompt["7"]["inputs"]["filename_prefix"] for j in jobs]
    assert prefixes == [f"quickstep_digits_{j.job_id}" for j in jobs] and len(set(prefixes)) == len(jobs) == 6
    assert api["7"]["inputs"]["filename_prefix"] == "quickstep_digits"   # the user's workflow is untouched
    assert [j.job_id for j in build_jobs(api, grid={"seed": [1, 2], "steps": [3, 12]}, reference={"steps": 12})] \
        == [j.job_id for j in jobs]   # ids do not depend on the naming: a resumed batch finds its jobs


def _run_cli_without(modules, tmp_path, *args):
    """`python -m batch ARGS` in a Python where `modules` cannot be imported: each is shadowed by a package on
    PYTHONPATH whose import fails as a missing module's does (whatever this venv has installed)."""
    shims = tmp_path / ("shims_without_" + "_".join(modules))
    for module in modules:
        (shims / module).mkdir(parents=True)
        (shims / module / "__init__.py").write_text(
            f'raise ModuleNotFoundError("No module named {module!r}", name={module!r})\n')
    env = dict(os.environ, PYTHONPATH=str(shims))
    return subprocess.run([sys.executable, "-m", "batch", *args], cwd=Path(__file__).resolve().parent.parent,
                          env=env, capture_output=True, text=True, timeout=120)


def test_missing_package_is_named_with_the_install_command(tmp_path):
    run = _run_cli_without(["aiohttp", "PIL"], tmp_path, "--help")
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr and "ModuleNotFoundError" not in run.stderr
    assert "needs aiohttp, Pillow" in run.stderr and "tqdm" not in run.stderr.split("(")[0]
    assert "-m pip install aiohttp Pillow" in run.stderr and "batch/requirements.txt" in run.stderr
    run = _run_cli_without([], tmp_path, "--help")   # the same Python with everything: the usage text
    assert run.returncode == 0 and "usage: python -m batch" in run.stdout, run.stderr


def test_requirements_file_lists_what_the_runner_checks():
    from batch.dependencies import PACKAGES, REQUIREMENTS_FILE
    path = Path(__file__).resolve().parent.parent / REQUIREMENTS_FILE
    listed = [line.split("#")[0].strip() for line in path.read_text().splitlines()]
    assert sorted(name for name in listed if name) == sorted(PACKAGES)


def test_grid_key_that_does_not_exist_lists_what_does(servers, tmp_path):
    with pytest.raises(BatchInputError) as e:
        run_batch(API, servers, tmp_path / "out", grid=["seeds=1,2", "5.sampler=euler", "Nope.text=a"],
                  progress=False)
    message = str(e.value)
    assert "'seeds' matches no input" in message and "5.seed" in message and "5.sampler_name" in message
    assert "node 5 (KSampler) has no input 'sampler'" in message and "sampler_name" in message
    assert "no node with id or title 'Nope'" in message and "Digits to draw" in message
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_twenty_jobs_over_two_servers(servers, tmp_path):
    out = tmp_path / "out"
    grid = ["seed=1..10", "sampler_name=qs_dpmpp_2m,euler", "steps=3", *ONE_DIGIT]
    result = run_batch(API, servers, out, grid=grid, progress=False)
    assert result.exit_code == 0, result.messages
    records = _manifest(out)
    assert len(records) == 20 and all(r["status"] == "done" for r in records)
    assert {r["server"] for r in records} == set(servers)          # both servers took jobs
    assert check_manifest(out) == ([], [])
    images = [out / r["images"][0] for r in records]
    assert len(set(images)) == 20 and all(len(r["images"]) == 1 for r in records)
    arrays = {}
    for r, path in zip(records, images):
        with Image.open(path) as image:
            assert image.size == (28, 28)   # the digit model crops its 32x32 pixels to MNIST size
            arrays[(r["params"]["seed"], r["params"]["sampler_name"])] = image.tobytes()
        assert r["nfe"] == 3 and r["nfe_source"].startswith("server progress")
        assert r["seed"] == [r["params"]["seed"]] and r["total_s"] >= r["run_s"] >= 0
    assert arrays[(1, "euler")] != arrays[(2, "euler")]             # the seed reached the sampler
    assert arrays[(1, "euler")] != arrays[(1, "qs_dpmpp_2m")]       # so did the sampler
    rows = (out / "manifest.csv").read_text().splitlines()
    assert len(rows) == 21 and rows[0].startswith("job_id,role,status,server,seed,steps,nfe")
    assert (out / "contact_sheet.png").is_file()


def test_killed_batch_resumes_without_redoing_finished_jobs(servers, tmp_path):
    out = tmp_path / "out"
    args = ["--grid", "seed=101..112", "--grid", "steps=25", *sum((["--grid", g] for g in ONE_DIGIT), [])]
    cmd = [sys.executable, "-m", "batch", "run", str(API), *args, "--out", str(out), "--no-progress",
           "--queue-depth", "1"]
    for url in servers:
        cmd += ["--server", url]
    proc = subprocess.Popen(cmd, cwd=Path(__file__).resolve().parent.parent, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    done_before = []
    while time.time() < deadline and proc.poll() is None:
        if (out / "manifest.json").exists():
            done_before = [r for r in _manifest(out) if r["status"] == "done"]
            if len(done_before) >= 3:
                break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = {r["job_id"]: r for r in _manifest(out) if r["status"] == "done"}
    assert 3 <= len(done_before) < 12, "the batch finished before it could be killed"
    assert check_manifest(out)[0] == []   # every listed image is there (one may be written but not yet listed)
    stamps = {p: (out / p).stat().st_mtime_ns for r in done_before.values() for p in r["images"]}
    # A file left by a run killed between writing an image and recording it: set aside, not overwritten or lost.
    pending = next(r for r in _manifest(out) if r["status"] != "done")
    (out / "images" / f"{pending['job_id']}_00.png").write_bytes(b"interrupted")
    with pytest.raises(BatchInputError, match="--resume"):
        run_batch(API, servers, out, grid=[a for a in args if a != "--grid"], progress=False)
    result = run_batch(API, servers, out, grid=[a for a in args if a != "--grid"], resume=True, progress=False)
    assert result.exit_code == 0 and result.skipped == len(done_before)
    records = {r["job_id"]: r for r in _manifest(out)}
    assert len(records) == 12 and all(r["status"] == "done" for r in records.values())
    for job_id, before in done_before.items():
        assert records[job_id]["prompt_id"] == before["prompt_id"]     # not submitted again
    assert all((out / p).stat().st_mtime_ns == t for p, t in stamps.items())
    assert (out / "images" / "unrecorded" / f"{pending['job_id']}_00.png").read_bytes() == b"interrupted"
    assert check_manifest(out) == ([], [])


def test_reference_gives_error_and_plot(servers, tmp_path):
    out = tmp_path / "out"
    result = run_batch(API, servers, out, grid=["seed=5,6", "steps=3,12", *ONE_DIGIT], reference=["steps=12"],
                       progress=False)
    assert result.exit_code == 0, result.messages
    records = _manifest(out)
    references = [r for r in records if r["role"] == "reference"]
    jobs = [r for r in records if r["role"] == "job"]
    assert len(references) == 2 and len(jobs) == 4
    for r in jobs:
        if r["params"]["steps"] == 12:   # the same graph as its reference: the same image
            assert r["rmse_vs_reference"] == 0.0
        else:
            assert r["rmse_vs_reference"] > 0.0
    assert (out / "speed_vs_quality.png").is_file() and check_manifest(out) == ([], [])


def test_ui_format_workflow_with_progress_bars(servers, tmp_path, capsys):
    result = run_batch(UI, servers, tmp_path / "out", grid=["seed=3,4", "steps=3", *ONE_DIGIT], progress=True)
    assert result.exit_code == 0, result.messages
    assert len(result.ids("done")) == 2
    assert "batch: 100%" in capsys.readouterr().err   # the tqdm bars (overall and per job) ran


def test_job_bar_clock_starts_when_the_server_starts_the_job(server_pair, tmp_path, monkeypatch):
    """Three 20-digit jobs queued at once on one server (40 steps: long enough for the later ones to wait for the
    earlier even on the fast Qwen-Image digit model the workflow uses). Each job's bar must
    count from the job's start on the server (its run time), not from its submission (queue time included)."""
    from batch import runner
    elapsed = {}
    job_done = runner._Progress.job_done

    def record_elapsed(progress, job_bar):
        if job_bar is not None and job_bar.bar is not None:
            elapsed[job_bar.label.split(" @")[0]] = job_bar.bar.format_dict["elapsed"]
        job_done(progress, job_bar)

    monkeypatch.setattr(runner._Progress, "job_done", record_elapsed)
    result = run_batch(API, [f"http://{server_pair[0].address}"], tmp_path / "out", grid=["seed=31..33", "steps=40"],
                       queue_depth=3, progress=True)
    assert result.exit_code == 0, result.messages
    records = {r["job_id"]: r for r in result.records}
    assert set(elapsed) == set(records)
    assert max(r["queue_s"] for r in records.values()) > 1.0, "no job waited in the queue: nothing to tell apart"
    for job_id, r in records.items():
        # Counted from the job's start: near its run time, and nearer it than to run + queue time wherever the job
        # waited. The tolerance is the jitter of the start message's arrival on a loaded machine (0.56 s was seen).
        from_start = abs(elapsed[job_id] - r["run_s"])
        from_submission = abs(elapsed[job_id] - r["run_s"] - r["queue_s"])
        assert from_start < 1.0 and (r["queue_s"] < 1.0 or from_start < from_submission), \
            (job_id, elapsed[job_id], r["queue_s"], r["run_s"])


def test_messages_that_arrive_before_the_prompt_is_registered_reach_its_tracker():
    """An idle server starts a prompt before its POST /prompt answer is read: the start is kept for the tracker."""
    import asyncio
    from batch.servers import Server

    async def scenario():
        server = Server("http://127.0.0.1:1", session=None)

        async def answer(method, path, **kwargs):
            server.route("execution_start", {"prompt_id": "p1"})   # the websocket got there first
            server.route("progress", {"prompt_id": "p1", "node": "5", "value": 1, "max": 8})
            await asyncio.sleep(0.2)
            return 200, {"prompt_id": "p1", "number": 0, "node_errors": {}}

        server._request = answer
        before = time.time()
        tracker = await server.submit({})
        return before, tracker, time.time(), server.unclaimed

    before, tracker, after, unclaimed = asyncio.run(scenario())
    assert before <= tracker.started <= after - 0.2 and tracker.progress == {"5": (1, 8)} and unclaimed == {}


def test_jobs_from_csv(servers, tmp_path):
    jobs = tmp_path / "jobs.csv"
    jobs.write_text("seed,sampler_name,steps,4.batch_size\n11,euler,3,1\n12,,3,1\n")   # empty: the workflow's
    result = run_batch(API, servers, tmp_path / "out", jobs=jobs, progress=False)
    assert result.exit_code == 0, result.messages
    records = _manifest(tmp_path / "out")
    assert [r["inputs"] for r in records] == [
        {"5.seed": 11, "5.sampler_name": "euler", "5.steps": 3, "4.batch_size": 1},
        {"5.seed": 12, "5.steps": 3, "4.batch_size": 1}]
    with pytest.raises(BatchInputError, match="either a grid or a jobs file"):
        run_batch(API, servers, tmp_path / "both", jobs=jobs, grid=["seed=1"], progress=False)


def test_rejected_workflow_reports_the_servers_node_errors(servers, tmp_path):
    result = run_batch(API, servers, tmp_path / "out", grid=["seed=1,2", "sampler_name=no_such_sampler", "steps=0"],
                       progress=False)
    assert result.exit_code == 1 and len(result.ids("failed")) == 2
    error = _manifest(tmp_path / "out")[0]["error"]
    assert "rejected the workflow" in error and "node 5 (KSampler)" in error
    assert "no_such_sampler" in error and "steps" in error
    assert sum("rejected the workflow" in m for m in result.messages) == 1   # printed once, then referred to
    assert any("same node errors" in m for m in result.messages)


def test_unreachable_server(servers, tmp_path):
    dead = f"http://127.0.0.1:{free_port()}"
    result = run_batch(API, [dead, servers[0]], tmp_path / "one", grid=["seed=1..3", "steps=3", *ONE_DIGIT],
                       progress=False, retries=1, backoff_s=0.05)
    assert result.exit_code == 0 and {r["server"] for r in result.records} == {servers[0]}
    assert any(dead in m and "retries" in m for m in result.messages)
    result = run_batch(API, [dead], tmp_path / "none", grid=["seed=1..3", "steps=3"], progress=False, retries=1,
                       backoff_s=0.05)
    assert result.exit_code == 1 and len(result.ids("not_run")) == 3
    assert any(dead in m for m in result.messages)
    assert any("did not run" in m and all(j in m for j in result.ids("not_run")) for m in result.messages)


class FullDisk(Storage):
    """Accepts `room` images, then fails every write as a full disk does."""

    def __init__(self, room):
        self.room = room

    def write_bytes(self, path, data):
        if Path(path).suffix == ".png":
            if self.room == 0:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
            self.room -= 1
        super().write_bytes(path, data)


def test_full_disk_names_the_job_and_keeps_the_manifest_true(servers, tmp_path):
    out = tmp_path / "out"
    result = run_batch(API, servers, out, grid=["seed=201..208", "steps=3", *ONE_DIGIT], storage=FullDisk(3),
                       progress=False, report=False)
    assert result.exit_code == 1
    failed = [r for r in result.records if r["status"] == "failed"]
    assert failed and all("disk full" in r["error"] and r["job_id"] in r["error"] for r in failed)
    assert any("disk full" in m for m in result.messages)
    assert len(result.ids("done")) == 3 and result.ids("not_run")
    assert check_manifest(out) == ([], [])
    assert not list((out / "images").glob(".*.tmp"))


def test_server_lost_mid_batch_hands_its_jobs_to_the_other(server_pair, tmp_path):
    """Runs last: kills one of the module's servers while it holds jobs of the batch."""
    urls = [f"http://{s.address}" for s in server_pair]
    out = tmp_path / "out"

    def kill_second_server_after_two_jobs():
        deadline = time.time() + 60
        while time.time() < deadline:
            if (out / "manifest.json").exists():
                records = _manifest(out)
                if sum(r["status"] == "done" for r in records) >= 2 and any(
                        r["status"] == "running" and r["server"] == urls[1] for r in records):
                    server_pair[1].proc.kill()
                    return
            time.sleep(0.02)

    killer = threading.Thread(target=kill_second_server_after_two_jobs)
    killer.start()
    result = run_batch(API, urls, out, grid=["seed=301..308", "steps=25", *ONE_DIGIT], progress=False,
                       retries=2, backoff_s=0.05)
    killer.join()
    assert not server_pair[1].alive()
    assert result.exit_code == 0, result.messages
    assert any(urls[1] in m and "unreachable" in m for m in result.messages)
    assert any(r["attempts"] == 2 and r["server"] == urls[0] for r in result.records)   # re-run on the live one
    assert check_manifest(out) == ([], [])
