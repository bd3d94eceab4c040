"""EfficientChannelAttention against ECA-Net's equation (arXiv 1910.03151), written anew."""
import math

import pytest
import torch
import torch.nn.functional as F
from mmdet.models.backbones import ResNet

from mmattn.blocks.eca import EfficientChannelAttention


def reference_eca(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Average pool, then each channel's gate from its k zero-padded neighbours, sigmoid, scale."""
    n, c, h, w = x.shape
    k = weight.numel()
    pooled = F.pad(x.sum(dim=(2, 3)) / (h * w), ((k - 1) // 2, (k - 1) // 2))
    logits = sum(weight.view(k)[j] * pooled[:, j:j + c] for j in range(k))
    return x * torch.sigmoid(logits)[:, :, None, None]


@pytest.mark.parametrize('kernel_size', [1, 3, 5])
@pytest.mark.parametrize('shape', [(2, 32, 9, 11), (1, 32, 7, 7), (3, 32, 2, 1)])
def test_matches_eca_equation(kernel_size, shape):
    block = EfficientChannelAttention(32, kernel_size=kernel_size)
    x = torch.randn(shape)
    torch.testing.assert_close(block(x), reference_eca(x, block.conv.weight),
                               rtol=1e-5, atol=1e-6)


def test_gradients_match_eca_equation():
    block = EfficientChannelAttention(32, kernel_size=5)
    x = torch.randn(2, 32, 9, 11, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    weight = block.conv.weight.detach().clone().requires_grad_()
    upstream = torch.randn(2, 32, 9, 11)
    (block(x) * upstream).sum().backward()
    (reference_eca(x_ref, weight) * upstream).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(block.conv.weight.grad, weight.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize('channels, kernel_size', [
    (1, 1), (8, 3), (64, 3), (128, 5), (256, 5), (512, 5), (1024, 5), (2048, 7)])
def test_adaptive_kernel_size_follows_the_paper(channels, kernel_size):
    # |log2(C) / 2 + 1 / 2|: truncated, then raised to the next odd number when even.
    block = EfficientChannelAttention(channels)
    assert block.kernel_size == kernel_size
    assert block.conv.padding == ((kernel_size - 1) // 2, )


def test_parameter_names_and_shapes_are_the_authors():
    shapes = {name: tuple(p.shape) for name, p in
              EfficientChannelAttention(256).named_parameters()}
    assert shapes == {'conv.weight': (1, 1, 5)}


def test_init_weights_applies_pytorch_default_conv_init():
    block = EfficientChannelAttention(256, kernel_size=7)
    with torch.no_grad():
        block.conv.weight.fill_(100.0)
    block.init_weights()
    assert block.conv.weight.abs().max() <= 1 / math.sqrt(7)


@pytest.mark.parametrize('shape', [(1, 32, 1, 1), (3, 32, 1, 2), (1, 32, 9, 11)])
def test_degenerate_shapes_are_finite_forward_and_backward(shape):
    block = EfficientChannelAttention(32)
    x = torch.randn(shape, requires_grad=True)
    out = block(x)
    out.square().sum().backward()
    assert torch.isfinite(out).all()
    assert torch.isfinite(x.grad).all() and torch.isfinite(block.conv.weight.grad).all()


def test_zero_input_has_finite_gradients():
    block = EfficientChannelAttention(32)
    x = torch.zeros(2, 32, 9, 11, requires_grad=True)
    block(x).sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(block.conv.weight.grad).all()


def test_bf16_autocast_keeps_dtype_and_fp32_statistics():
    block = EfficientChannelAttention(32)
    x = torch.randn(2, 32, 9, 11).bfloat16()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = block(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), block(x.float()), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize('kernel_size', [4, 0])
def test_kernel_size_must_be_positive_and_odd(kernel_size):
    with pytest.raises(ValueError, match=rf'EfficientChannelAttention: kernel_size={kernel_size} '
                                         r'must be a positive odd number.*kernel_size=None'):
        EfficientChannelAttention(64, kernel_size=kernel_size)


def test_builds_and_runs_as_mmdet_resnet_plugin():
    backbone = ResNet(50, plugins=[dict(cfg=dict(type='EfficientChannelAttention'),
                                        position='after_conv3')])
    assert backbone.layer4[0].eca.kernel_size == 7
    with torch.no_grad():
        outs = backbone(torch.randn(2, 3, 45, 53))
    assert [o.shape[1] for o in outs] == [256, 512, 1024, 2048]
