"""A writer killed (SIGKILL) in the middle of writing a saved schedule (Save Schedule), a cache calibration
(Calibrate Cache) or a batch manifest leaves the previous file intact; the temporary file it leaves is invisible to
every reader (dot-named, not .json) and the next write of that file removes it.

The writer runs in a child process whose os.fsync is wrapped: once the new content is in the temporary file, and
before the rename, the child says where it is and sleeps; the test then kills it. The node writers run through a real
ComfyUI executor in the child (testbed.inproc), the manifest through the batch runner's own Manifest.save."""
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from atomic_files import is_temp_file
from batch.runner import Manifest, Storage, check_manifest
from graphs import sink

PACK_DIR = Path(__file__).resolve().parent.parent
STOP_BEFORE_RENAME = textwrap.dedent("""
    import os, sys, time
    real_fsync = os.fsync

    def fsync_then_wait_to_be_killed(fd):
        real_fsync(fd)
        try:
            path = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            return
        if os.path.dirname(path) == os.environ["QS_KILL_FOLDER"] and os.path.basename(path).startswith(".tmp-"):
            print("WRITING", path, flush=True)
            time.sleep(3600)

    os.fsync = fsync_then_wait_to_be_killed
""")
NODE_CHILD = STOP_BEFORE_RENAME + textwrap.dedent("""
    import json
    from pathlib import Path
    sys.path.append(os.environ["QS_PACK_DIR"])
    from testbed.inproc import InProcessHost
    host = InProcessHost(Path(os.environ["QS_BASE"]))
    host.run(json.loads(os.environ["QS_GRAPH"]))
    print("FINISHED without being stopped", flush=True)
""")
MANIFEST_CHILD = STOP_BEFORE_RENAME + textwrap.dedent("""
    import json
    sys.path.insert(0, os.environ["QS_PACK_DIR"])
    from batch.runner import Manifest, Storage
    manifest = Manifest(os.environ["QS_KILL_FOLDER"], Storage(), {"version": 1})
    with open(os.environ["QS_RECORDS_FILE"]) as f:
        manifest.records = json.load(f)
    manifest.save()
    print("FINISHED without being stopped", flush=True)
""")


def _kill_while_writing(script, folder, **env):
    """Run `script` in a child until it stops before renaming its temporary file in `folder`, then SIGKILL it.
    Returns the temporary file's path."""
    env = dict(os.environ, QS_KILL_FOLDER=str(folder), QS_PACK_DIR=str(PACK_DIR), OMP_NUM_THREADS="1",
               **{k: v for k, v in env.items()})
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env=env, cwd=PACK_DIR)
    try:
        for line in child.stdout:
            if line.startswith("WRITING "):
                break
        else:
            pytest.fail(f"the child ended without writing: {child.wait()} {child.stderr.read()[-3000:]}")
        temp = Path(line.split(" ", 1)[1].strip())
        assert temp.is_file(), temp          # it is mid-write: the new content is in the temporary file only
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=60) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        child.stdout.close()
        child.stderr.close()
    return temp


def _assert_orphan_invisible(folder, temp, name):
    """The killed writer's temporary file is there, but nothing looking for results can take it for one."""
    assert temp.exists() and is_temp_file(temp.name) and temp.name.startswith(".")
    assert temp not in set(folder.glob("*.json")) and temp.suffix == ".tmp"
    assert f".{name}" in temp.name        # it names what it was for, so the next write of that file removes it


def _save_schedule_graph(text, name):
    return {"model": {"class_type": "QuickstepTestOracle", "inputs": {"family": "eps", "mixture_seed": 0}},
            "text": {"class_type": "QuickstepSigmasFromText", "inputs": {"sigmas": text}},
            "save": {"class_type": "QuickstepSaveSchedule",
                     "inputs": {"sigmas": ["text", 0], "model": ["model", 0], "name": name}},
            "keep": sink("save")}


def test_killed_save_schedule_keeps_the_previous_schedule(inproc, host_base):
    name = "qs_killed_save"
    folder = host_base / "models" / "quickstep_schedules"
    inproc.run(_save_schedule_graph("14.6, 3.1, 0.71, 0.13, 0", name))
    path = folder / f"{name}.json"
    before = path.read_bytes()
    temp = _kill_while_writing(NODE_CHILD, folder, QS_BASE=str(host_base),
                               QS_GRAPH=json.dumps(_save_schedule_graph("10.0, 2.0, 0.5, 0", name)))
    assert path.read_bytes() == before
    _assert_orphan_invisible(folder, temp, path.name)
    load = {"model": {"class_type": "QuickstepTestOracle", "inputs": {"family": "eps", "mixture_seed": 0}},
            "load": {"class_type": "QuickstepLoadSchedule",
                     "inputs": {"model": ["model", 0], "name": name, "force": False}},
            "keep": sink("load")}
    loaded = inproc.output(inproc.run(load), "load")
    assert torch.allclose(loaded, torch.tensor([14.6, 3.1, 0.71, 0.13, 0.0]))
    inproc.run(_save_schedule_graph("10.0, 2.0, 0.5, 0", name))     # the next save of that schedule
    assert json.loads(path.read_text())["sigmas"] == [10.0, 2.0, 0.5, 0.0]
    assert not [p for p in folder.iterdir() if is_temp_file(p.name)]


def _calibration_graph(name, cfg):
    return {
        "model": {"class_type": "QuickstepTestTinyModel", "inputs": {"arch": "sd15", "seed": 0}},
        "cached": {"class_type": "QuickstepDeepCache",
                   "inputs": {"model": ["model", 0], "interval": 2, "schedule": "uniform", "branch": 0,
                              "start_percent": 0.0, "end_percent": 1.0, "forecaster": "reuse", "history": 3}},
        "cond": {"class_type": "QuickstepTestConditioning", "inputs": {"arch": "sd15", "seed": 0, "context_dim": 0}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "sampler": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
        "sigmas": {"class_type": "BasicScheduler", "inputs": {"model": ["model", 0], "scheduler": "normal",
                                                              "steps": 6, "denoise": 1.0}},
        "calib": {"class_type": "QuickstepCacheCalibration",
                  "inputs": {"model": ["cached", 0], "positive": ["cond", 0], "negative": ["cond", 0],
                             "cfg": cfg, "sampler": ["sampler", 0], "sigmas": ["sigmas", 0],
                             "latent_image": ["latent", 0], "noise_seed": 0, "name": name}},
        "keep": sink("calib"),
    }


def test_killed_calibration_keeps_the_previous_calibration(inproc, host_base):
    name = "qs_killed_calibration"
    folder = host_base / "models" / "quickstep_cache_calibrations"
    inproc.run(_calibration_graph(name, 2.0))
    path = folder / f"{name}.json"
    before = path.read_bytes()
    temp = _kill_while_writing(NODE_CHILD, folder, QS_BASE=str(host_base),
                               QS_GRAPH=json.dumps(_calibration_graph(name, 3.0)))
    assert path.read_bytes() == before and json.loads(before)["cfg"] == 2.0
    _assert_orphan_invisible(folder, temp, path.name)
    inproc.run(_calibration_graph(name, 3.0))                         # the next calibration of that name
    assert json.loads(path.read_text())["cfg"] == 3.0
    assert not [p for p in folder.iterdir() if is_temp_file(p.name)]


def test_killed_manifest_write_keeps_the_previous_manifest(tmp_path):
    out = tmp_path / "out"
    (out / "images").mkdir(parents=True)
    records = {f"job{i}": {"job_id": f"job{i}", "status": "not_run", "params": {"seed": i}, "seed": [i],
                           "images": [], "note": "x" * 4096} for i in range(200)}   # a manifest of ~1 MB
    manifest = Manifest(out, Storage(), {"version": 1})
    manifest.records = records
    manifest.save()
    path = out / "manifest.json"
    before = path.read_bytes()
    changed = {k: dict(r, status="done") for k, r in records.items()}
    (tmp_path / "records.json").write_text(json.dumps(changed))
    temp = _kill_while_writing(MANIFEST_CHILD, out, QS_RECORDS_FILE=str(tmp_path / "records.json"))
    assert path.read_bytes() == before
    _assert_orphan_invisible(out, temp, path.name)
    assert Manifest(out, Storage(), {}).load() == records and check_manifest(out) == ([], [])
    manifest.records = changed
    manifest.save()                                                    # the next save of the manifest
    assert all(r["status"] == "done" for r in json.loads(path.read_text())["jobs"])
    assert not [p for p in out.iterdir() if is_temp_file(p.name)]
