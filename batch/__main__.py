"""python -m batch run WORKFLOW [--grid KEY=V1,V2 ...| --jobs jobs.csv] --server URL [--server URL ...] --out DIR
   [--resume] [--reference KEY=VALUE ...] [--queue-depth N] [--max-jobs N] [--no-progress]
Exit status: 0 when every job is done, 1 when some failed or did not run (listed), 2 for bad input or a package
missing from this Python (named, with the pip command)."""
import argparse
import sys

from batch.dependencies import MissingDependencies, require


def main(argv=None):
    try:
        require()
    except MissingDependencies as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from batch.jobs import BatchInputError
    from batch.runner import check_manifest, run_batch
    parser = argparse.ArgumentParser(prog="python -m batch", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run (or --resume) a batch")
    run.add_argument("workflow", help="workflow JSON, API or UI format")
    run.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                     help="values of one input: node_id.input, Title.input or an alias (seed, steps, sampler_name, "
                          "scheduler, cfg, denoise, text); a..b is an integer range; the jobs are the product")
    run.add_argument("--jobs", help="CSV, one job per row, header = grid keys (instead of --grid)")
    run.add_argument("--server", action="append", required=True, help="ComfyUI URL; repeat for several")
    run.add_argument("--out", required=True, help="output directory (manifest, images/, contact sheet)")
    run.add_argument("--resume", action="store_true", help="finish the batch in --out, skipping finished jobs")
    run.add_argument("--reference", action="append", default=[], metavar="KEY=VALUE",
                     help="settings of the reference run of each job (e.g. steps=50): adds RMSE and the plot")
    run.add_argument("--queue-depth", type=int, default=2, help="prompts of ours held in each server's queue")
    run.add_argument("--max-jobs", type=int, help="stop after this many jobs (resume later)")
    run.add_argument("--timeout", type=float, default=600, help="seconds one job may take")
    run.add_argument("--no-progress", action="store_true")
    check = sub.add_parser("check", help="compare a batch's manifest with the images on disk")
    check.add_argument("out")
    args = parser.parse_args(argv)
    if args.command == "check":
        missing, unlisted = check_manifest(args.out)
        for path in missing:
            print("listed, missing:", path)
        for path in unlisted:
            print("on disk, not listed:", path)
        print("manifest matches the images on disk" if not (missing or unlisted) else "manifest does NOT match")
        return 0 if not (missing or unlisted) else 1
    try:
        result = run_batch(args.workflow, args.server, args.out, grid=args.grid or None, jobs=args.jobs,
                           reference=args.reference or None, resume=args.resume, progress=not args.no_progress,
                           queue_depth=args.queue_depth, timeout_s=args.timeout, max_jobs=args.max_jobs)
    except BatchInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    done, failed, not_run = result.ids("done"), result.ids("failed"), result.ids("not_run") + result.ids("running")
    print(f"{len(done)} done ({result.skipped} from an earlier run), {len(failed)} failed, {len(not_run)} not run "
          f"in {result.wall_s:.1f} s; manifest: {result.out_dir / 'manifest.json'}")
    for job_id in failed:
        print(f"failed: {job_id}", file=sys.stderr)
    for job_id in not_run:
        print(f"not run: {job_id}", file=sys.stderr)
    return result.exit_code


if __name__ == "__main__":
    sys.exit(main())
