"""The third-party packages the batch runner imports, checked up front: a Python without one gets a message naming
what to install instead of a ModuleNotFoundError from deep inside the runner. batch/requirements.txt lists the same
packages (a test keeps the two equal)."""
import importlib
import sys

REQUIREMENTS_FILE = "batch/requirements.txt"
# pip name -> the module the runner imports
PACKAGES = {"aiohttp": "aiohttp", "tqdm": "tqdm", "numpy": "numpy", "Pillow": "PIL", "matplotlib": "matplotlib"}


class MissingDependencies(ImportError):
    """Packages the batch runner needs are not installed; the message names them and the pip command."""


def missing_packages():
    """{pip name: why it cannot be imported} for every package the runner needs that this Python lacks."""
    missing, missing_modules = {}, set()
    for package, module in PACKAGES.items():
        try:
            importlib.import_module(module)
        except ImportError as error:
            if (getattr(error, "name", None) or "").split(".")[0] in missing_modules:
                continue   # fails only for want of a package already named (matplotlib without Pillow)
            missing[package] = str(error)
            missing_modules.add(module)
    return missing


def require():
    """Raises MissingDependencies naming every missing package and the command that installs them."""
    missing = missing_packages()
    if missing:
        raise MissingDependencies(
            f"the batch runner needs {', '.join(missing)}, which this Python ({sys.executable}) cannot import "
            f"({'; '.join(missing.values())}).\nInstall them with:  {sys.executable} -m pip install "
            f"{' '.join(missing)}\n(or everything the runner needs:  pip install -r {REQUIREMENTS_FILE})")
