"""The custom autograd Functions behind fusion pass gradcheck in float64 on small shapes."""
import pytest
import torch
from torch.autograd import gradcheck

from mmattn.blocks import ConvolutionalBlockAttention, SpatialGroupEnhance
from mmattn.blocks._common import Restore, gated_residual, scale_inplace
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


def test_scale_inplace_gradcheck_keeps_the_output():
    scale = (torch.rand(2, 8, 1, 1, dtype=torch.float64) + 0.5).requires_grad_()
    assert gradcheck(lambda x, s: scale_inplace(x * 1, s), (doubled(2, 8, 3, 5), scale))


def test_scale_inplace_gives_zero_gradient_to_a_zero_scale():
    x = doubled(1, 2, 3, 3)
    scale = torch.tensor([0.0, 1.5], dtype=torch.float64).view(1, 2, 1, 1).requires_grad_()
    scale_inplace(x * 1, scale).sum().backward()
    assert scale.grad[0, 0].item() == 0
    torch.testing.assert_close(scale.grad[0, 1].item(), x[0, 1].sum().item())


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
