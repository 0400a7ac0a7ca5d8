"""What every Quickstep node shares: the category root and input checks whose errors name the node and the value.

The host validates neither a v3 combo's value nor NaN/inf in a FLOAT input, so nodes check their own inputs."""
import math

CATEGORY = "Quickstep"


class QuickstepInputError(ValueError):
    def __init__(self, node, message):
        super().__init__(f"{node}: {message}")


def require_choice(node, name, value, options):
    if value not in options:
        raise QuickstepInputError(node, f"{name} = {value!r} is not one of {', '.join(map(str, options))}")
    return value


def require_finite(node, name, value, low=None, high=None):
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        raise QuickstepInputError(node, f"{name} = {value!r} must be a finite number")
    if (low is not None and value < low) or (high is not None and value > high):
        raise QuickstepInputError(node, f"{name} = {value!r} is outside [{low}, {high}]")
    return value
