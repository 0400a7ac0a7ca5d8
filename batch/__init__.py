"""Batch runner for ComfyUI servers: a workflow times a parameter grid (or a CSV of jobs), spread over one or more
servers by queue length, resumable, with a manifest of parameters, timings, NFE and image paths.
A plain HTTP/websocket client: it imports nothing from ComfyUI and runs outside the server's process.

    python -m batch run WORKFLOW --grid seed=1..4 --grid sampler_name=euler,qs_dpmpp_2m \\
        --server http://127.0.0.1:8188 --server http://127.0.0.1:8189 --out out/batch

The names below are imported on first use, after checking the third-party packages (batch/requirements.txt), so a
Python that lacks one is told what to install.
"""
import importlib

_EXPORTS = {"BatchInputError": "batch.jobs", "build_jobs": "batch.jobs", "parse_grid": "batch.jobs",
            "resolve_key": "batch.jobs", "BatchResult": "batch.runner", "Storage": "batch.runner",
            "check_manifest": "batch.runner", "run_batch": "batch.runner"}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'batch' has no attribute {name!r}")
    from batch.dependencies import require
    require()
    return getattr(importlib.import_module(_EXPORTS[name]), name)
