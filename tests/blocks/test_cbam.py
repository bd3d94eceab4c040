"""ConvolutionalBlockAttention against CBAM's op sequence (papers.md §3.5), written anew."""
import pytest
import torch
import torch.nn.functional as F
from mmdet.models.backbones import ResNet

from mmattn.blocks.cbam import ConvolutionalBlockAttention

CBAM_PLUGIN = [dict(cfg=dict(type='ConvolutionalBlockAttention'), position='after_conv3')]


@pytest.fixture(scope='module')
def cbam_r50() -> ResNet:
    return ResNet(50, plugins=CBAM_PLUGIN)


def reference_cbam(x: torch.Tensor, p: dict[str, torch.Tensor], training: bool) -> torch.Tensor:
    """Channel gate from avg and max pools through one MLP, then a 7x7 spatial gate with BN."""
    n, c, h, w = x.shape

    def mlp(v: torch.Tensor) -> torch.Tensor:
        hidden = torch.clamp(v @ p['ChannelGate.mlp.1.weight'].t() + p['ChannelGate.mlp.1.bias'],
                             min=0)
        return hidden @ p['ChannelGate.mlp.3.weight'].t() + p['ChannelGate.mlp.3.bias']

    avg = x.sum(dim=(2, 3)) / (h * w)
    peak = x.flatten(2).max(dim=2).values
    x = x * torch.sigmoid(mlp(avg) + mlp(peak))[:, :, None, None]
    maps = torch.cat([x.max(dim=1, keepdim=True).values, x.sum(dim=1, keepdim=True) / c], dim=1)
    s = F.conv2d(maps, p['SpatialGate.spatial.conv.weight'], padding=3)
    if training:
        mean, var = s.mean(), s.var(unbiased=False)
    else:
        mean = p['SpatialGate.spatial.bn.running_mean']
        var = p['SpatialGate.spatial.bn.running_var']
    s = (s - mean) / torch.sqrt(var + 1e-5)
    s = s * p['SpatialGate.spatial.bn.weight'] + p['SpatialGate.spatial.bn.bias']
    return x * torch.sigmoid(s)


def randomised(channels: int = 32) -> ConvolutionalBlockAttention:
    block = ConvolutionalBlockAttention(channels, rd_ratio=1 / 8)
    with torch.no_grad():
        for param in block.parameters():
            param.normal_(std=0.3)
        block.SpatialGate.spatial.bn.running_mean.fill_(0.2)
        block.SpatialGate.spatial.bn.running_var.fill_(1.5)
    return block


def state_of(block: ConvolutionalBlockAttention) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in block.state_dict().items()}


@pytest.mark.usefixtures('kernel_path')
@pytest.mark.parametrize('autograd', [True, False], ids=['autograd', 'no_grad'])
@pytest.mark.parametrize('training', [True, False], ids=['train', 'eval'])
@pytest.mark.parametrize('shape', [(2, 32, 9, 11), (1, 32, 7, 7), (3, 32, 2, 1)])
def test_matches_cbam_op_sequence(training, shape, autograd):
    # Without autograd, eval mode runs the whole block in one kernel call (gates included).
    block = randomised().train(training)
    x = torch.randn(shape)
    expected = reference_cbam(x, state_of(block), training)
    with torch.set_grad_enabled(autograd):
        torch.testing.assert_close(block(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.usefixtures('kernel_path')
@pytest.mark.parametrize('training', [True, False], ids=['train', 'eval'])
def test_gradients_match_cbam_op_sequence(training):
    # Eval mode (a frozen spatial BN, as norm_eval=True backbones train CBAM) runs both gates
    # and their backward as kernel ops; train mode differentiates the gates' graphs.
    block = randomised().train(training)
    x = torch.randn(2, 32, 9, 11, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    params = {name: p.detach().clone().requires_grad_() for name, p in block.named_parameters()}
    upstream = torch.randn(2, 32, 9, 11)
    (block(x) * upstream).sum().backward()
    expected = reference_cbam(x_ref, {**state_of(block), **params}, training=training)
    (expected * upstream).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-4, atol=1e-5)
    for name, param in block.named_parameters():
        torch.testing.assert_close(param.grad, params[name].grad, rtol=1e-4, atol=1e-5)


def test_parameter_names_and_shapes_are_pytorchinsights():
    shapes = {name: tuple(t.shape) for name, t in
              ConvolutionalBlockAttention(256).state_dict().items()}
    assert shapes == {
        'ChannelGate.mlp.1.weight': (16, 256), 'ChannelGate.mlp.1.bias': (16, ),
        'ChannelGate.mlp.3.weight': (256, 16), 'ChannelGate.mlp.3.bias': (256, ),
        'SpatialGate.spatial.conv.weight': (1, 2, 7, 7),
        'SpatialGate.spatial.bn.weight': (1, ), 'SpatialGate.spatial.bn.bias': (1, ),
        'SpatialGate.spatial.bn.running_mean': (1, ), 'SpatialGate.spatial.bn.running_var': (1, ),
        'SpatialGate.spatial.bn.num_batches_tracked': ()}


def test_spatial_bn_momentum_is_the_authors_pytorch_number():
    bn = ConvolutionalBlockAttention(64).SpatialGate.spatial.bn
    assert isinstance(bn, torch.nn.BatchNorm2d) and bn.momentum == 0.01 and bn.eps == 1e-5


def test_init_weights_applies_the_authors_init():
    block = randomised()
    block.init_weights()
    params = dict(block.named_parameters())
    for name in ('ChannelGate.mlp.1.bias', 'ChannelGate.mlp.3.bias',
                 'SpatialGate.spatial.bn.weight', 'SpatialGate.spatial.bn.bias'):
        assert torch.equal(params[name], torch.zeros_like(params[name])), name
    # With the BN weight at 0 the spatial gate starts as the constant sigmoid(0).
    x = torch.randn(2, 32, 9, 11)
    torch.testing.assert_close(block.SpatialGate(x), torch.full((2, 1, 9, 11), 0.5))


def test_backbone_init_keeps_the_authors_init():
    # mmdet's ResNet init sets every BN weight to 1 first; the block's own init_weights runs after.
    backbone = ResNet(50, base_channels=16, plugins=CBAM_PLUGIN)
    backbone.init_weights()
    bn = backbone.layer3[2].cbam.SpatialGate.spatial.bn
    assert torch.equal(bn.weight, torch.zeros(1)) and torch.equal(bn.bias, torch.zeros(1))


@pytest.mark.usefixtures('kernel_path')
@pytest.mark.parametrize('training, shape', [
    (False, (1, 32, 1, 1)), (False, (3, 32, 1, 2)), (True, (2, 32, 1, 1)), (True, (1, 32, 9, 11))])
def test_degenerate_shapes_are_finite_forward_and_backward(training, shape):
    # Training-mode BN needs N * H * W > 1, like the block's own bn3 right before it.
    block = randomised().train(training)
    x = torch.randn(shape, requires_grad=True)
    out = block(x)
    out.square().sum().backward()
    assert torch.isfinite(out).all()
    for grad in (x.grad, *(p.grad for p in block.parameters())):
        assert torch.isfinite(grad).all()


@pytest.mark.usefixtures('kernel_path')
def test_zero_input_has_finite_gradients():
    block = randomised()
    x = torch.zeros(2, 32, 9, 11, requires_grad=True)
    block(x).sum().backward()
    for grad in (x.grad, *(p.grad for p in block.parameters())):
        assert torch.isfinite(grad).all()


def test_bf16_autocast_keeps_dtype_and_fp32_statistics():
    block = randomised().eval()
    x = torch.randn(2, 32, 9, 11).bfloat16()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = block(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), block(x.float()), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize('rd_ratio', [16, 0])
def test_rd_ratio_must_be_a_fraction(rd_ratio):
    with pytest.raises(ValueError, match=rf'ConvolutionalBlockAttention: rd_ratio={rd_ratio} '
                                         r'must be a fraction in \(0, 1\]'):
        ConvolutionalBlockAttention(64, rd_ratio=rd_ratio)


def test_builds_and_runs_as_mmdet_resnet_plugin(cbam_r50):
    with torch.no_grad():
        outs = cbam_r50(torch.randn(2, 3, 45, 53))
    assert [o.shape[1] for o in outs] == [256, 512, 1024, 2048]


def test_r50_detection_backbone_params_match_sge_paper(cbam_r50):
    plain = 23_508_032  # mmdet's ResNet(50), no fc: the paper's 23.51M
    # Per block: the shared MLP C -> C/16 -> C, the 2 -> 1 7x7 conv, the BN's weight and bias.
    widths = [256] * 3 + [512] * 4 + [1024] * 6 + [2048] * 3
    added = sum(2 * c * (c // 16) + c // 16 + c + 98 + 2 for c in widths)
    total = sum(p.numel() for p in cbam_r50.parameters())
    assert total == plain + added
    assert round(total / 1e6, 2) == 26.04
