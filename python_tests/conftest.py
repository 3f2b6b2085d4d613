import atexit
import os
import shutil
import tempfile

import pytest
import torch

# torch.compile's on-disk cache keys a graph by the ops it calls, not by their compiled code: a graph
# cached from an earlier build of stn_ext could be replayed. Each test session compiles afresh.
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="stn_ext_inductor_")
    atexit.register(shutil.rmtree, os.environ["TORCHINDUCTOR_CACHE_DIR"], ignore_errors=True)

DEVICES = ["cpu", "cuda"]


@pytest.fixture
def one_thread():
    """Tiny models: one thread is fastest and avoids oversubscribing a shared machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(params=DEVICES)
def device(request):
    if request.param == "cuda":
        import stn_ext

        if not torch.cuda.is_available():
            pytest.skip("no CUDA GPU on this machine")
        if not stn_ext.has_cuda():
            pytest.skip("stn_ext was built without CUDA")
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# STN_EXT_SIMT_ROUTE=1: behind every test of the session, the stn_ext ops that have CUDA kernels run
# those kernels, compiled for the SIMT emulator and run on the CPU (stn_ext/_simt.py), in place of the
# CPU kernels. scripts/test.sh runs the layer and reversible suites once more this way.
SIMT_ROUTED = os.environ.get("STN_EXT_SIMT_ROUTE") == "1"


# Too slow with emulated kernels (the reversible kernels run about 10^6 CUDA threads a second on the
# emulator): a million, and 20,000, elements times 1000 steps and back (1000 elements stay, same code).
SIMT_TOO_SLOW = ("test_round_trip_exact_million", "test_round_trip_exact[20000-")


def pytest_collection_modifyitems(config, items):
    if not SIMT_ROUTED:
        return
    skip = pytest.mark.skip(reason="too slow with the stn_ext ops routed to the emulated CUDA kernels")
    for item in items:
        if item.name.startswith(SIMT_TOO_SLOW):
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _simt_route():
    if not SIMT_ROUTED:
        yield
        return
    from stn_ext import _simt

    ops = _simt.load()
    before = ops.launches()
    lib = _simt.route()
    yield
    _simt.unroute(lib)
    assert ops.launches() > before, "STN_EXT_SIMT_ROUTE=1, but no emulated kernel was launched"
