"""Thin ComfyUI adapters over samplers/ and modelzoo/, one module per capability."""
from . import models

NODES = [*models.NODES]
