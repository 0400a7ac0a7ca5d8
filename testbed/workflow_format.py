"""The workflow-format converter lives in batch/workflow_format.py (the batch runner needs it at run time, outside
the test harness); re-exported here for the tests and scripts that use it."""
from batch.workflow_format import api_to_ui, canonical, combo_options, ui_to_api  # noqa: F401
