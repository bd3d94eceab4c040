"""The custom autograd Functions behind fusion pass gradcheck in float64 on small shapes."""
import pytest
import torch
import torch.nn as nn
from torch.autograd import gradcheck

from mmattn.backbones.res_blocks import frozen_affine
from mmattn.blocks import (
    CompactGlobalDescriptor,
    ConvolutionalBlockAttention,
    EfficientChannelAttention,
    GlobalSecondOrderPooling,
    SpatialGroupEnhance,
    SqueezeExcitation,
)
from mmattn.blocks._channel_gate import (
    gate_inplace,
    gate_norm,
    gate_residual,
    norm_gate_residual,
)
from mmattn.blocks._common import Restore, channel_affine, gated_residual
from mmattn.blocks.sge import _GroupEnhance

SHAPES = [(2, 8, 3, 5), (1, 8, 1, 1), (2, 8, 2, 1)]


def doubled(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float64, requires_grad=True)


def restored(fn):
    """x = 2 * source, with a Restore that recomputes it, as a backbone gives a norm's output."""
    def wrapped(source, *args):
        return fn(source * 2, *args, restore=Restore(source, lambda s: s * 2))
    return wrapped


@pytest.mark.parametrize('keep', ['x', 'restore_fn', 'restore_affine'])
@pytest.mark.parametrize('gate_shape', [(2, 8, 1, 1), (1, 8, 1, 1)],
                         ids=['per_sample', 'shared'])
def test_gated_residual_gradcheck(gate_shape, keep):
    scale = torch.rand(1, 8, 1, 1, dtype=torch.float64) + 0.5
    shift = torch.randn(1, 8, 1, 1, dtype=torch.float64)

    def fn(source, gate, identity):
        x = source * scale + shift  # the backbone's norm output, which it gives up
        if keep == 'x':
            return gated_residual(x, gate, identity)
        affine = (scale.flatten(), shift.flatten()) if keep == 'restore_affine' else None
        return gated_residual(x, gate, identity, Restore(source, lambda s: s * scale + shift,
                                                         affine))
    assert gradcheck(fn, (doubled(2, 8, 3, 5), doubled(*gate_shape), doubled(2, 8, 3, 5)))


@pytest.mark.parametrize('gate_shape', [(2, 4, 1, 1, 1), (2, 8, 3, 5), (2, 8)])
def test_gated_residual_rejects_gates_that_are_not_per_channel(gate_shape):
    x = torch.randn(2, 8, 3, 5)
    with pytest.raises(ValueError, match=r'gated_residual: gate of shape .* one factor per '
                                         r'channel, \(N, C, 1, 1\)'):
        gated_residual(x, torch.rand(gate_shape), torch.randn(2, 8, 3, 5))


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


@pytest.mark.usefixtures('kernel_path')
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


def gsop_block(stride: int) -> GlobalSecondOrderPooling:
    """A channel-mode GSoP block in float64, away from its init, its BN layers frozen."""
    block = GlobalSecondOrderPooling(8, att_dim=4, dr_stride=stride).double().eval()
    with torch.no_grad():
        for param in block.parameters():
            param.normal_(0, 0.5)
        for name, buffer in block.named_buffers():
            if name.endswith('running_var'):
                buffer.uniform_(0.5, 2)
            elif name.endswith('running_mean'):
                buffer.normal_(0, 0.2)
    return block


@pytest.mark.usefixtures('kernel_path')
@pytest.mark.parametrize('stride', [1, 2])
def test_gsop_folded_norm_gradcheck(stride):
    # bn3 as (scale, shift), both trained, the scale of both signs; odd map sides, so stride 2
    # keeps the first row and column of each pair and the last one alone.
    block = gsop_block(stride)
    params = list(block.parameters())

    def fn(src, scale, shift, identity, *params):
        return block.fused_norm_residual(src * 1, scale, shift, identity)
    assert gradcheck(fn, (doubled(2, 8, 5, 7), doubled(8), doubled(8), doubled(2, 8, 5, 7),
                          *params))


@pytest.mark.usefixtures('kernel_path')
@pytest.mark.parametrize('stride', [1, 2])
def test_gsop_folded_norm_equals_bn_and_block(stride):
    # Against nn.BatchNorm2d in eval mode and the block's own forward, outputs and gradients.
    block = gsop_block(stride)
    norm = nn.BatchNorm2d(8).double().eval()
    with torch.no_grad():
        norm.weight.normal_(0, 1)  # both signs
        norm.bias.normal_(0, 0.5)
        norm.running_mean.normal_(0, 0.5)
        norm.running_var.uniform_(0.5, 2)
    src, identity = doubled(2, 8, 6, 7), doubled(2, 8, 6, 7)
    upstream = torch.randn(2, 8, 6, 7, dtype=torch.float64)
    inputs = [src, identity, norm.weight, norm.bias, *block.parameters()]
    expected = block(norm(src)) + identity
    expected_grads = torch.autograd.grad((expected * upstream).sum(), inputs)
    actual = block.fused_norm_residual(src * 1, *frozen_affine(norm), identity)
    assert type(actual.grad_fn).__name__ == '_FoldedChannelGSoPBackward'
    actual_grads = torch.autograd.grad((actual * upstream).sum(), inputs)
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)
    for got, want in zip(actual_grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.usefixtures('kernel_path')
@pytest.mark.parametrize('shape', SHAPES)
def test_sge_fused_residual_gradcheck_with_restore(shape):
    block = SpatialGroupEnhance(8, groups=4).double()
    with torch.no_grad():
        block.weight.normal_()
        block.bias.normal_()
    fn = restored(lambda x, i, restore: block.fused_residual(x, i, restore))
    assert gradcheck(fn, (doubled(*shape), doubled(*shape)))


@pytest.mark.usefixtures('kernel_path')
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


@pytest.fixture(params=[(i, first) for first in (True, False) for i in range(4)],
                ids=[f'{name}-{order}' for order in ('norm_then_gate', 'gate_then_norm')
                     for name in GATE_IDS])
def folded_case(request) -> tuple[nn.Module, bool]:
    """(block, norm_first) for every channel gate; a max pool does not commute with the norm."""
    index, norm_first = request.param
    block = channel_gates()[index]
    if norm_first and block.pools_max:
        pytest.skip('a max pool does not commute with the norm')
    return block, norm_first


def test_folded_norm_gradcheck(folded_case):
    # A frozen BN as (scale, shift), both trained (they carry the BN's weight and bias); the
    # scale takes both signs.
    block, norm_first = folded_case
    params = list(block.parameters())
    scale, shift = doubled(8), doubled(8)

    def fn(src, scale, shift, identity, *params):
        if norm_first:
            return norm_gate_residual(block, src * 1, scale, shift, identity)
        return gate_norm(block, src * 1, scale, shift)
    assert gradcheck(fn, (doubled(2, 8, 3, 5), scale, shift, doubled(2, 8, 3, 5), *params))


@pytest.mark.usefixtures('kernel_path')
def test_folded_norm_equals_bn_and_block(folded_case):
    # Against nn.BatchNorm2d in eval mode and the block's own forward, outputs and gradients.
    block, norm_first = folded_case
    bn = nn.BatchNorm2d(8).double().eval()
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2)
        bn.weight.normal_()
        bn.bias.normal_()
    src, identity = doubled(2, 8, 4, 6), doubled(2, 8, 4, 6)
    upstream = torch.randn(2, 8, 4, 6, dtype=torch.float64)
    inputs = [src, identity, bn.weight, bn.bias, *block.parameters()]
    expected = block(bn(src)) + identity if norm_first else bn(block(src))
    expected_grads = torch.autograd.grad((expected * upstream).sum(), inputs, allow_unused=True)
    scale, shift = frozen_affine(bn)
    actual = (norm_gate_residual(block, src * 1, scale, shift, identity) if norm_first
              else gate_norm(block, src * 1, scale, shift))
    actual_grads = torch.autograd.grad((actual * upstream).sum(), inputs, allow_unused=True)
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)
    for got, want in zip(actual_grads, expected_grads, strict=True):
        if want is None:
            assert got is None or not got.any()
        else:
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    with torch.no_grad():  # the same without autograd (which may write over src)
        again = (norm_gate_residual(block, src.clone(), scale, shift, identity) if norm_first
                 else gate_norm(block, src.clone(), scale, shift))
    torch.testing.assert_close(again, expected.detach(), rtol=1e-12, atol=1e-12)


def test_max_pooling_gate_refuses_a_norm_before_it():
    with pytest.raises(ValueError, match='max pool'):
        norm_gate_residual(CompactGlobalDescriptor(8), torch.randn(1, 8, 2, 2), torch.ones(8),
                           torch.zeros(8), torch.zeros(1, 8, 2, 2))


@pytest.mark.parametrize('channels_last', [False, True], ids=['contiguous', 'channels_last'])
@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_channel_affine_is_x_times_scale_plus_shift_per_sample_and_channel(dtype, channels_last):
    x = torch.randn(3, 5, 4, 7, dtype=dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    scale, shift = torch.randn(3, 5, dtype=dtype), torch.randn(3, 5, dtype=dtype)
    out = channel_affine(x, scale, shift)
    expected = torch.stack([torch.stack([x[n, c] * scale[n, c] + shift[n, c] for c in range(5)])
                            for n in range(3)])
    torch.testing.assert_close(out, expected)
    assert out._base is None  # not a view: the next layer may modify it in place
    out.relu_()
