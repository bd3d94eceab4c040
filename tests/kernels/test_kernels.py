"""What mmattn/kernels promises: which tensors the fused CPU kernels take, that the blocks really
call them, and that a failed build falls back to the eager path with a warning.

The kernels' math is checked where each block's is: the blocks' tests run once per path (the
``kernel_path`` fixture), against independent implementations of the papers' op sequences.
"""
import warnings

import pytest
import torch
from torch.profiler import profile

from mmattn import kernels
from mmattn.blocks import SpatialGroupEnhance


def op_names(fn) -> set[str]:
    with profile() as prof:
        fn()
    return {event.name for event in prof.events()}


def sge_block() -> SpatialGroupEnhance:
    block = SpatialGroupEnhance(16, groups=4)
    with torch.no_grad():
        block.weight.normal_()
        block.bias.normal_()
    return block


@pytest.mark.usefixtures('kernel_path')
def test_kernel_path_runs_the_sge_ops(kernel_path):
    block = sge_block()
    x = torch.randn(2, 16, 5, 7, requires_grad=True)

    names = op_names(lambda: block(x).sum().backward())
    called = {'mmattn::sge_forward', 'mmattn::sge_backward'} <= names
    assert called == (kernel_path == 'kernels')


@pytest.mark.parametrize('case', ['half', 'mixed_dtypes', 'channels_last'])
def test_kernels_refuse_what_they_do_not_cover(case):
    x = torch.randn(2, 8, 3, 5)
    tensors = {
        'half': (x.half(),),
        'mixed_dtypes': (x, x.double()),
        'channels_last': (x.contiguous(memory_format=torch.channels_last),),
    }[case]
    assert kernels.usable(x)
    assert not kernels.usable(*tensors)


def test_kernels_switched_off_by_the_environment(monkeypatch):
    monkeypatch.setenv('MMATTN_KERNELS', '0')
    assert not kernels.usable(torch.randn(2, 8, 3, 5))


def test_weight_gradient_alone_equals_the_eager_path(monkeypatch):
    block = sge_block().double()
    x = torch.randn(2, 16, 5, 7, dtype=torch.float64)
    grads = {}
    for switch in ('1', '0'):
        monkeypatch.setenv('MMATTN_KERNELS', switch)
        block.zero_grad()
        (block(x) * torch.linspace(-1, 1, x.numel(), dtype=x.dtype).view_as(x)).sum().backward()
        grads[switch] = (block.weight.grad.clone(), block.bias.grad.clone())
    torch.testing.assert_close(grads['1'], grads['0'])


@pytest.fixture
def failing_build(monkeypatch):
    """The next build attempt fails as it does on a machine without a C++ compiler."""
    import torch.utils.cpp_extension as cpp_extension

    def no_compiler(*args, **kwargs):
        raise RuntimeError('Error building extension: c++: command not found\nmore lines')

    monkeypatch.setattr(cpp_extension, 'load', no_compiler)
    kernels._build.cache_clear()
    yield
    monkeypatch.undo()
    kernels._build.cache_clear()


@pytest.mark.usefixtures('failing_build')
def test_failed_build_warns_once_and_the_blocks_take_the_eager_path():
    block = sge_block()
    x = torch.randn(2, 16, 5, 7)
    with pytest.warns(UserWarning, match=r'could not be built \(RuntimeError: Error building '
                                         r'extension: c\+\+: command not found\)'):
        assert not kernels.enabled()
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # the failure is remembered: no second warning
        names = op_names(lambda: block(x))
    assert 'mmattn::sge_forward' not in names
