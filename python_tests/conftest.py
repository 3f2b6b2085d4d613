import pytest
import torch

DEVICES = ["cpu", "cuda"]


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
