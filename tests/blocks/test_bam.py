"""BottleneckAttention against the BAM math as the authors' code computes it (papers.md §3.5)."""
import pytest
import torch
import torch.nn.functional as F
from mmdet.models.backbones import ResNet
from mmengine.registry import MODELS

from mmattn.blocks.bam import BottleneckAttention


def pytorchinsight_bam_keys(c: int) -> dict:
    """PytorchInsight's BAM(gate_channel) state-dict keys and shapes for C channels, r = C / 16."""
    r = c // 16
    keys = {
        'channel_att.gate_c.gate_c_fc_0.weight': (r, c),
        'channel_att.gate_c.gate_c_fc_0.bias': (r, ),
        'channel_att.gate_c.gate_c_fc_final.weight': (c, r),
        'channel_att.gate_c.gate_c_fc_final.bias': (c, ),
        'spatial_att.gate_s.gate_s_conv_reduce0.weight': (r, c, 1, 1),
        'spatial_att.gate_s.gate_s_conv_reduce0.bias': (r, ),
        'spatial_att.gate_s.gate_s_conv_di_0.weight': (r, r, 3, 3),
        'spatial_att.gate_s.gate_s_conv_di_0.bias': (r, ),
        'spatial_att.gate_s.gate_s_conv_di_1.weight': (r, r, 3, 3),
        'spatial_att.gate_s.gate_s_conv_di_1.bias': (r, ),
        'spatial_att.gate_s.gate_s_conv_final.weight': (1, r, 1, 1),
        'spatial_att.gate_s.gate_s_conv_final.bias': (1, ),
    }
    for bn in ('channel_att.gate_c.gate_c_bn_1', 'spatial_att.gate_s.gate_s_bn_reduce0',
               'spatial_att.gate_s.gate_s_bn_di_0', 'spatial_att.gate_s.gate_s_bn_di_1'):
        keys.update({f'{bn}.{p}': (r, ) for p in ('weight', 'bias', 'running_mean', 'running_var')})
        keys[f'{bn}.num_batches_tracked'] = ()
    return keys


def batch_norm(x, p, name, training):
    """BatchNorm over every dim but 1: batch statistics (biased variance) or running ones."""
    shape = [1, -1] + [1] * (x.dim() - 2)
    if training:
        dims = [d for d in range(x.dim()) if d != 1]
        mean = x.mean(dim=dims, keepdim=True)
        var = ((x - mean) ** 2).mean(dim=dims, keepdim=True)
    else:
        mean, var = p[f'{name}.running_mean'].view(shape), p[f'{name}.running_var'].view(shape)
    return (x - mean) / torch.sqrt(var + 1e-5) * p[f'{name}.weight'].view(shape) \
        + p[f'{name}.bias'].view(shape)


def reference_bam(x, p, training, dilation=4):
    """x * (1 + sigmoid(Mc(x) * Ms(x))), each map built op by op."""
    c, s = 'channel_att.gate_c.gate_c_', 'spatial_att.gate_s.gate_s_'
    pooled = x.sum(dim=(2, 3)) / (x.shape[2] * x.shape[3])
    hidden = pooled @ p[f'{c}fc_0.weight'].t() + p[f'{c}fc_0.bias']
    hidden = torch.clamp(batch_norm(hidden, p, f'{c}bn_1', training), min=0)
    channel = hidden @ p[f'{c}fc_final.weight'].t() + p[f'{c}fc_final.bias']
    y = F.conv2d(x, p[f'{s}conv_reduce0.weight'], p[f'{s}conv_reduce0.bias'])
    y = torch.clamp(batch_norm(y, p, f'{s}bn_reduce0', training), min=0)
    for i in range(2):
        y = F.conv2d(y, p[f'{s}conv_di_{i}.weight'], p[f'{s}conv_di_{i}.bias'],
                     padding=dilation, dilation=dilation)
        y = torch.clamp(batch_norm(y, p, f'{s}bn_di_{i}', training), min=0)
    spatial = F.conv2d(y, p[f'{s}conv_final.weight'], p[f'{s}conv_final.bias'])
    return x * (1 + torch.sigmoid(channel[:, :, None, None] * spatial))


def randomised(channels=64, **kwargs):
    block = BottleneckAttention(channels, **kwargs)
    with torch.no_grad():
        for name, tensor in block.state_dict().items():
            if name.endswith('running_var'):
                tensor.uniform_(0.5, 2)
            elif not name.endswith('num_batches_tracked'):
                tensor.normal_(0, 0.3)
    return block


@pytest.mark.parametrize('shape', [(2, 64, 9, 11), (3, 64, 5, 2), (2, 64, 1, 1)])
def test_training_forward_matches_paper_math(shape):
    block = randomised()
    x = torch.randn(shape)
    torch.testing.assert_close(block(x), reference_bam(x, block.state_dict(), True),
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('shape', [(2, 64, 9, 11), (1, 64, 7, 3), (1, 64, 1, 1)])
def test_eval_forward_uses_running_statistics(shape):
    block = randomised().eval()
    x = torch.randn(shape)
    torch.testing.assert_close(block(x), reference_bam(x, block.state_dict(), False),
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('dilation', [1, 2])
def test_dilation_argument_reaches_both_3x3_convs(dilation):
    block = randomised(dilation=dilation)
    x = torch.randn(2, 64, 9, 11)
    torch.testing.assert_close(block(x), reference_bam(x, block.state_dict(), True, dilation),
                               rtol=1e-4, atol=1e-5)


def test_gradients_match_paper_math():
    block = randomised()
    params = {n: p.detach().double().requires_grad_() for n, p in block.named_parameters()}
    buffers = {n: b.double() for n, b in block.named_buffers()}
    x = torch.randn(2, 64, 9, 11, requires_grad=True)
    x_ref = x.detach().double().requires_grad_()
    upstream = torch.randn(2, 64, 9, 11)
    (block(x) * upstream).sum().backward()
    (reference_bam(x_ref, {**params, **buffers}, True) * upstream.double()).sum().backward()
    expected = {'input': x_ref.grad, **{n: p.grad for n, p in params.items()}}
    actual = {'input': x.grad, **{n: p.grad for n, p in block.named_parameters()}}
    for name, grad in expected.items():
        # A bias followed by a training-mode BN has an exact zero gradient: scale the tolerance.
        scale = max(grad.abs().max().item(), 1.0)
        torch.testing.assert_close(actual[name], grad.float(), rtol=1e-4, atol=1e-5 * scale,
                                   msg=lambda m, name=name: f'{name}: {m}')


def test_state_dict_keys_and_shapes_are_pytorchinsights():
    state = BottleneckAttention(256).state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == pytorchinsight_bam_keys(256)


def test_pytorchinsight_checkpoint_loads_by_prefix_renaming():
    checkpoint = {f'module.bam2.{k}': torch.randn(shape) if shape else torch.tensor(7)
                  for k, shape in pytorchinsight_bam_keys(128).items()}
    block = BottleneckAttention(128)
    block.load_state_dict({k.removeprefix('module.bam2.'): v for k, v in checkpoint.items()})
    assert torch.equal(block.spatial_att.gate_s.gate_s_conv_di_1.weight,
                       checkpoint['module.bam2.spatial_att.gate_s.gate_s_conv_di_1.weight'])


def test_init_is_the_authors_effective_init():
    block = randomised(1024)
    block.init_weights()
    for name, module in block.named_modules():
        if isinstance(module, torch.nn.Conv2d):
            fan_out = module.weight.shape[0] * module.weight[0, 0].numel()
            if module.weight.numel() > 10000:
                assert abs(module.weight.std().item() / (2 / fan_out) ** 0.5 - 1) < 0.05, name
        elif isinstance(module, torch.nn.Linear):
            bound = module.in_features ** -0.5  # PyTorch's default Linear init
            assert 0 < module.weight.abs().max() <= bound, name
        elif isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            assert torch.equal(module.weight, torch.ones_like(module.weight)), name
        else:
            continue
        assert torch.equal(module.bias, torch.zeros_like(module.bias)), name


def test_backbone_init_ends_with_the_authors_init():
    backbone = ResNet(50, base_channels=16, plugins=[
        dict(cfg=dict(type='BottleneckAttention'), position='after_conv3')])
    backbone.init_weights()
    fc = backbone.layer3[0].bam.channel_att.gate_c.gate_c_fc_0
    # Left alone by mmdet's init_cfg (Conv2d and BN only), zeroed by the authors' init.
    assert torch.equal(fc.bias, torch.zeros_like(fc.bias))


@pytest.mark.parametrize('shape, training', [((1, 64, 1, 1), False), ((2, 64, 1, 1), True),
                                             ((1, 64, 2, 3), False), ((3, 64, 1, 2), True)])
def test_degenerate_shapes_are_finite(shape, training):
    block = randomised().train(training)
    x = torch.randn(shape, requires_grad=True)
    out = block(x)
    out.square().sum().backward()
    assert out.shape == shape and torch.isfinite(out).all()
    for grad in [x.grad] + [p.grad for p in block.parameters()]:
        assert torch.isfinite(grad).all()


def test_all_zero_input_is_finite():
    # mmdet's zero_init_residual makes whole residual branches zero at init.
    block = randomised()
    x = torch.zeros(2, 64, 9, 11, requires_grad=True)
    out = block(x)
    out.sum().backward()
    assert torch.equal(out, torch.zeros_like(out))
    for grad in [x.grad] + [p.grad for p in block.parameters()]:
        assert torch.isfinite(grad).all()


def test_batch_of_one_in_training_names_the_fix():
    with pytest.raises(ValueError, match=r'BottleneckAttention: channel_att.gate_c.gate_c_bn_1 '
                                         r'is a BatchNorm in training mode .*\(batch size 1\)'
                                         r'.*norm_eval=True'):
        randomised()(torch.randn(1, 64, 9, 11))


def test_batch_of_one_trains_under_norm_eval():
    # Detection with 1 image per GPU: the backbone's norm_eval puts BatchNorm1d in eval mode too.
    backbone = ResNet(50, base_channels=16, norm_eval=True, zero_init_residual=False, plugins=[
        dict(cfg=dict(type='BottleneckAttention'), position='after_conv3')])
    backbone.train()
    outs = backbone(torch.randn(1, 3, 45, 53))
    sum(o.square().mean() for o in outs).backward()
    fc = backbone.layer4[2].bam.channel_att.gate_c.gate_c_fc_0
    assert fc.weight.grad.abs().sum() > 0


def test_bf16_autocast_keeps_dtype_and_fp32_statistics():
    block = randomised().eval()
    seen = []
    block.channel_att.gate_c.register_forward_pre_hook(lambda _, args: seen.append(args[0].dtype))
    x = torch.randn(2, 64, 9, 11)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = block(x.bfloat16())
    assert out.dtype == torch.bfloat16
    assert seen == [torch.float32]  # the spatial mean
    torch.testing.assert_close(out.float(), block(x.bfloat16().float()), rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize('kwargs, message', [
    (dict(rd_ratio=16), r'BottleneckAttention: rd_ratio=16 must be a fraction in \(0, 1\]'),
    (dict(dilation=0), r'BottleneckAttention: dilation=0 must be a positive integer, '
                       r'e.g. dilation=4'),
])
def test_bad_arguments_name_block_argument_and_fix(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BottleneckAttention(64, **kwargs)


def test_registered_in_root_registry_with_abbreviation():
    assert MODELS.get('BottleneckAttention') is BottleneckAttention
    assert BottleneckAttention._abbr_ == 'bam'


def test_runs_as_mmdet_resnet_plugin():
    backbone = ResNet(50, base_channels=16, zero_init_residual=False, plugins=[
        dict(cfg=dict(type='BottleneckAttention'), position='after_conv3')])
    backbone.init_weights()
    outs = backbone(torch.randn(2, 3, 45, 53))
    assert [tuple(o.shape) for o in outs] == [(2, 64, 12, 14), (2, 128, 6, 7), (2, 256, 3, 4),
                                               (2, 512, 2, 2)]
    sum(o.square().mean() for o in outs).backward()
    assert all(torch.isfinite(p.grad).all() for p in backbone.parameters())


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_bam_resnet50_counts_25_92_million():
    # Per module with r = C/16: 3Cr + 18r^2 + 13r + C + 1 (two Linear, four BN, four convs).
    per_module = {c: count(BottleneckAttention(c)) for c in (256, 512, 1024)}
    assert per_module == {c: 3 * c * (c // 16) + 18 * (c // 16) ** 2 + 13 * (c // 16) + c + 1
                          for c in per_module}
    resnet50_classifier = count(ResNet(50)) + 2048 * 1000 + 1000
    assert round(resnet50_classifier / 1e6, 3) == 25.557
    assert round((resnet50_classifier + sum(per_module.values())) / 1e6, 2) == 25.92
