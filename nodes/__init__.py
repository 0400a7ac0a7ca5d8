"""Thin ComfyUI adapters over samplers/ and modelzoo/, one module per capability."""
from . import caching, distilled, models, restoration, samplers, schedules, solver

samplers.register_in_host_lists()
schedules.register_dmn_scheduler()

NODES = [*models.NODES, *samplers.NODES, *schedules.NODES, *solver.NODES, *caching.NODES, *restoration.NODES,
         *distilled.NODES]
