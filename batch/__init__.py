"""Batch runner for ComfyUI servers: a workflow times a parameter grid (or a CSV of jobs), spread over one or more
servers by queue length, resumable, with a manifest of parameters, timings, NFE and image paths.
A plain HTTP/websocket client: it imports nothing from ComfyUI and runs outside the server's process.

    python -m batch run WORKFLOW --grid seed=1..4 --grid sampler_name=euler,qs_dpmpp_2m \\
        --server http://127.0.0.1:8188 --server http://127.0.0.1:8189 --out out/batch
"""
from batch.jobs import BatchInputError, build_jobs, parse_grid, resolve_key  # noqa: F401
from batch.runner import BatchResult, Storage, check_manifest, run_batch  # noqa: F401
