"""The benchmark protocol's fixed choices (bench/README.md): which noises tune and which report, and which trained
models the pack's defaults were chosen on."""

# Noises: defaults, thresholds and presets are chosen on TUNING_SEED; the README reports TEST_SEED.
TUNING_SEED = 1234
TEST_SEED = 20261207

# The models the shipped defaults were tuned on (sessions 1-4: the SD1.5 digit UNets, as `bench.solvers` names them);
# every other trained architecture is a test model for those defaults.
TUNING_MODELS = ("digits", "digits-flow")


def split_label(family):
    """'tuning' or 'test': how a table marks a model row."""
    return "tuning" if family in TUNING_MODELS else "test"
