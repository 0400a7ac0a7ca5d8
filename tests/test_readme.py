"""README claims that can be checked against the running host: the names the pack adds to the stock KSampler's
sampler and scheduler lists are exactly those the README lists; the README's example workflows are the shipped ones."""
import json
import re
from pathlib import Path

from testbed.host import WORKFLOW_INDEX

README = Path(__file__).resolve().parent.parent / "README.md"


def _listed_after(marker):
    """The `qs_...` names in the README paragraph that starts at `marker`."""
    text = README.read_text()
    assert marker in text, f"README has no '{marker}'"
    paragraph = text[text.index(marker):].split("\n\n")[0]
    return set(re.findall(r"\bqs_\w+", paragraph))


def test_readme_lists_every_sampler_and_scheduler_the_pack_adds(inproc):
    import comfy.samplers
    added_samplers = {n for n in comfy.samplers.KSAMPLER_NAMES if n.startswith("qs_")}
    added_schedulers = {n for n in comfy.samplers.SCHEDULER_NAMES if n.startswith("qs_")}
    assert added_samplers and added_schedulers
    assert _listed_after("In the stock sampler list:") == added_samplers
    assert _listed_after("In the stock scheduler list:") == added_schedulers


def test_readme_lists_every_shipped_workflow():
    text = README.read_text()
    section = text[text.index("### Example workflows"):]
    section = section[:section.index("\n## ")]
    missing = set(json.loads(WORKFLOW_INDEX.read_text())) - set(re.findall(r"`([a-z0-9_]+)`", section))
    assert not missing, f"README's example workflows do not name {sorted(missing)}"
