"""Fusion of the blocks with the residual add (AttnBottleneck / AttnBasicBlock) changes nothing,
in either memory format.

The unfused reference is the same network with a no-op forward pre-hook on every plugin: a
plugin with hooks is always called as a module, so its block runs ``out = plugin(out)`` and
``out += identity`` as mmdet does.
"""
import copy

import pytest
import torch
import torch.nn as nn

from mmattn import kernels
from mmattn.backbones import AttnResNet
from mmattn.blocks import (
    BottleneckAttention,
    CompactGlobalDescriptor,
    ConvolutionalBlockAttention,
    EfficientChannelAttention,
    GlobalSecondOrderPooling,
    SpatialGroupEnhance,
    SqueezeExcitation,
)

# Each block at its paper placement, at base_channels=16 widths.
PLACED = {
    'se': dict(cfg=dict(type='SqueezeExcitation'), position='after_conv3'),
    'eca': dict(cfg=dict(type='EfficientChannelAttention'), position='after_conv3'),
    'sge': dict(cfg=dict(type='SpatialGroupEnhance', groups=8), position='after_conv3'),
    'cgd': dict(cfg=dict(type='CompactGlobalDescriptor'), position='after_conv1_pre_norm'),
    'cgd_plain_after_conv3': dict(cfg=dict(type='CompactGlobalDescriptor', mode='plain'),
                                  position='after_conv3'),
    'cbam': dict(cfg=dict(type='ConvolutionalBlockAttention'), position='after_conv3'),
    'gsop': dict(cfg=dict(type='GlobalSecondOrderPooling', att_dim=16), position='after_conv3',
                 blocks='last'),
    'gsop_sum': dict(cfg=dict(type='GlobalSecondOrderPooling', mode='sum', att_dim=16),
                     position='after_conv3', blocks='last'),
}
FUSABLE = (CompactGlobalDescriptor, ConvolutionalBlockAttention, EfficientChannelAttention,
           GlobalSecondOrderPooling, SpatialGroupEnhance, SqueezeExcitation)


def randomised(model: nn.Module) -> nn.Module:
    """Random norm parameters and statistics, so no gate or BN sits at its init."""
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith('running_var'):
                tensor.uniform_(0.5, 2)
            elif name.endswith('running_mean') or name.endswith('bias'):
                tensor.normal_(0, 0.2)
            elif name.endswith('weight') and tensor.dim() == 1:
                tensor.normal_(0.8, 0.2)
    return model


def unfused(model: nn.Module) -> nn.Module:
    """A copy whose plugins are called as modules (the pre-hook turns fusion off)."""
    twin = copy.deepcopy(model)
    for module in twin.modules():
        if isinstance(module, FUSABLE):
            module.register_forward_pre_hook(lambda mod, args: None)
    return twin


def network(plugins: list[dict], depth: int = 50, dtype=torch.float64, **kwargs) -> AttnResNet:
    """Two stages of a narrow ResNet: a stride-1 and a downsampling stage, 7 blocks at depth 50."""
    kwargs = dict(num_stages=2, strides=(1, 2), dilations=(1, 1), out_indices=(0, 1), **kwargs)
    model = AttnResNet(depth, base_channels=16, plugins=plugins, zero_init_residual=False,
                       **kwargs)
    return randomised(model).to(dtype)


def forward_backward(model: nn.Module, x: torch.Tensor) -> tuple[list, dict]:
    x = x.clone().requires_grad_()
    outs = model(x)
    generator = torch.Generator().manual_seed(1)
    loss = sum((out * torch.randn(out.shape, generator=generator, dtype=out.dtype)).sum()
               for out in outs)
    loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    return [out.detach() for out in outs], {'input': x.grad, **grads}


def assert_grads_close(actual: dict, expected: dict) -> None:
    # Relative to each gradient's size; a gradient that is 0 in exact arithmetic (a bias before
    # a training-mode BN) is float64 noise on both sides.
    assert actual.keys() == expected.keys()
    for name, grad in expected.items():
        scale = max(grad.abs().max().item(), 1.0)
        torch.testing.assert_close(actual[name], grad, rtol=1e-7, atol=1e-10 * scale,
                                   msg=lambda m, name=name: f'{name}: {m}')


@pytest.mark.parametrize('norm_eval', [True, False], ids=['frozen_bn', 'train_bn'])
@pytest.mark.parametrize('block', PLACED)
def test_fused_training_matches_unfused(block, norm_eval):
    model = network([PLACED[block]], norm_eval=norm_eval).train()
    reference = unfused(model)
    x = torch.randn(2, 3, 25, 29, dtype=torch.float64)
    outs, grads = forward_backward(model, x)
    expected_outs, expected_grads = forward_backward(reference, x)
    torch.testing.assert_close(outs, expected_outs, rtol=1e-12, atol=1e-12)
    assert_grads_close(grads, expected_grads)
    # Training-mode BN statistics were updated once, as in the unfused network.
    for (name, buffer), expected in zip(model.named_buffers(), reference.buffers(), strict=True):
        torch.testing.assert_close(buffer, expected, msg=name)


@pytest.mark.parametrize('block', PLACED)
def test_fused_inference_with_frozen_bn_matches_unfused(block):
    # Where a plugin folds the frozen BN in without autograd too (the CPU kernels: bn3 into SE,
    # ECA, CBAM and GSoP, bn1 after CGD).
    model = network([PLACED[block]], norm_eval=True).eval()
    x = torch.randn(2, 3, 25, 29, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), unfused(model)(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize('grad', [False, True], ids=['inference', 'training'])
@pytest.mark.parametrize('block', PLACED)
def test_fused_matches_unfused_in_fp32(block, grad):
    # One addcmul pass rounds once where ``x * gate`` then ``+= identity`` rounds twice: equal
    # to within the last bits, which later batch-statistics BN layers may magnify a little.
    model = network([PLACED[block]], dtype=torch.float32, norm_eval=False).train(grad)
    x = torch.randn(2, 3, 25, 29)
    with torch.set_grad_enabled(grad):
        torch.testing.assert_close(model(x), unfused(model)(x), rtol=1e-4, atol=1e-5)


def test_fuses_only_the_last_of_several_plugins_before_the_add():
    plugins = [PLACED['sge'], dict(cfg=dict(type='SqueezeExcitation', postfix='_2'),
                                   position='after_conv3')]
    model = network(plugins, norm_eval=False).train()
    x = torch.randn(2, 3, 25, 29, dtype=torch.float64)
    outs, grads = forward_backward(model, x)
    expected_outs, expected_grads = forward_backward(unfused(model), x)
    torch.testing.assert_close(outs, expected_outs, rtol=1e-12, atol=1e-12)
    assert_grads_close(grads, expected_grads)


@pytest.mark.parametrize('norm_eval', [True, False], ids=['frozen_bn', 'train_bn'])
@pytest.mark.parametrize('block', ['se', 'sge', 'cbam', 'cgd'])
def test_fused_under_with_cp_matches_unfused(block, norm_eval):
    # With frozen BN, SE and CGD fold the norm in: their node runs again inside the checkpoint.
    model = network([PLACED[block]], norm_eval=norm_eval, with_cp=True).train()
    x = torch.randn(2, 3, 25, 29, dtype=torch.float64)
    outs, grads = forward_backward(model, x)
    expected_outs, expected_grads = forward_backward(unfused(model), x)
    torch.testing.assert_close(outs, expected_outs, rtol=1e-12, atol=1e-12)
    assert_grads_close(grads, expected_grads)


@pytest.mark.parametrize('block', ['se', 'sge', 'cbam', 'eca'])
def test_basic_block_fuses_at_after_conv2(block):
    plugin = dict(PLACED[block], position='after_conv2')
    model = network([plugin], depth=18, norm_eval=False).train()
    x = torch.randn(2, 3, 25, 29, dtype=torch.float64)
    outs, grads = forward_backward(model, x)
    expected_outs, expected_grads = forward_backward(unfused(model), x)
    torch.testing.assert_close(outs, expected_outs, rtol=1e-12, atol=1e-12)
    assert_grads_close(grads, expected_grads)


@pytest.mark.usefixtures('kernel_path')
@pytest.mark.parametrize('block', ['sge', 'gsop'])
def test_frozen_stages_and_no_grad_input_still_train_later_plugins(block):
    # Stage 1 frozen: its blocks run without autograd (fused in place), stage 2 trains.
    model = network([PLACED[block]], frozen_stages=1).train()
    x = torch.randn(2, 3, 25, 29, dtype=torch.float64)
    outs, grads = forward_backward(model, x)
    expected_outs, expected_grads = forward_backward(unfused(model), x)
    torch.testing.assert_close(outs, expected_outs, rtol=1e-12, atol=1e-12)
    assert_grads_close(grads, expected_grads)
    trained = {name.split('.')[0] for name in grads if f'.{block}.' in name}
    assert trained == {'layer2'}


def test_a_hooked_plugin_is_called_as_a_module():
    model = network([PLACED['se']], dtype=torch.float32).eval()
    seen = []
    model.layer1[0].se.register_forward_hook(lambda mod, args, out: seen.append(out.shape))
    with torch.no_grad():
        model(torch.randn(1, 3, 25, 29))
    assert seen == [torch.Size([1, 64, 7, 8])]


# Every block at its paper placement, BAM on the two stages' outputs too.
IN_NETWORK = {**PLACED, 'bam': dict(cfg=dict(type='BottleneckAttention'), position='after_stage',
                                    stages=(True, True))}


@pytest.mark.parametrize('grad', [False, True], ids=['inference', 'training'])
@pytest.mark.parametrize('norm_eval', [True, False], ids=['frozen_bn', 'train_bn'])
@pytest.mark.parametrize('block', IN_NETWORK)
def test_channels_last_network_matches_contiguous(block, norm_eval, grad):
    # channels_last tensors take the eager path (the CPU kernels take contiguous ones), as they
    # do on CUDA, where the benchmark times channels_last.
    model = network([IN_NETWORK[block]], norm_eval=norm_eval).train(grad)
    twin = copy.deepcopy(model).to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 25, 29, dtype=torch.float64)
    x_last = x.to(memory_format=torch.channels_last)
    if not grad:
        with torch.no_grad():
            torch.testing.assert_close(twin(x_last), model(x), rtol=1e-10, atol=1e-12)
        return
    outs, grads = forward_backward(twin, x_last)
    expected_outs, expected_grads = forward_backward(model, x)
    torch.testing.assert_close(outs, expected_outs, rtol=1e-10, atol=1e-12)
    assert_grads_close(grads, expected_grads)


@pytest.mark.parametrize('channels_last', [False, True], ids=['contiguous', 'channels_last'])
@pytest.mark.parametrize('block', [SqueezeExcitation(32), EfficientChannelAttention(32),
                                   SpatialGroupEnhance(32, groups=4),
                                   CompactGlobalDescriptor(32),
                                   ConvolutionalBlockAttention(32, rd_ratio=1 / 8).eval(),
                                   GlobalSecondOrderPooling(32, att_dim=8).eval()],
                         ids=lambda block: type(block).__name__)
def test_fused_residual_without_autograd_writes_over_x(block, channels_last):
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(2, 32, 9, 11).to(memory_format=memory_format)
    identity = torch.randn(2, 32, 9, 11)
    with torch.no_grad():
        expected = block(x) + identity
        given = x.clone()
        out = block.fused_residual(given, identity)
    assert out.data_ptr() == given.data_ptr()
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)


def test_cgd_forward_inplace_matches_forward():
    block = CompactGlobalDescriptor(32).double()
    x = torch.randn(2, 32, 9, 11, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(2, 32, 9, 11, dtype=torch.float64)
    (block.forward_inplace(x * 1) * upstream).sum().backward()
    grads = [x.grad.clone(), *(p.grad.clone() for p in block.parameters())]
    x.grad = None
    block.zero_grad()
    (block(x) * upstream).sum().backward()
    for actual, expected in zip(grads, [x.grad, *(p.grad for p in block.parameters())],
                                strict=True):
        torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-12)


def test_bam_has_no_fusion():
    # BAM runs on a stage's output, not before a residual add.
    assert not hasattr(BottleneckAttention(64), 'fused_residual')


def backward_nodes(out: torch.Tensor) -> list[str]:
    """The names of the autograd nodes behind ``out``."""
    seen, stack, names = set(), [out.grad_fn], []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.append(type(node).__name__)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return names


@pytest.mark.parametrize('block', ['se', 'eca', 'cgd'])
def test_frozen_bn_is_folded_into_the_gate(block):
    # 7 blocks; with frozen BN each block's bn3 (SE, ECA) or bn1 (CGD) joins the gate's node.
    # SE and ECA take their kernels' node where the kernels are built (CGD has none).
    folded = ('_KernelNormGateBackward' if block != 'cgd' and kernels.enabled()
              else '_FoldedNormBackward')
    model = network([PLACED[block]], norm_eval=True).train()
    names = backward_nodes(model(torch.randn(2, 3, 25, 29, dtype=torch.float64))[-1])
    assert names.count(folded) == 7
    # stem + 3 per block + 2 downsamples, less the 7 folded
    assert names.count('NativeBatchNormBackward0') == 1 + 3 * 7 + 2 - 7
    # With batch statistics (norm_eval=False) nothing is folded.
    model = network([PLACED[block]], norm_eval=False).train()
    names = backward_nodes(model(torch.randn(2, 3, 25, 29, dtype=torch.float64))[-1])
    assert not {'_KernelNormGateBackward', '_FoldedNormBackward'} & set(names)


def test_frozen_bn3_is_folded_into_gsop():
    # GSoP on the last block of each of the 2 stages: bn3 joins the block's node there, and the
    # block's own BN layers sit in the gate's graph, which the node differentiates itself.
    model = network([PLACED['gsop']], norm_eval=True).train()
    names = backward_nodes(model(torch.randn(2, 3, 25, 29, dtype=torch.float64))[-1])
    assert names.count('_FoldedChannelGSoPBackward') == 2
    # stem + 3 per block + 2 downsamples, less the 2 folded
    assert names.count('NativeBatchNormBackward0') == 1 + 3 * 7 + 2 - 2
    # With batch statistics (norm_eval=False) nothing is folded: bn3's output is gated.
    model = network([PLACED['gsop']], norm_eval=False).train()
    names = backward_nodes(model(torch.randn(2, 3, 25, 29, dtype=torch.float64))[-1])
    assert '_FoldedChannelGSoPBackward' not in names
    assert names.count('_GatedResidualBackward') == 2


@pytest.mark.usefixtures('kernel_path')
def test_frozen_bn_is_folded_into_cbams_kernels(kernel_path):
    model = network([PLACED['cbam']], norm_eval=True).train()
    names = backward_nodes(model(torch.randn(2, 3, 25, 29, dtype=torch.float64))[-1])
    # Kernels: stem + 3 per block + 2 downsamples, less the 7 bn3 folded into the kernels'
    # node (which also differentiates CBAM's own spatial BN). Eager: all of those and the 7
    # spatial BNs.
    if kernel_path == 'kernels':
        assert names.count('NativeBatchNormBackward0') == 1 + 3 * 7 + 2 - 7
        assert names.count('_KernelCBAMBackward') == 7
    else:
        assert names.count('NativeBatchNormBackward0') == 1 + 3 * 7 + 2 + 7
