"""SpatialGroupEnhance against the paper's op sequence (papers.md §3.1), written independently."""
import pytest
import torch
from mmdet.models.backbones import ResNet

from mmattn.blocks import SpatialGroupEnhance


def reference_sge(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                  groups: int) -> torch.Tensor:
    """The paper's steps one by one: per-group mean, dot products, normalise, affine, sigmoid."""
    n, c, h, w = x.shape
    xg = x.view(n * groups, c // groups, h, w)
    g = xg.mean(dim=(2, 3), keepdim=True)
    s = (xg * g).sum(dim=1).view(n * groups, h * w)
    s = s - s.mean(dim=1, keepdim=True)
    s = s / (s.std(dim=1, keepdim=True) + 1e-5)
    a = s.view(n, groups, h, w) * weight.view(1, groups, 1, 1) + bias.view(1, groups, 1, 1)
    return (xg * torch.sigmoid(a.view(n * groups, 1, h, w))).view(n, c, h, w)


def randomised(channels: int = 32, groups: int = 8) -> SpatialGroupEnhance:
    block = SpatialGroupEnhance(channels, groups=groups)
    with torch.no_grad():
        block.weight.normal_()
        block.bias.normal_()
    return block


@pytest.mark.usefixtures('kernel_path')
@pytest.mark.parametrize('shape', [(2, 32, 9, 11), (1, 32, 7, 7), (3, 32, 2, 1)])
def test_matches_paper_math(shape):
    block = randomised()
    x = torch.randn(shape)
    expected = reference_sge(x, block.weight, block.bias, groups=8)
    torch.testing.assert_close(block(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.usefixtures('kernel_path')
def test_gradients_match_paper_math():
    block = randomised()
    x = torch.randn(2, 32, 9, 11, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    weight = block.weight.detach().clone().requires_grad_()
    bias = block.bias.detach().clone().requires_grad_()
    upstream = torch.randn(2, 32, 9, 11)
    (block(x) * upstream).sum().backward()
    (reference_sge(x_ref, weight, bias, groups=8) * upstream).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(block.weight.grad, weight.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(block.bias.grad, bias.grad, rtol=1e-4, atol=1e-5)


def test_paper_init_gates_with_sigmoid_one():
    block = SpatialGroupEnhance(32, groups=8)
    block.init_weights()
    x = torch.randn(2, 32, 9, 11)
    torch.testing.assert_close(block(x), x * torch.sigmoid(torch.tensor(1.0)))


def test_explicit_init_cfg_is_not_overwritten():
    block = SpatialGroupEnhance(32, groups=8, init_cfg=dict(type='Constant', val=0.5, layer=[]))
    with torch.no_grad():
        block.weight.fill_(0.25)
    block.init_weights()
    assert torch.equal(block.weight, torch.full((1, 8, 1, 1), 0.25))


def test_parameter_names_and_shapes_are_the_authors():
    shapes = {name: tuple(p.shape) for name, p in SpatialGroupEnhance(256).named_parameters()}
    assert shapes == {'weight': (1, 64, 1, 1), 'bias': (1, 64, 1, 1)}


@pytest.mark.usefixtures('kernel_path')
def test_single_position_gates_with_sigmoid_bias():
    block = randomised()
    x = torch.randn(2, 32, 1, 1)
    out = block(x)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, x * torch.sigmoid(block.bias).repeat_interleave(4, dim=1))


@pytest.mark.usefixtures('kernel_path')
def test_constant_input_has_finite_gradients():
    # mmdet's zero_init_residual makes the bn3 output, SGE's input, all zeros at init.
    block = randomised()
    x = torch.zeros(2, 32, 9, 11, requires_grad=True)
    block(x).sum().backward()
    for grad in (x.grad, block.weight.grad, block.bias.grad):
        assert torch.isfinite(grad).all()


def test_groups_must_divide_channels():
    with pytest.raises(ValueError, match=r'in_channels=96 is not divisible by groups=64'):
        SpatialGroupEnhance(96, groups=64)


def test_bf16_autocast_keeps_dtype_and_fp32_statistics():
    block = randomised()
    x = torch.randn(2, 32, 9, 11)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = block(x.bfloat16())
    assert out.dtype == torch.bfloat16
    # Statistics in fp32: only the final bf16 rounding of input and gate separates the two.
    torch.testing.assert_close(out.float(), block(x.bfloat16().float()), rtol=2e-2, atol=2e-2)


def test_backbone_init_keeps_the_zero_one_init():
    backbone = ResNet(50, plugins=[dict(cfg=dict(type='SpatialGroupEnhance', groups=64),
                                        position='after_conv3')])
    backbone.init_weights()
    sge = backbone.layer3[2].sge
    assert torch.equal(sge.weight, torch.zeros(1, 64, 1, 1))
    assert torch.equal(sge.bias, torch.ones(1, 64, 1, 1))
