"""CompactGlobalDescriptor against the paper's C x C matrix form (papers.md §3.3), written anew."""
import math

import pytest
import torch
from mmdet.models.backbones import ResNet

from mmattn.blocks.cgd import CompactGlobalDescriptor

CASCADE = ('w0', 'w1', 'w2', 'bias0', 'bias1', 'bias2')


def reference_cgd(x: torch.Tensor, params: dict[str, torch.Tensor], mode: str) -> torch.Tensor:
    """The paper's equations with explicit (N, C, C) matrices: X (1 + tanh(psi phi^T w''))."""
    n, c, h, w = x.shape
    avg = x.sum(dim=(2, 3)) / (h * w)
    if mode == 'plain':
        g_f = torch.bmm(avg.unsqueeze(2), avg.unsqueeze(1))
        gate = torch.tanh(g_f @ params['w0']).view(n, c)
    else:
        peak = x.flatten(2).max(dim=2).values
        soft = avg.exp() / avg.exp().sum(dim=1, keepdim=True)
        psi = torch.tanh((torch.bmm(soft.unsqueeze(2), avg.unsqueeze(1)) @ params['w0']).view(n, c)
                         + params['bias0'].view(c))
        phi = torch.tanh((torch.bmm(soft.unsqueeze(2), peak.unsqueeze(1)) @ params['w1']).view(n, c)
                         + params['bias1'].view(c))
        gate = torch.tanh((torch.bmm(psi.unsqueeze(2), phi.unsqueeze(1)) @ params['w2']).view(n, c)
                          + params['bias2'].view(c))
    return x * (1 + gate[:, :, None, None])


def randomised(mode: str, channels: int = 32) -> CompactGlobalDescriptor:
    block = CompactGlobalDescriptor(channels, mode=mode)
    with torch.no_grad():
        for param in block.parameters():
            param.normal_(std=0.5)
    return block


@pytest.mark.parametrize('mode', ['cascade', 'plain'])
@pytest.mark.parametrize('shape', [(2, 32, 9, 11), (1, 32, 7, 7), (3, 32, 2, 1)])
def test_matches_paper_matrix_form(mode, shape):
    block = randomised(mode)
    x = torch.randn(shape)
    expected = reference_cgd(x, dict(block.named_parameters()), mode)
    torch.testing.assert_close(block(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('mode', ['cascade', 'plain'])
def test_gradients_match_paper_matrix_form(mode):
    block = randomised(mode)
    x = torch.randn(2, 32, 9, 11, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    params = {name: p.detach().clone().requires_grad_() for name, p in block.named_parameters()}
    upstream = torch.randn(2, 32, 9, 11)
    (block(x) * upstream).sum().backward()
    (reference_cgd(x_ref, params, mode) * upstream).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-4, atol=1e-5)
    for name, param in block.named_parameters():
        torch.testing.assert_close(param.grad, params[name].grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('mode, names', [('cascade', CASCADE), ('plain', ('w0', ))])
def test_parameter_names_and_shapes_are_the_authors(mode, names):
    shapes = {name: tuple(p.shape) for name, p in
              CompactGlobalDescriptor(256, mode=mode).named_parameters()}
    expected = {name: (256, 1) if name.startswith('w') else (1, 256, 1, 1) for name in names}
    assert shapes == expected


@pytest.mark.parametrize('mode', ['cascade', 'plain'])
def test_init_weights_applies_xavier_weights_and_zero_biases(mode):
    block = CompactGlobalDescriptor(64, mode=mode)
    with torch.no_grad():
        for param in block.parameters():
            param.fill_(5.0)
    block.init_weights()
    bound = math.sqrt(6 / (64 + 1))
    for name, param in block.named_parameters():
        if name.startswith('bias'):
            assert torch.equal(param, torch.zeros_like(param)), name
        else:
            assert param.abs().max() <= bound and param.std() > bound / 4, name


@pytest.mark.parametrize('mode', ['cascade', 'plain'])
@pytest.mark.parametrize('shape', [(1, 32, 1, 1), (3, 32, 1, 2), (1, 32, 9, 11)])
def test_degenerate_shapes_are_finite_forward_and_backward(mode, shape):
    block = randomised(mode)
    x = torch.randn(shape, requires_grad=True)
    out = block(x)
    out.square().sum().backward()
    assert torch.isfinite(out).all()
    for grad in (x.grad, *(p.grad for p in block.parameters())):
        assert torch.isfinite(grad).all()


@pytest.mark.parametrize('mode', ['cascade', 'plain'])
def test_zero_input_has_finite_gradients(mode):
    # mmdet's zero_init_residual can make a block's input exactly zero at init.
    block = randomised(mode)
    x = torch.zeros(2, 32, 9, 11, requires_grad=True)
    block(x).sum().backward()
    for grad in (x.grad, *(p.grad for p in block.parameters())):
        assert torch.isfinite(grad).all()


@pytest.mark.parametrize('mode', ['cascade', 'plain'])
def test_bf16_autocast_keeps_dtype_and_fp32_statistics(mode):
    block = CompactGlobalDescriptor(32, mode=mode)
    x = torch.randn(2, 32, 9, 11).bfloat16()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = block(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), block(x.float()), rtol=2e-2, atol=2e-2)


def test_unknown_mode_is_rejected():
    with pytest.raises(ValueError, match=r"CompactGlobalDescriptor: mode='best' is not one of"):
        CompactGlobalDescriptor(64, mode='best')


def test_builds_and_runs_as_mmdet_resnet_plugin():
    # after_conv1 only proves the plugin builds; the paper's place (before bn1) is a backbone's job.
    backbone = ResNet(50, plugins=[dict(cfg=dict(type='CompactGlobalDescriptor'),
                                        position='after_conv1')])
    assert tuple(backbone.layer2[0].cgd.w0.shape) == (128, 1)
    with torch.no_grad():
        outs = backbone(torch.randn(2, 3, 45, 53))
    assert [o.shape[1] for o in outs] == [256, 512, 1024, 2048]
