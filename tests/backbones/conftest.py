import pytest
import torch


@pytest.fixture(autouse=True)
def _native_convolutions():
    # oneDNN compiles a kernel for every new convolution shape (about 1 s of CPU per ResNet-50
    # here); at base_channels=16 torch's native kernels are faster, so the suite stays fast.
    enabled = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    yield
    torch.backends.mkldnn.enabled = enabled
