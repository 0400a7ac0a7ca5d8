"""Fixtures: the real ComfyUI host in this process and as an HTTP server on 127.0.0.1, both over one test base
directory that links this pack and the test-only nodes into custom_nodes."""
import os
import sys
from pathlib import Path

import pytest

PACK_DIR = Path(__file__).resolve().parent.parent
sys.path.append(str(PACK_DIR))   # appended: ComfyUI's own top-level modules (nodes, utils) must win

from testbed.host import HOST_DIR, Client, Server, install_real_taesd, prepare_base  # noqa: E402
# Import the pack's plain-torch packages now: once the host starts, ComfyUI puts ComfyUI/comfy first on sys.path,
# where comfy/samplers.py would shadow this pack's samplers/ for any later `import samplers`.
import modelzoo  # noqa: E402,F401
import samplers  # noqa: E402,F401

REAL_TAESD = ("taesd", "taef1", "taesdxl", "taesd3")


@pytest.fixture(scope="session")
def host_base():
    base = Path(os.environ.get("QS_TEST_BASE", HOST_DIR / "testbase"))
    return prepare_base(base, with_testbed_nodes=True)


@pytest.fixture(scope="session")
def real_taesd(host_base):
    """The real TAESD-family files from ../shared/models/taesd in the test base's models/vae_approx, where the stock
    VAELoader lists them by name (taesd, taef1, taesdxl, taesd3); returns that folder. Skips, naming the missing
    files, where ../shared is absent."""
    missing = install_real_taesd(host_base, REAL_TAESD)
    if missing:
        pytest.skip(f"the real TAESD files are not here: {', '.join(missing)}")
    return host_base / "models" / "vae_approx"


@pytest.fixture(scope="session")
def inproc(host_base):
    from testbed.inproc import InProcessHost
    host = InProcessHost(host_base)
    from testbed.make_model_files import write_model_files
    write_model_files(host_base)
    return host


@pytest.fixture(scope="session")
def server(host_base, inproc, tmp_path_factory):
    """The real server (main.py), started once per session; model files exist before it starts."""
    srv = Server(host_base, tmp_path_factory.mktemp("server") / "server.log").start()
    yield srv
    srv.stop()


@pytest.fixture()
def client(server):
    assert server.alive(), server.log()[-3000:]
    return Client(server.address)
