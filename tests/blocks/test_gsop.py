"""GlobalSecondOrderPooling against the GSoP math (papers.md §3.4) and the authors' layer shapes."""
import pytest
import torch
import torch.nn.functional as F
from mmdet.models.backbones import ResNet
from mmengine.registry import MODELS

from mmattn.blocks.gsop import GlobalSecondOrderPooling, _rectified_covariance

MODES = ['channel', 'position', 'sum', 'max']
CHANNEL_NAMES = ['conv_for_DR', 'bn_for_DR', 'row_bn', 'row_conv_group', 'fc_adapt_channels']
POSITION_NAMES = ['conv_for_DR_spatial', 'bn_for_DR_spatial', 'row_bn_for_spatial',
                  'row_conv_group_for_spatial', 'fc_adapt_channels_for_spatial']


def batch_norm(x, params, name, training):
    """BatchNorm over every dim but 1: batch statistics (biased variance) or running ones."""
    shape = [1, -1] + [1] * (x.dim() - 2)
    if training:
        dims = [d for d in range(x.dim()) if d != 1]
        mean = x.mean(dim=dims, keepdim=True)
        var = ((x - mean) ** 2).mean(dim=dims, keepdim=True)
    else:
        mean = params[f'{name}.running_mean'].view(shape)
        var = params[f'{name}.running_var'].view(shape)
    return (x - mean) / torch.sqrt(var + 1e-5) * params[f'{name}.weight'].view(shape) \
        + params[f'{name}.bias'].view(shape)


def row_wise(rows, weight, bias):
    """Row i of (N, d, d) -> outputs 4i..4i+3, each a dot product with that row."""
    n, d, _ = rows.shape
    per_row = weight.view(d, 4, d)
    return torch.einsum('nij,ikj->nik', rows, per_row).reshape(n, 4 * d) + bias


def reference_channel_gate(x, p, stride, training):
    """GSoP-Net1: ReLU, strided 1x1 conv, BN, ReLU, X Ibar X^T, row BN, row conv, 1x1, sigmoid."""
    y = F.conv2d(F.relu(x), p['conv_for_DR.weight'], p['conv_for_DR.bias'], stride=stride)
    y = F.relu(batch_norm(y, p, 'bn_for_DR', training))
    n, d, h, w = y.shape
    m = h * w
    flat = y.reshape(n, d, m)
    i_bar = (torch.eye(m) / m - torch.ones(m, m) / m ** 2).to(flat)
    cov = flat @ i_bar @ flat.transpose(1, 2)
    rows = batch_norm(cov.unsqueeze(3), p, 'row_bn', training).squeeze(3)
    z = row_wise(rows, p['row_conv_group.weight'], p['row_conv_group.bias'])
    fc = p['fc_adapt_channels.weight']
    return torch.sigmoid(z @ fc.view(fc.shape[0], -1).t() + p['fc_adapt_channels.bias'])


def reference_position_gate(x, p, training):
    """The authors' pos_att: ReLU, 1x1 conv, BN, pool to 8x8, cov_feature, row BN/conv, ReLU, fc."""
    y = F.conv2d(F.relu(x), p['conv_for_DR_spatial.weight'], p['conv_for_DR_spatial.bias'])
    y = batch_norm(y, p, 'bn_for_DR_spatial', training)
    y = F.adaptive_avg_pool2d(y, (8, 8))
    n, d = y.shape[:2]
    flat = y.reshape(n, d, 64)
    # The authors' cov_feature: a d x d centring matrix built with M = 64.
    i_hat = (torch.eye(d) / 64 - torch.ones(d, d) / 64 ** 2).to(flat)
    gram = flat.transpose(1, 2) @ i_hat @ flat
    rows = batch_norm(gram.unsqueeze(3), p, 'row_bn_for_spatial', training).squeeze(3)
    z = F.relu(row_wise(rows, p['row_conv_group_for_spatial.weight'],
                        p['row_conv_group_for_spatial.bias']))
    fc = p['fc_adapt_channels_for_spatial.weight']
    att = torch.sigmoid(z @ fc.view(64, -1).t() + p['fc_adapt_channels_for_spatial.bias'])
    return F.adaptive_avg_pool2d(att.view(n, 1, 8, 8), x.shape[2:])


def reference_gsop(x, p, mode, stride, training):
    out = {}
    if mode != 'position':
        out['channel'] = x * reference_channel_gate(x, p, stride, training)[:, :, None, None]
    if mode != 'channel':
        out['position'] = F.relu(x * reference_position_gate(x, p, training))
    if mode == 'sum':
        return out['channel'] + out['position']
    if mode == 'max':
        return torch.max(out['channel'], out['position'])
    return out[mode]


def randomised(mode='channel', channels=32, att_dim=16, dr_stride=None):
    block = GlobalSecondOrderPooling(channels, mode=mode, att_dim=att_dim, dr_stride=dr_stride)
    with torch.no_grad():
        for name, tensor in block.state_dict().items():
            if name.endswith('running_var'):
                tensor.uniform_(0.5, 2)
            elif not name.endswith('num_batches_tracked'):
                tensor.normal_(0, 0.3)
    return block


@pytest.mark.parametrize('mode', MODES)
@pytest.mark.parametrize('dr_stride', [1, 2])
@pytest.mark.parametrize('shape', [(2, 32, 9, 11), (3, 32, 2, 1), (2, 32, 13, 5)])
def test_training_forward_matches_paper_math(mode, dr_stride, shape):
    block = randomised(mode, dr_stride=dr_stride)
    x = torch.randn(shape)
    expected = reference_gsop(x, block.state_dict(), mode, dr_stride, training=True)
    torch.testing.assert_close(block(x), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('mode', MODES)
def test_eval_forward_uses_running_statistics(mode):
    block = randomised(mode).eval()
    x = torch.randn(2, 32, 9, 11)
    expected = reference_gsop(x, block.state_dict(), mode, 2, training=False)
    torch.testing.assert_close(block(x), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('mode', MODES)
def test_gradients_match_paper_math(mode):
    # The reference runs in float64; tolerances scale with each gradient's size, because a
    # bias followed by a training-mode BN has an exact zero gradient that fp32 only approximates.
    block = randomised(mode)
    params = {n: p.detach().double().requires_grad_() for n, p in block.named_parameters()}
    buffers = {n: b.double() for n, b in block.named_buffers()}
    x = torch.randn(2, 32, 9, 11, requires_grad=True)
    x_ref = x.detach().double().requires_grad_()
    upstream = torch.randn(2, 32, 9, 11)
    (block(x) * upstream).sum().backward()
    (reference_gsop(x_ref, {**params, **buffers}, mode, 2, training=True)
     * upstream.double()).sum().backward()
    expected = {'input': x_ref.grad, **{n: p.grad for n, p in params.items()}}
    actual = {'input': x.grad, **{n: p.grad for n, p in block.named_parameters()}}
    for name, grad in expected.items():
        scale = max(grad.abs().max().item(), 1.0)
        torch.testing.assert_close(actual[name], grad.float(), rtol=1e-4, atol=1e-5 * scale,
                                   msg=lambda m, name=name: f'{name}: {m}')


@pytest.mark.parametrize('mode', ['channel', 'sum'])
def test_eval_forward_without_autograd_matches_paper_math(mode):
    # Without autograd the reduced map is centred in place.
    block = randomised(mode).eval()
    x = torch.randn(2, 32, 9, 11)
    before = x.clone()
    expected = reference_gsop(x, block.state_dict(), mode, 2, training=False)
    with torch.no_grad():
        torch.testing.assert_close(block(x), expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(x, before, rtol=0, atol=0)  # the input is left as it was


def ops_run(fn) -> list[str]:
    with torch.profiler.profile() as prof:
        fn()
    return [event.name for event in prof.events()]


@pytest.mark.parametrize('grad', [False, True])
def test_frozen_bn_for_dr_is_folded_into_a_matrix_product_on_the_cpu(grad):
    block = randomised().eval()
    x = torch.randn(2, 32, 9, 11)
    with torch.set_grad_enabled(grad):
        ops = ops_run(lambda: block(x))
    assert 'aten::convolution' not in ops and 'aten::baddbmm' in ops
    # row_bn's call is the one batch norm left.
    assert sum(name == 'aten::batch_norm' for name in ops) == 1, ops


@pytest.mark.parametrize('layer', ['conv_for_DR', 'bn_for_DR'])
def test_hooks_on_the_reduction_keep_its_layers(layer):
    block = randomised().eval()
    x = torch.randn(2, 32, 9, 11)
    folded = block(x)
    with torch.no_grad():
        expected = block.conv_for_DR(F.relu(x[:, :, ::2, ::2]))
        if layer == 'bn_for_DR':
            expected = block.bn_for_DR(expected)
    seen = []
    getattr(block, layer).register_forward_hook(lambda *args: seen.append(args[2]))
    with torch.no_grad():
        ops = ops_run(lambda: block(x))
        out = block(x)
    # Both layers run as layers (a hooked conv is called; a hooked BN is not folded), and what
    # the hook kept is the layer's output, not overwritten by the covariance's in-place steps.
    assert len(seen) == 2 and sum(name == 'aten::batch_norm' for name in ops) == 2
    assert ('aten::convolution' in ops) == (layer == 'conv_for_DR')
    torch.testing.assert_close(seen[1], expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out, folded, rtol=1e-5, atol=1e-6)


def test_frozen_bn_gradients_match_paper_math_in_float64():
    # norm_eval=True training: the BNs use running statistics, their weights still train,
    # and bn_for_DR reaches them through the folded product.
    block = randomised().double().eval()
    params = {n: p.detach().clone().requires_grad_() for n, p in block.named_parameters()}
    buffers = dict(block.named_buffers())
    x = torch.randn(2, 32, 9, 11, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    upstream = torch.randn(2, 32, 9, 11, dtype=torch.float64)
    (block(x) * upstream).sum().backward()
    (reference_gsop(x_ref, {**params, **buffers}, 'channel', 2, training=False)
     * upstream).sum().backward()
    # Tolerances of the reference's float32 centring matrix, scaled by each gradient's size.
    expected = {'input': x_ref.grad, **{n: p.grad for n, p in params.items()}}
    actual = {'input': x.grad, **{n: p.grad for n, p in block.named_parameters()}}
    for name, grad in expected.items():
        scale = max(grad.abs().max().item(), 1.0)
        torch.testing.assert_close(actual[name], grad, rtol=1e-6, atol=1e-7 * scale,
                                   msg=lambda m, name=name: f'{name}: {m}')


def covariance_of_relu(reduced):
    """The paper's X Ibar X^T over the positions of X = relu(reduced), (N, d, M) -> (N, d, d)."""
    x = F.relu(reduced)
    m = x.shape[2]
    i_bar = torch.eye(m, dtype=x.dtype) / m - torch.ones(m, m, dtype=x.dtype) / m ** 2
    return x @ i_bar @ x.transpose(1, 2)


def test_rectified_covariance_node_gradcheck_and_matches_the_centring_matrix():
    reduced = torch.randn(2, 5, 7, dtype=torch.float64, requires_grad=True)
    out = _rectified_covariance(reduced)
    assert type(out.grad_fn).__name__ == '_RectifiedCovarianceBackward'
    torch.testing.assert_close(out, covariance_of_relu(reduced))
    assert torch.autograd.gradcheck(_rectified_covariance, (reduced, ))
    with torch.no_grad():  # the caller's own map, rectified and centred in place
        torch.testing.assert_close(_rectified_covariance(reduced.detach().clone()), out)


def test_rectified_covariance_keeps_float32_gradient_sums_accurate():
    # A bias before it gets the gradient's sum over the positions. With every value positive
    # the ReLU passes everything and that sum is exactly 0 (the centring's backward removes the
    # mean); in float32 it must stay near 0: about 2e-7 here, 1.5e-5 through autograd's own ops,
    # 5e-6 with the product alone, without the centring's backward.
    torch.manual_seed(0)
    reduced = torch.randn(4, 16, 196) + 5
    upstream = torch.randn(4, 16, 16)
    x = reduced.requires_grad_()
    (_rectified_covariance(x) * upstream).sum().backward()
    assert (x > 0).all()
    assert x.grad.double().sum(dim=(0, 2)).abs().max() < 1.5e-6


def test_parameter_names_and_shapes_are_the_authors():
    shapes = {n: tuple(p.shape) for n, p in GlobalSecondOrderPooling(256).named_parameters()}
    assert shapes == {
        'conv_for_DR.weight': (128, 256, 1, 1), 'conv_for_DR.bias': (128, ),
        'bn_for_DR.weight': (128, ), 'bn_for_DR.bias': (128, ),
        'row_bn.weight': (128, ), 'row_bn.bias': (128, ),
        'row_conv_group.weight': (512, 1, 128, 1), 'row_conv_group.bias': (512, ),
        'fc_adapt_channels.weight': (256, 512, 1, 1), 'fc_adapt_channels.bias': (256, )}


def test_position_parameter_names_and_shapes_are_the_authors():
    block = GlobalSecondOrderPooling(256, mode='position')
    shapes = {n: tuple(p.shape) for n, p in block.named_parameters()}
    assert shapes == {
        'conv_for_DR_spatial.weight': (128, 256, 1, 1), 'conv_for_DR_spatial.bias': (128, ),
        'bn_for_DR_spatial.weight': (128, ), 'bn_for_DR_spatial.bias': (128, ),
        'row_bn_for_spatial.weight': (64, ), 'row_bn_for_spatial.bias': (64, ),
        'row_conv_group_for_spatial.weight': (256, 1, 64, 1),
        'row_conv_group_for_spatial.bias': (256, ),
        'fc_adapt_channels_for_spatial.weight': (64, 256, 1, 1),
        'fc_adapt_channels_for_spatial.bias': (64, )}


@pytest.mark.parametrize('mode, names', [('channel', CHANNEL_NAMES), ('position', POSITION_NAMES),
                                         ('sum', CHANNEL_NAMES + POSITION_NAMES),
                                         ('max', CHANNEL_NAMES + POSITION_NAMES)])
def test_each_mode_holds_only_its_branches(mode, names):
    block = GlobalSecondOrderPooling(64, mode=mode, att_dim=16)
    assert [name for name, _ in block.named_children()] == names


@pytest.mark.parametrize('in_channels, stride', [(64, 2), (256, 2), (512, 1), (2048, 1)])
def test_default_dr_stride_follows_the_authors_planes_rule(in_channels, stride):
    assert GlobalSecondOrderPooling(in_channels, att_dim=8).dr_stride == stride


def test_init_is_the_authors():
    block = GlobalSecondOrderPooling(1024, att_dim=128)
    block.init_weights()
    for name in CHANNEL_NAMES:
        module = getattr(block, name)
        if isinstance(module, torch.nn.BatchNorm2d):
            assert torch.equal(module.weight, torch.ones_like(module.weight)), name
            assert torch.equal(module.bias, torch.zeros_like(module.bias)), name
            continue
        fan_out = module.weight.shape[0] * module.weight[0, 0].numel()  # torch's fan_out
        fan_in = module.weight[0].numel()
        std = module.weight.std().item()
        assert abs(std / (2 / fan_out) ** 0.5 - 1) < 0.05, name
        assert 0 < module.bias.abs().max() <= fan_in ** -0.5, name


def test_backbone_init_ends_with_the_authors_init():
    backbone = ResNet(50, base_channels=16, plugins=[
        dict(cfg=dict(type='GlobalSecondOrderPooling', att_dim=16), position='after_conv3')])
    backbone.init_weights()
    gsop = backbone.layer2[3].gsop
    # mmdet's Kaiming init_cfg zeroes conv biases; the authors keep PyTorch's default.
    assert gsop.fc_adapt_channels.bias.abs().sum() > 0
    assert torch.equal(gsop.row_bn.weight, torch.ones(16))


@pytest.mark.parametrize('mode', MODES)
@pytest.mark.parametrize('shape, training', [((1, 32, 1, 1), False), ((2, 32, 1, 1), True),
                                             ((1, 32, 2, 3), True), ((1, 32, 1, 2), False)])
def test_degenerate_shapes_are_finite(mode, shape, training):
    block = randomised(mode).train(training)
    x = torch.randn(shape, requires_grad=True)
    out = block(x)
    out.square().sum().backward()
    assert out.shape == shape and torch.isfinite(out).all()
    for grad in [x.grad] + [p.grad for p in block.parameters()]:
        assert torch.isfinite(grad).all()


@pytest.mark.parametrize('mode', MODES)
def test_single_position_matches_paper_math(mode):
    # One position: Ibar = 1 - 1 = 0, so the channel covariance is exactly 0.
    block = randomised(mode).eval()
    x = torch.randn(2, 32, 1, 1)
    expected = reference_gsop(x, block.state_dict(), mode, 2, training=False)
    torch.testing.assert_close(block(x), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('mode', MODES)
def test_all_zero_input_is_finite(mode):
    # mmdet's zero_init_residual makes bn3's output, the block's input, exactly zero at init.
    block = randomised(mode)
    x = torch.zeros(2, 32, 9, 11, requires_grad=True)
    out = block(x)
    out.sum().backward()
    assert torch.equal(out, torch.zeros_like(out))
    for grad in [x.grad] + [p.grad for p in block.parameters()]:
        assert torch.isfinite(grad).all()


@pytest.mark.parametrize('mode', ['channel', 'position'])
def test_training_on_one_value_per_channel_names_the_fix(mode):
    block = randomised(mode, dr_stride=2)
    with pytest.raises(ValueError, match=r'GlobalSecondOrderPooling: .*one value per channel'
                                         r'.*norm_eval=True'):
        block(torch.randn(1, 32, 1, 1))


@pytest.mark.parametrize('mode', MODES)
def test_bf16_autocast_keeps_dtype_and_fp32_statistics(mode):
    block = randomised(mode).eval()
    seen = {}
    for name in ('row_bn', 'row_bn_for_spatial', 'bn_for_DR', 'bn_for_DR_spatial'):
        if hasattr(block, name):
            getattr(block, name).register_forward_pre_hook(
                lambda _, args, name=name: seen.__setitem__(name, args[0].dtype))
    x = torch.randn(2, 32, 9, 11)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = block(x.bfloat16())
    assert out.dtype == torch.bfloat16
    assert set(seen.values()) == {torch.float32}, seen
    torch.testing.assert_close(out.float(), block(x.bfloat16().float()), rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize('kwargs, message', [
    (dict(mode='avg'), r"GlobalSecondOrderPooling: mode='avg' is not supported; choose one of "
                       r"'channel', 'position', 'sum', 'max'"),
    (dict(att_dim=0), r'GlobalSecondOrderPooling: att_dim=0 must be a positive channel count'),
    (dict(dr_stride=0), r'GlobalSecondOrderPooling: dr_stride=0 must be a positive integer, '
                        r"or None for the authors' rule"),
])
def test_bad_arguments_name_block_argument_and_fix(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GlobalSecondOrderPooling(64, **kwargs)


def test_registered_in_root_registry_with_abbreviation():
    assert MODELS.get('GlobalSecondOrderPooling') is GlobalSecondOrderPooling
    assert GlobalSecondOrderPooling._abbr_ == 'gsop'


@pytest.mark.parametrize('mode', ['channel', 'sum'])  # 'sum' builds both branches
def test_runs_as_mmdet_resnet_plugin(mode):
    backbone = ResNet(50, base_channels=16, zero_init_residual=False, plugins=[dict(
        cfg=dict(type='GlobalSecondOrderPooling', mode=mode, att_dim=16),
        position='after_conv3')])
    backbone.init_weights()
    outs = backbone(torch.randn(2, 3, 45, 53))
    assert [tuple(o.shape) for o in outs] == [(2, 64, 12, 14), (2, 128, 6, 7), (2, 256, 3, 4),
                                               (2, 512, 2, 2)]
    sum(o.square().mean() for o in outs).backward()
    assert all(torch.isfinite(p.grad).all() for p in backbone.parameters())


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_gsop_net1_resnet50_counts_28_29_million():
    # Per block: DR conv C*128+128, two BN(128), row conv 512*128+512, 1x1 conv 512*C+C.
    per_block = {c: count(GlobalSecondOrderPooling(c)) for c in (256, 512, 1024, 2048)}
    assert per_block == {c: 641 * c + 66688 for c in per_block}
    resnet50_classifier = count(ResNet(50)) + 2048 * 1000 + 1000
    assert round(resnet50_classifier / 1e6, 3) == 25.557
    assert round((resnet50_classifier + sum(per_block.values())) / 1e6, 2) == 28.29
