"""SqueezeExcitation against the SE equation (papers.md §3.2), written independently."""
import pytest
import torch

from mmattn.blocks import SqueezeExcitation


def reference_se(x, w1, b1, w2, b2):
    pooled = x.sum(dim=(2, 3)) / (x.shape[2] * x.shape[3])
    hidden = torch.clamp(pooled @ w1.t() + b1, min=0)
    return x * torch.sigmoid(hidden @ w2.t() + b2)[:, :, None, None]


def test_matches_se_equation():
    block = SqueezeExcitation(64)
    x = torch.randn(2, 64, 9, 11)
    fc1, fc2 = block.fc[0], block.fc[2]
    expected = reference_se(x, fc1.weight, fc1.bias, fc2.weight, fc2.bias)
    torch.testing.assert_close(block(x), expected, rtol=1e-5, atol=1e-6)


def test_parameter_names_and_shapes_are_pytorchinsights():
    shapes = {name: tuple(p.shape) for name, p in SqueezeExcitation(256).named_parameters()}
    assert shapes == {'fc.0.weight': (16, 256), 'fc.0.bias': (16, ),
                      'fc.2.weight': (256, 16), 'fc.2.bias': (256, )}


def test_every_parameter_gets_a_gradient():
    block = SqueezeExcitation(64)
    block(torch.randn(2, 64, 9, 11)).square().sum().backward()
    for name, param in block.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


@pytest.mark.parametrize('shape', [(1, 64, 1, 1), (4, 64, 3, 2)])
def test_degenerate_shapes_are_finite(shape):
    assert torch.isfinite(SqueezeExcitation(64)(torch.randn(shape))).all()


def test_bf16_autocast_keeps_dtype():
    block = SqueezeExcitation(64)
    x = torch.randn(2, 64, 9, 11).bfloat16()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = block(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), block(x.float()), rtol=3e-2, atol=3e-2)


def test_model_cast_to_bf16_runs_without_autocast():
    block = SqueezeExcitation(64).bfloat16()
    x = torch.randn(2, 64, 9, 11)
    out = block(x.bfloat16())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), block.float()(x), rtol=3e-2, atol=3e-2)


def test_rd_ratio_must_be_a_fraction():
    with pytest.raises(ValueError, match=r'rd_ratio=16 must be a fraction'):
        SqueezeExcitation(64, rd_ratio=16)
