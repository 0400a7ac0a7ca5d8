"""Quickstep uses only host APIs that exist in the pinned host, and a host lacking one gets a logged error naming it
while ComfyUI starts without the pack (no crash of the start-up)."""
import importlib
import importlib.util
import logging
import re
import sys
from pathlib import Path


import host_api

PACK_DIR = Path(__file__).resolve().parent.parent
SOURCES = [PACK_DIR / "__init__.py", PACK_DIR / "host_api.py",
           *[p for folder in ("nodes", "samplers", "modelzoo") for p in (PACK_DIR / folder).glob("*.py")]]
DOTTED = re.compile(r"\b(comfy(?:_api)?(?:\.[A-Za-z_]\w*)+)")
FROM_IMPORT = re.compile(r"from (comfy(?:_api)?[\w.]*) import ([\w, ]+)")


def _resolve(dotted):
    """Import the longest importable module prefix of `dotted`, then walk the remaining attributes."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            value = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for name in parts[cut:]:
            value = getattr(value, name)
        return value
    raise ImportError(dotted)


def _host_names_used():
    names = set()
    for path in SOURCES:
        text = path.read_text()
        names.update(DOTTED.findall(text))
        for module, imported in FROM_IMPORT.findall(text):
            names.update(f"{module}.{name.strip()}" for name in imported.split(",") if name.strip())
    return sorted(names)


def test_every_host_name_the_pack_uses_exists_in_the_pinned_host(inproc):
    used = _host_names_used()
    assert len(used) > 30
    missing = []
    for dotted in used:
        try:
            _resolve(dotted)
        except (ImportError, AttributeError):
            missing.append(dotted)
    assert not missing
    assert host_api.missing_host_apis() == []
    # every module the pack reaches into is covered by the start-up check, or is a model class only the tests and
    # the caches' family detection name
    checked = set(host_api.REQUIRED)
    unchecked = {d.rsplit(".", 1)[0] for d in used if d.count(".") > 1} - checked
    assert all(m.startswith(("comfy.ldm", "comfy.supported_models", "comfy.latent_formats", "comfy.model_sampling",
                             "comfy.patcher_extension.WrappersMP",   # members of a checked class
                             "comfy.model_base.ModelType", "comfy.samplers.SCHEDULER_NAMES", "comfy.k_diffusion"))
               for m in unchecked), unchecked


def test_missing_host_apis_names_each_gap(inproc):
    assert host_api.missing_host_apis({"comfy.samplers": ("KSAMPLER", "NoSuchThing"), "comfy.no_such_module": ()}) \
        == ["comfy.samplers.NoSuchThing", "comfy.no_such_module"]


def test_a_host_without_an_api_starts_without_the_pack(inproc, monkeypatch, caplog):
    import comfy.samplers
    monkeypatch.delattr(comfy.samplers, "SchedulerHandler")
    name = "quickstep_host_api_probe"
    spec = importlib.util.spec_from_file_location(name, PACK_DIR / "__init__.py",
                                                  submodule_search_locations=[str(PACK_DIR)])
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)
    with caplog.at_level(logging.ERROR):
        spec.loader.exec_module(module)                  # must not raise
    assert module.MISSING == ["comfy.samplers.SchedulerHandler"]
    assert not hasattr(module, "comfy_entrypoint")
    assert "comfy.samplers.SchedulerHandler" in caplog.text and "Quickstep is not loaded" in caplog.text
    for loaded in [m for m in sys.modules if m.startswith(name + ".")]:
        monkeypatch.delitem(sys.modules, loaded)
