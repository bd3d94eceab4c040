import copy
import pathlib

import pytest
import torch
from mmengine.registry import DefaultScope

import mmattn  # noqa: F401  (registers the blocks for every test)
from mmattn import kernels


@pytest.fixture(autouse=True)
def _seeded() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _isolated_default_scope():
    """Undo the default scope a test's Runner sets for the whole process (mmengine keeps the
    latest DefaultScope as current), as mmengine's own ``overwrite_default_scope`` undoes its."""
    saved = copy.copy(DefaultScope._instance_dict)
    yield
    DefaultScope._instance_dict = saved


CONFIGS = pathlib.Path(__file__).resolve().parents[1] / 'configs'


@pytest.fixture
def configs() -> pathlib.Path:
    """The repository's configs folder, wherever the test runs from."""
    return CONFIGS


@pytest.fixture
def native_convolutions():
    """torch's native convolutions instead of oneDNN's for the test.

    oneDNN compiles a kernel for every new convolution shape (about 1 s of CPU per ResNet-50
    here); at the narrow widths of the tests torch's native kernels are faster. A folder's
    conftest turns this on for all of its tests with an autouse fixture that requests it.
    """
    enabled = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    yield
    torch.backends.mkldnn.enabled = enabled


@pytest.fixture(params=['kernels', 'eager'])
def kernel_path(request, monkeypatch) -> str:
    """Runs the test once through mmattn's fused CPU kernels and once through the eager path."""
    monkeypatch.setenv('MMATTN_KERNELS', '1' if request.param == 'kernels' else '0')
    if request.param == 'kernels':
        assert kernels.enabled(), 'the fused CPU kernels (mmattn/kernels) did not build here'
    return request.param
