"""Quickstep: fast diffusion sampling for ComfyUI. Registers the pack's nodes through the host's v3 API, after
checking that the host APIs they use exist (host_api.py): a host without them logs why, and starts without us."""
import logging

from .host_api import missing_host_apis

MISSING = missing_host_apis()

if MISSING:
    logging.error("Quickstep is not loaded: this ComfyUI lacks %s; Quickstep needs ComfyUI 0.3.75 or newer.",
                  ", ".join(MISSING))
else:
    from typing_extensions import override
    from comfy_api.latest import ComfyExtension

    from .nodes import NODES

    class QuickstepExtension(ComfyExtension):
        @override
        async def get_node_list(self):
            return NODES

    async def comfy_entrypoint():
        return QuickstepExtension()
