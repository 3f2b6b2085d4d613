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
