"""Functions of the stand-in that exist so that an import of them works, and raise when called."""


def unavailable(module, name):
    def f(*args, **kwargs):
        raise RuntimeError(f"torchvision stub: {module}.{name}() is not available")
    f.__name__ = name
    return f
