"""Quickstep: fast diffusion sampling for ComfyUI. Registers the pack's nodes through the host's v3 API."""
import logging

from typing_extensions import override

try:
    from comfy_api.latest import ComfyExtension
except ImportError as error:   # a host without the v3 node API: say so, never break the host's start-up
    logging.error("Quickstep is not loaded: this ComfyUI lacks the v3 node API (%s); it needs ComfyUI 0.3.75 or "
                  "newer.", error)
else:
    from .nodes import NODES

    class QuickstepExtension(ComfyExtension):
        @override
        async def get_node_list(self):
            return NODES

    async def comfy_entrypoint():
        return QuickstepExtension()
