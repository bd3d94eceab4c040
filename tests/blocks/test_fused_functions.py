"""The custom autograd Functions behind fusion pass gradcheck in float64 on small shapes."""
import pytest
import torch
from torch.autograd import gradcheck

from mmattn.blocks import (
    CompactGlobalDescriptor,
    ConvolutionalBlockAttention,
    EfficientChannelAttention,
    SpatialGroupEnhance,
    SqueezeExcitation,
)
from mmattn.blocks._channel_gate import gate_inplace, gate_residual
from mmattn.blocks._common import Restore, gated_residual
from mmattn.blocks.sge import _GroupEnhance

SHAPES = [(2, 8, 3, 5), (1, 8, 1, 1), (2, 8, 2, 1)]


def doubled(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float64, requires_grad=True)


def restored(fn):
    """x = 2 * source, with a Restore that recomputes it, as a backbone gives a norm's output."""
    def wrapped(source, *args):
        return fn(source * 2, *args, restore=Restore(source, lambda s: s * 2))
    return wrapped


@pytest.mark.parametrize('with_restore', [False, True], ids=['keeps_x', 'restores_x'])
@pytest.mark.parametrize('gate_shape', [(2, 8, 1, 1), (2, 4, 1, 3, 5), (1, 8, 3, 5)],
                         ids=['channel', 'grouped', 'full'])
def test_gated_residual_gradcheck(gate_shape, with_restore):
    def fn(x, gate, identity, restore=None):
        return gated_residual(x * 1, gate, identity, restore)
    fn = restored(fn) if with_restore else fn
    assert gradcheck(fn, (doubled(2, 8, 3, 5), doubled(*gate_shape), doubled(2, 8, 3, 5)))


def channel_gates():
    """SE, ECA and CGD (cascade: mean and max pools) in float64, away from their init."""
    blocks = [SqueezeExcitation(8, rd_ratio=1 / 4), EfficientChannelAttention(8),
              CompactGlobalDescriptor(8), CompactGlobalDescriptor(8, mode='plain')]
    for block in blocks:
        block.double()
        with torch.no_grad():
            for param in block.parameters():
                param.normal_(0, 0.5)
    return blocks


GATE_IDS = ['se', 'eca', 'cgd_cascade', 'cgd_plain']


@pytest.mark.parametrize('keep', ['x', 'restore_fn', 'restore_affine'])
@pytest.mark.parametrize('index', range(4), ids=GATE_IDS)
def test_gate_residual_gradcheck(index, keep):
    block = channel_gates()[index]
    scale = torch.rand(1, 8, 1, 1, dtype=torch.float64) + 0.5
    shift = torch.randn(1, 8, 1, 1, dtype=torch.float64)
    params = list(block.parameters())

    def fn(source, identity, *params):
        x = source * scale + shift  # the backbone's norm output, which it gives up
        if keep == 'x':
            return gate_residual(block, x, identity)
        affine = (scale.flatten(), shift.flatten()) if keep == 'restore_affine' else None
        restore = Restore(source, lambda s: s * scale + shift, affine)
        return gate_residual(block, x, identity, restore)
    assert gradcheck(fn, (doubled(2, 8, 3, 5), doubled(2, 8, 3, 5), *params))


@pytest.mark.parametrize('index', range(4), ids=GATE_IDS)
def test_gate_inplace_gradcheck_keeps_the_output(index):
    block = channel_gates()[index]
    params = list(block.parameters())
    assert gradcheck(lambda x, *params: gate_inplace(block, x * 1), (doubled(2, 8, 3, 5), *params))


@pytest.mark.parametrize('index', range(4), ids=GATE_IDS)
def test_gate_functions_equal_the_modules_forward_and_backward(index):
    # Against block(x) + identity written with plain autograd ops (pooled_gate).
    block = channel_gates()[index]
    x, identity = doubled(2, 8, 4, 6), doubled(2, 8, 4, 6)
    upstream = torch.randn(2, 8, 4, 6, dtype=torch.float64)
    inputs = [x, identity, *block.parameters()]
    expected = block(x) + identity
    expected_grads = torch.autograd.grad((expected * upstream).sum(), inputs)
    actual = gate_residual(block, x * 1, identity)
    actual_grads = torch.autograd.grad((actual * upstream).sum(), inputs)
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)
    for got, want in zip(actual_grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_gate_inplace_gives_zero_gradient_where_the_gate_is_zero():
    # CGD plain: 1 + tanh(...) is 0 nowhere in practice; force it with a huge negative weight.
    block = CompactGlobalDescriptor(2, mode='plain').double()
    x = doubled(1, 2, 3, 3)
    with torch.no_grad():
        x[0, 0] = x[0, 0].abs() + 1  # channel 0: positive mean, so tanh saturates at -1
        block.w0.fill_(-1e6)
    gate_inplace(block, x * 1).sum().backward()
    assert torch.isfinite(block.w0.grad).all() and torch.isfinite(x.grad).all()


@pytest.mark.parametrize('identity', [False, True], ids=['alone', 'with_identity'])
@pytest.mark.parametrize('shape', SHAPES)
def test_sge_function_gradcheck(shape, identity):
    weight, bias = doubled(1, 4, 1, 1), doubled(1, 4, 1, 1)
    if identity:
        def fn(x, w, b, i):
            return _GroupEnhance.apply(x * 1, w, b, i, None, None, 4, 1e-5)
        inputs = (doubled(*shape), weight, bias, doubled(*shape))
    else:
        def fn(x, w, b):
            return _GroupEnhance.apply(x, w, b, None, None, None, 4, 1e-5)
        inputs = (doubled(*shape), weight, bias)
    assert gradcheck(fn, inputs)


@pytest.mark.parametrize('shape', SHAPES)
def test_sge_fused_residual_gradcheck_with_restore(shape):
    block = SpatialGroupEnhance(8, groups=4).double()
    with torch.no_grad():
        block.weight.normal_()
        block.bias.normal_()
    fn = restored(lambda x, i, restore: block.fused_residual(x, i, restore))
    assert gradcheck(fn, (doubled(*shape), doubled(*shape)))


@pytest.mark.parametrize('with_restore', [False, True], ids=['keeps_x', 'restores_x'])
def test_cbam_fused_residual_gradcheck(with_restore):
    block = ConvolutionalBlockAttention(8, rd_ratio=1 / 4).double().eval()
    with torch.no_grad():
        for param in block.parameters():
            param.normal_(0, 0.5)

    def fn(x, i, restore=None):
        return block.fused_residual(x * 1, i, restore)
    fn = restored(fn) if with_restore else fn
    assert gradcheck(fn, (doubled(2, 8, 3, 5), doubled(2, 8, 3, 5)))
