"""Batch-runner timings: the same 20-job batch (workflows/api/digits_fast_sampling.api.json as shipped: 20 digits per
job, 8 steps, CFG 2.5; seeds x 2 samplers) on one ComfyUI server and spread over two, then an interrupted batch
(stopped after half its jobs) resumed. Each server is its own process started here on 127.0.0.1 with one torch
thread (OMP_NUM_THREADS, default 1): two servers on a 2-core machine are the scale-out ComfyUI does, one queue each.
Every run uses its own seeds, so no server answers from its output cache.

usage: python -m bench.batch [--jobs 20] [--threads 1] [--reference]
Writes bench/results/batch.json and prints a table.
"""
import argparse
import json
import os
import tempfile
import threading
import time
from pathlib import Path

from batch import check_manifest, run_batch
from testbed.host import HOST_DIR, PACK_DIR, Server, api_workflow_path, prepare_base

RESULTS = PACK_DIR / "bench" / "results"
WORKFLOW = api_workflow_path("digits_fast_sampling")
SAMPLERS = ["qs_unipc_bh2", "euler"]


def start_servers(base, logs, count, threads):
    """`count` ComfyUI servers on `base`, started side by side, each with OMP_NUM_THREADS=`threads` (testbed's
    Server passes this process's environment on)."""
    old = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = str(threads)
    servers = [Server(base, Path(logs) / f"server{i}.log") for i in range(count)]
    try:
        starters = [threading.Thread(target=s.start) for s in servers]
        for t in starters:
            t.start()
        for t in starters:
            t.join()
    finally:
        if old is None:
            os.environ.pop("OMP_NUM_THREADS")
        else:
            os.environ["OMP_NUM_THREADS"] = old
    if not all(s.alive() for s in servers):   # a start that raised in its thread: stop the others, show the logs
        logs = "\n".join(s.log()[-2000:] for s in servers)
        for s in servers:
            s.stop()
        raise RuntimeError(f"a ComfyUI server did not start:\n{logs}")
    return servers


def _summary(name, result, out):
    done = [r for r in result.records if r["status"] == "done"]
    missing, unlisted = check_manifest(out)
    return {"run": name, "jobs_done": len(done), "skipped_from_earlier_run": result.skipped,
            "wall_s": round(result.wall_s, 2),
            "jobs_per_s": round((len(done) - result.skipped) / result.wall_s, 3) if result.wall_s else None,
            "mean_run_s": round(sum(r["run_s"] for r in done) / len(done), 3) if done else None,
            "mean_queue_s": round(sum(r["queue_s"] for r in done) / len(done), 3) if done else None,
            "per_server": {url: sum(r["server"] == url for r in done) for url in {r["server"] for r in done}},
            "manifest_matches_disk": not missing and not unlisted, "exit_code": result.exit_code}


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each server")
    parser.add_argument("--reference", action="store_true", help="also run 8 jobs (2 seeds, steps 4 and 8) with steps=30 references")
    args = parser.parse_args(argv)
    seeds_per_run = args.jobs // len(SAMPLERS)
    base = prepare_base(HOST_DIR / "benchbase", with_testbed_nodes=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.time()
        servers = start_servers(base, tmp, 2, args.threads)
        print(f"two servers up in {time.time() - t0:.1f} s")
        urls = [f"http://{s.address}" for s in servers]
        try:
            def grid(run):
                first = 1000 * (run + 1)
                return [f"seed={first}..{first + seeds_per_run - 1}", "sampler_name=" + ",".join(SAMPLERS)]
            # Warm both servers (model load, first-call overheads) with one job each, outside the timings.
            run_batch(WORKFLOW, urls[:1], tmp / "warm0", grid=["seed=1"], progress=False, report=False)
            run_batch(WORKFLOW, urls[1:], tmp / "warm1", grid=["seed=1"], progress=False, report=False)
            for run, (name, use) in enumerate([("one server", urls[:1]), ("two servers", urls)]):
                out = tmp / f"run{run}"
                rows.append(_summary(name, run_batch(WORKFLOW, use, out, grid=grid(run), progress=False), out))
            out = tmp / "resume"
            half = run_batch(WORKFLOW, urls, out, grid=grid(2), progress=False, max_jobs=args.jobs // 2)
            rows.append(_summary("two servers, stopped after half", half, out))
            rows.append(_summary("  ... resumed", run_batch(WORKFLOW, urls, out, grid=grid(2), resume=True,
                                                            progress=False), out))
            if args.reference:
                out, first = tmp / "reference", 4000
                result = run_batch(WORKFLOW, urls, out, grid=[f"seed={first},{first + 1}", "sampler_name=" + ",".join(
                    SAMPLERS), "steps=4,8"], reference=["steps=30"],
                                   progress=False)
                rows.append(_summary("two servers, 2 seeds x steps 4/8 + steps-30 references", result, out))
                errors = {}
                for r in result.records:
                    if r["role"] == "job" and r.get("rmse_vs_reference") is not None:
                        key = f"{r['params']['sampler_name']} {r['params']['steps']} steps"
                        errors.setdefault(key, []).append(r["rmse_vs_reference"])
                rows[-1]["mean_rmse_vs_reference"] = {k: round(sum(v) / len(v), 4) for k, v in errors.items()}
        finally:
            for s in servers:
                s.stop()
    RESULTS.mkdir(parents=True, exist_ok=True)
    meta = {"workflow": WORKFLOW.name, "jobs": args.jobs, "server_threads": args.threads, "cpu_count": os.cpu_count(),
            "load_average_at_end": os.getloadavg()}
    (RESULTS / "batch.json").write_text(json.dumps({"meta": meta, "runs": rows}, indent=1))
    print("| run | jobs done (earlier) | wall s | jobs/s | mean run s | mean queue s | per server | manifest ok |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['run']} | {r['jobs_done']} ({r['skipped_from_earlier_run']}) | {r['wall_s']} | {r['jobs_per_s']} "
              f"| {r['mean_run_s']} | {r['mean_queue_s']} | {sorted(r['per_server'].values())} "
              f"| {r['manifest_matches_disk']} |")
    print("load average:", meta["load_average_at_end"])


if __name__ == "__main__":
    main()
