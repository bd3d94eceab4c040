"""What mmattn/kernels promises: which tensors the fused CPU kernels take, that the blocks really
call them, and that a failed build falls back to the eager path with a warning.

The kernels' math is checked where each block's is: the blocks' tests run once per path (the
``kernel_path`` fixture), against independent implementations of the papers' op sequences.
"""
import warnings
from functools import partial

import pytest
import torch
from torch.profiler import profile

from mmattn import kernels
from mmattn.blocks import ConvolutionalBlockAttention, SpatialGroupEnhance


def op_names(fn) -> set[str]:
    with profile() as prof:
        fn()
    return {event.name for event in prof.events()}


def sge_block() -> SpatialGroupEnhance:
    block = SpatialGroupEnhance(16, groups=4)
    with torch.no_grad():
        block.weight.normal_()
        block.bias.normal_()
    return block


def cbam_block() -> ConvolutionalBlockAttention:
    block = ConvolutionalBlockAttention(16, rd_ratio=1 / 4)
    with torch.no_grad():
        for param in block.parameters():
            param.normal_(0, 0.5)
    return block


CBAM_PASSES = {'mmattn::channel_pools', 'mmattn::cbam_spatial_pools', 'mmattn::cbam_apply',
               'mmattn::cbam_gate_grads', 'mmattn::cbam_pool_channel_grad',
               'mmattn::cbam_input_grad'}
BLOCKS = {
    'sge': (sge_block, {'mmattn::sge_forward', 'mmattn::sge_backward'}),
    # Train mode: the spatial BN uses batch statistics, the gates are autograd graphs.
    'cbam': (cbam_block, CBAM_PASSES),
    # Eval mode (frozen spatial BN, as in a norm_eval=True backbone): the gates are kernels too.
    'cbam_eval': (lambda: cbam_block().eval(),
                  CBAM_PASSES | {'mmattn::cbam_channel_gate', 'mmattn::cbam_channel_gate_backward',
                                 'mmattn::cbam_spatial_gate',
                                 'mmattn::cbam_spatial_gate_backward'}),
}


@pytest.mark.parametrize('name', BLOCKS)
def test_kernel_path_runs_the_kernels(name, kernel_path):
    make, ops = BLOCKS[name]
    block = make()
    x = torch.randn(2, 16, 5, 7, requires_grad=True)

    names = op_names(lambda: block(x).sum().backward())
    expected = ops if kernel_path == 'kernels' else set()
    assert {name for name in names if name.startswith('mmattn::')} == expected


@pytest.mark.parametrize('fused', [False, True], ids=['forward', 'fused_residual'])
@pytest.mark.parametrize('name', BLOCKS)
def test_kernels_equal_the_eager_path_over_many_positions(name, fused, monkeypatch):
    # 33 x 35 positions: more than one of cbam.cpp's blocks of 1024, and a partial vector.
    block = BLOCKS[name][0]().double()
    x = torch.randn(2, 16, 33, 35, dtype=torch.float64)
    identity = torch.randn_like(x)
    upstream = torch.randn_like(x)
    results = {}
    for switch in ('1', '0'):
        monkeypatch.setenv('MMATTN_KERNELS', switch)
        block.zero_grad()
        x_in = x.clone().requires_grad_()
        out = block.fused_residual(x_in * 1, identity) if fused else block(x_in)
        (out * upstream).sum().backward()
        results[switch] = [out.detach(), x_in.grad, *(p.grad for p in block.parameters())]
    torch.testing.assert_close(results['1'], results['0'], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize('case', ['half', 'mixed_dtypes', 'channels_last'])
def test_kernels_refuse_what_they_do_not_cover(case):
    x = torch.randn(2, 8, 3, 5)
    tensors = {
        'half': (x.half(),),
        'mixed_dtypes': (x, x.double()),
        'channels_last': (x.contiguous(memory_format=torch.channels_last),),
    }[case]
    assert kernels.usable(x)
    assert not kernels.usable(*tensors)


def test_kernels_switched_off_by_the_environment(monkeypatch):
    monkeypatch.setenv('MMATTN_KERNELS', '0')
    assert not kernels.usable(torch.randn(2, 8, 3, 5))


def test_weight_gradient_alone_equals_the_eager_path(monkeypatch):
    block = sge_block().double()
    x = torch.randn(2, 16, 5, 7, dtype=torch.float64)
    grads = {}
    for switch in ('1', '0'):
        monkeypatch.setenv('MMATTN_KERNELS', switch)
        block.zero_grad()
        (block(x) * torch.linspace(-1, 1, x.numel(), dtype=x.dtype).view_as(x)).sum().backward()
        grads[switch] = (block.weight.grad.clone(), block.bias.grad.clone())
    torch.testing.assert_close(grads['1'], grads['0'])


@pytest.fixture
def failing_build(monkeypatch):
    """The next build attempt fails as it does on a machine without a C++ compiler."""
    import torch.utils.cpp_extension as cpp_extension

    def no_compiler(*args, **kwargs):
        raise RuntimeError('Error building extension: c++: command not found\nmore lines')

    monkeypatch.setattr(cpp_extension, 'load', no_compiler)
    kernels._build.cache_clear()
    yield
    monkeypatch.undo()
    kernels._build.cache_clear()


@pytest.mark.usefixtures('failing_build')
def test_failed_build_warns_once_and_the_blocks_take_the_eager_path():
    block = sge_block()
    x = torch.randn(2, 16, 5, 7)
    with pytest.warns(UserWarning, match=r'could not be built \(RuntimeError: Error building '
                                         r'extension: c\+\+: command not found\)'):
        assert not kernels.enabled()
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # the failure is remembered: no second warning
        names = op_names(lambda: block(x))
    assert 'mmattn::sge_forward' not in names


def test_cbam_spatial_conv_runs_natively_and_onednn_stays_on():
    block = cbam_block()
    x = torch.randn(2, 16, 5, 7, requires_grad=True)
    assert torch.backends.mkldnn.enabled

    names = op_names(lambda: block(x).sum().backward())
    assert 'aten::mkldnn_convolution' not in names
    assert 'aten::_slow_conv2d_forward' in names
    assert torch.backends.mkldnn.enabled


@pytest.mark.parametrize('name', BLOCKS)
def test_fake_tensors_take_the_eager_path(name):
    # The custom ops have no fake implementation: calling them here would raise.
    from torch._subclasses.fake_tensor import FakeTensorMode
    block = BLOCKS[name][0]()
    with FakeTensorMode(allow_non_fake_inputs=True):
        out = block(torch.randn(2, 16, 5, 7))
    assert out.shape == (2, 16, 5, 7)


def folded_and_unfolded(block: torch.nn.Module, src: torch.Tensor) -> list[list[torch.Tensor]]:
    """Outputs and gradients (src, scale, shift, the block's parameters) of
    ``block.fused_norm_residual`` and of the BN's affine map then the block, with a random
    identity, upstream gradient and (C, ) scale (some negative) and shift."""
    channels = src.shape[1]
    identity = torch.randn_like(src)
    upstream = torch.randn_like(src)
    scale = torch.empty(channels, dtype=src.dtype).uniform_(-1.5, 1.5)
    shift = torch.randn(channels, dtype=src.dtype)
    results = []
    for folded in (True, False):
        block.zero_grad()
        inputs = [t.clone().requires_grad_() for t in (src, scale, shift)]
        s, a, b = inputs
        if folded:
            out = block.fused_norm_residual(s * 1, a, b, identity)
        else:
            out = block(s * a[:, None, None] + b[:, None, None]) + identity
        (out * upstream).sum().backward()
        results.append([out.detach(), *(t.grad for t in inputs),
                        *(p.grad for p in block.parameters())])
    return results


def test_cbam_with_a_frozen_bn_folded_equals_the_bn_then_the_block():
    # 33 x 35 positions: more than one of cbam.cpp's blocks of 1024, and a partial vector.
    block = cbam_block().double()
    src = torch.randn(2, 16, 33, 35, dtype=torch.float64)
    assert block.folds_norm(src, torch.randn_like(src))
    results = folded_and_unfolded(block, src)
    torch.testing.assert_close(results[0], results[1], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize('cfg, op', [
    (dict(type='SqueezeExcitation'), 'mmattn::se_inference'),
    (dict(type='SqueezeExcitation', act_cfg=dict(type='GELU')), 'mmattn::channel_affine_residual'),
    (dict(type='EfficientChannelAttention'), 'mmattn::eca_inference'),
    (dict(type='ConvolutionalBlockAttention'), 'mmattn::cbam_inference'),
    (dict(type='ConvolutionalBlockAttention', act_cfg=dict(type='GELU')), 'mmattn::cbam_apply'),
    (dict(type='CompactGlobalDescriptor'), 'mmattn::cgd_inference'),
    (dict(type='CompactGlobalDescriptor', mode='plain'), 'mmattn::cgd_inference'),
], ids=['se', 'se_gelu', 'eca', 'cbam', 'cbam_gelu', 'cgd', 'cgd_plain'])
def test_inference_folds_a_frozen_bn_into_one_kernel_call(cfg, op, kernel_path):
    # One call for the whole block and the BN next to it (bn3 before SE, ECA, CBAM; bn1 after
    # CGD) where the kernels have the block's gate functions; other activations compute the
    # gate in PyTorch between the kernels' passes.
    from mmattn.backbones import AttnResNet
    position = 'after_conv1_pre_norm' if cfg['type'] == 'CompactGlobalDescriptor' else 'after_conv3'
    model = AttnResNet(50, base_channels=16, num_stages=1, strides=(1, ), dilations=(1, ),
                       out_indices=(0, ), norm_eval=True,
                       plugins=[dict(cfg=cfg, position=position)]).eval()
    with torch.no_grad():
        names = op_names(lambda: model(torch.randn(1, 3, 32, 32)))
    ran = {name for name in names if name.startswith('mmattn::')}
    if kernel_path == 'eager':
        assert not ran
    elif op.endswith('_inference'):
        assert ran == {op}
    else:
        assert op in ran and not any(name.endswith('_inference') for name in ran)


def bn_then(block: torch.nn.Module, channels: int) -> tuple[torch.nn.BatchNorm2d, torch.Tensor]:
    """A frozen BN with random statistics and some negative scales, and random block weights."""
    bn = torch.nn.BatchNorm2d(channels).double().eval()
    with torch.no_grad():
        for param in block.parameters():
            param.normal_(0, 0.5)
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(-1.5, 1.5)
        bn.bias.normal_()
    return bn


def test_sge_inference_folds_a_frozen_bn3_into_its_kernel(kernel_path):
    from mmattn.backbones import AttnResNet
    model = AttnResNet(50, base_channels=16, num_stages=1, strides=(1, ), dilations=(1, ),
                       out_indices=(0, ), norm_eval=True,
                       plugins=[dict(cfg=dict(type='SpatialGroupEnhance', groups=8),
                                     position='after_conv3')]).eval()
    with torch.no_grad(), profile() as prof:
        model(torch.randn(1, 3, 32, 32))
    names = [event.name for event in prof.events()]
    folded = 3 if kernel_path == 'kernels' else 0
    assert names.count('mmattn::sge_forward') == folded
    # stem + 3 per block + the downsample, less the bn3 folded into the kernel
    assert names.count('aten::batch_norm') == 1 + 3 * 3 + 1 - folded


@pytest.mark.parametrize('name', ['se', 'eca', 'sge', 'cbam', 'cgd', 'cgd_plain'])
def test_inference_kernels_equal_the_bn_and_the_block(name):
    # 33 x 35 positions: more than one of cbam.cpp's blocks of 1024, and a partial vector;
    # 64 channels: hidden widths of 4 (SE, CBAM), ECA's kernel of 3 and SGE groups of 8.
    from mmattn.backbones.res_blocks import frozen_affine
    from mmattn.blocks import CompactGlobalDescriptor, EfficientChannelAttention, SqueezeExcitation
    make = {'se': SqueezeExcitation, 'eca': EfficientChannelAttention,
            'sge': partial(SpatialGroupEnhance, groups=8),
            'cbam': ConvolutionalBlockAttention, 'cgd': CompactGlobalDescriptor,
            'cgd_plain': partial(CompactGlobalDescriptor, mode='plain')}[name]
    block = make(64).double().eval()
    bn = bn_then(block, 64)
    if name == 'cbam':
        with torch.no_grad():
            block.SpatialGate.spatial.bn.running_mean.fill_(0.3)
            block.SpatialGate.spatial.bn.running_var.fill_(1.7)
    src = torch.randn(2, 64, 33, 35, dtype=torch.float64)
    identity = torch.randn_like(src)
    with torch.no_grad():
        scale, shift = frozen_affine(bn)
        if name.startswith('cgd'):  # CGD, then bn1
            expected = bn(block(src))  # as modules, no fusion
            names = op_names(lambda: block.fused_pre_norm(src, scale, shift))
        else:  # bn3, then the block and the residual add
            expected = block(bn(src)) + identity
            assert block.folds_norm(src, identity)
            names = op_names(lambda: block.fused_norm_residual(src, scale, shift, identity))
    op = 'mmattn::sge_forward' if name == 'sge' else (
        'mmattn::' + name.removesuffix('_plain') + '_inference')
    assert {n for n in names if n.startswith('mmattn::')} == {op}
    torch.testing.assert_close(src, expected, rtol=1e-12, atol=1e-12)  # written over src


def test_folded_channel_gate_backward_is_one_kernel_call():
    # SE after a frozen BN, with autograd: one op sums over H x W, runs the gate's backward and
    # writes src's gradient; no other op touches the feature map or the (N, C) statistics.
    from mmattn.blocks import SqueezeExcitation
    block = SqueezeExcitation(16)
    src = torch.randn(2, 16, 5, 7, requires_grad=True)
    scale, shift = (torch.rand(16) + 0.5).requires_grad_(), torch.randn(16, requires_grad=True)
    out = block.fused_norm_residual(src, scale, shift, torch.randn(2, 16, 5, 7))
    upstream = torch.randn_like(out)  # a contiguous gradient, as a network's layers send
    names = op_names(lambda: out.backward(upstream))
    assert {name for name in names if name.startswith('mmattn::')} == {
        'mmattn::se_norm_residual_backward'}
    allocations = {'aten::empty', 'aten::empty_like', 'aten::empty_strided', 'aten::zeros_like',
                   'aten::zero_', 'aten::fill_', 'aten::detach'}
    assert {name for name in names if name.startswith('aten::')} <= allocations


@pytest.mark.parametrize('mode, grad, folded', [
    ('channel', False, True), ('channel', True, True), ('sum', False, False)])
def test_gsop_folds_a_frozen_bn3_in_channel_mode(mode, grad, folded, kernel_path):
    # The rectified, subsampled input and the gated add, each one kernel pass with bn3 in them,
    # without autograd and (the parameters require grad) in the folded node's forward.
    from mmattn.backbones import AttnResNet
    model = AttnResNet(50, base_channels=16, num_stages=1, strides=(1, ), dilations=(1, ),
                       out_indices=(0, ), norm_eval=True,
                       plugins=[dict(cfg=dict(type='GlobalSecondOrderPooling', mode=mode,
                                              att_dim=8),
                                     position='after_conv3', blocks='last')]).eval()
    with torch.set_grad_enabled(grad):
        names = op_names(lambda: model(torch.randn(1, 3, 32, 32)))
    ran = {name for name in names if name.startswith('mmattn::')}
    expected = {'mmattn::channel_affine_relu', 'mmattn::channel_affine_residual'}
    assert ran == (expected if folded and kernel_path == 'kernels' else set())


@pytest.mark.parametrize('cfg, gate', [
    (dict(type='SqueezeExcitation'), 'se'),
    (dict(type='EfficientChannelAttention'), 'eca'),
    (dict(type='CompactGlobalDescriptor'), 'cgd'),
    (dict(type='CompactGlobalDescriptor', mode='plain'), 'cgd'),
], ids=['se', 'eca', 'cgd', 'cgd_plain'])
def test_training_with_a_frozen_bn_runs_the_gate_as_kernels(cfg, gate):
    # The gate and its backward are one op each (no graph for autograd to walk in backward);
    # the gradient sums are one pass, and so are the cascade's two pools.
    from mmattn.backbones import AttnResNet
    position = 'after_conv1_pre_norm' if gate == 'cgd' else 'after_conv3'
    model = AttnResNet(50, base_channels=16, num_stages=1, strides=(1, ), dilations=(1, ),
                       out_indices=(0, ), norm_eval=True,
                       plugins=[dict(cfg=cfg, position=position)]).train()
    x = torch.randn(2, 3, 32, 32)
    names = op_names(lambda: (model(x)[0] * torch.randn(2, 64, 8, 8)).sum().backward())
    # SE and ECA (with bn3 and the residual add): the forward and the backward, one call
    # each. CGD: channel_affine_residual for the output and for x's gradient, one pass each.
    expected = {f'mmattn::{gate}_norm_residual', f'mmattn::{gate}_norm_residual_backward'}
    if gate == 'cgd':
        expected = {'mmattn::cgd_gate', 'mmattn::cgd_gate_backward', 'mmattn::channel_grad_sums',
                    'mmattn::channel_affine_residual'}
    if cfg.get('mode', 'cascade') == 'cascade' and gate == 'cgd':
        expected.add('mmattn::channel_pools')
    assert {name for name in names if name.startswith('mmattn::')} == expected
    assert not {'aten::tanh', 'aten::sigmoid', 'aten::linear', 'aten::conv1d'} & names


@pytest.mark.parametrize('name', ['se', 'eca', 'cgd', 'cgd_plain'])
def test_gate_kernels_equal_autograd_through_the_modules(name, monkeypatch):
    # 64 channels: SE's hidden width of 4, ECA's kernel of 3; float64, random weights.
    from mmattn.blocks import CompactGlobalDescriptor, EfficientChannelAttention, SqueezeExcitation
    block = {'se': SqueezeExcitation, 'eca': EfficientChannelAttention,
             'cgd': CompactGlobalDescriptor,
             'cgd_plain': partial(CompactGlobalDescriptor, mode='plain')}[name](64).double()
    with torch.no_grad():
        for param in block.parameters():
            param.normal_(0, 0.3)
    mean, peak = torch.randn(3, 64, dtype=torch.float64), torch.randn(3, 64, dtype=torch.float64)
    upstream = torch.randn(3, 64, dtype=torch.float64)
    forward_op, backward_op, weights = block.gate_kernels()
    pools = [mean, peak if block.pools_max else None]
    gate = getattr(torch.ops.mmattn, forward_op)(*pools, *weights)
    grads = getattr(torch.ops.mmattn, backward_op)(upstream, *pools, *weights)

    monkeypatch.setenv('MMATTN_KERNELS', '0')  # the modules' own ops, through autograd
    leaves = [t.clone().requires_grad_() for t in (mean, peak)]
    expected = block.gate_from_pools(*leaves)
    present = [w for w in weights if w is not None]
    expected_grads = torch.autograd.grad((expected * upstream).sum(), [*leaves, *present],
                                         allow_unused=True)
    torch.testing.assert_close(gate, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grads[0], expected_grads[0], rtol=1e-10, atol=1e-12)
    if block.pools_max:
        torch.testing.assert_close(grads[1], expected_grads[1], rtol=1e-10, atol=1e-12)
    got = [g for g, w in zip(grads[2:], weights, strict=True) if w is not None]
    for g, want, w in zip(got, expected_grads[2:], present, strict=True):
        torch.testing.assert_close(g.view_as(w), want, rtol=1e-10, atol=1e-12)


def test_sge_fused_norm_residual_with_autograd_equals_the_bn_then_the_block():
    # The backbone folds bn3 into SGE only without autograd (folds_norm); called with autograd,
    # the method still computes identity + SGE(BN(src)) and its gradients.
    block = sge_block().double()
    src = torch.randn(2, 16, 9, 11, dtype=torch.float64)
    assert not block.folds_norm(src, torch.randn_like(src))  # grad is enabled
    results = folded_and_unfolded(block, src)
    torch.testing.assert_close(results[0], results[1], rtol=1e-10, atol=1e-12)


MISFIT_BN = r'scale and shift are contiguous \(C, \) = \(16, \) CPU Float tensors, got \[8\]'


def test_a_folded_bn_needs_both_factors():
    assert kernels.enabled()
    x = torch.randn(2, 16, 3, 5)
    block = sge_block()
    with pytest.raises(RuntimeError, match='sge_forward: a folded BN takes both scale and shift'):
        torch.ops.mmattn.sge_forward(x, block.weight.detach(), block.bias.detach(), None,
                                     torch.empty_like(x), 4, 1e-5, torch.ones(16), None)
    with pytest.raises(RuntimeError, match=MISFIT_BN):
        torch.ops.mmattn.sge_forward(x, block.weight.detach(), block.bias.detach(), None,
                                     torch.empty_like(x), 4, 1e-5, torch.ones(8), torch.ones(8))


@pytest.mark.parametrize('name', ['se', 'eca'])
def test_training_kernels_equal_the_bn_then_the_block(name):
    # With autograd, SE and ECA after a frozen BN are their two training ops: outputs and the
    # gradients of src, the BN's scale and shift and the block's parameters, against the BN's
    # affine map and the block's module ops. 33 x 35 positions (a partial vector); 64 channels:
    # SE's hidden width of 4, ECA's kernel of 3.
    from mmattn.blocks import EfficientChannelAttention, SqueezeExcitation
    block = {'se': SqueezeExcitation, 'eca': EfficientChannelAttention}[name](64).double()
    with torch.no_grad():
        for param in block.parameters():
            param.normal_(0, 0.5)
    src = torch.randn(2, 64, 33, 35, dtype=torch.float64)
    names = op_names(lambda: folded_and_unfolded(block, src))
    assert {f'mmattn::{name}_norm_residual', f'mmattn::{name}_norm_residual_backward'} <= names
    results = folded_and_unfolded(block, src)
    torch.testing.assert_close(results[0], results[1], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize('op', ['cgd_inference', 'channel_affine_relu'])
def test_inference_kernels_name_a_misfit_bn(op):
    # The check comes before any read of the factors or the gate's weights.
    x = torch.randn(2, 16, 3, 5)
    args = {'cgd_inference': (torch.empty_like(x), torch.ones(1), None, None, None, None, None),
            'channel_affine_relu': (1, )}[op]
    with pytest.raises(RuntimeError, match=f'{op}: a folded BN.s {MISFIT_BN}'):
        getattr(torch.ops.mmattn, op)(x, torch.ones(8), torch.zeros(8), *args)


def test_cbam_input_grad_names_a_misfit_bn():
    x = torch.randn(2, 16, 3, 5)
    pooled = torch.empty(2, 2, 3, 5)
    rest = (torch.ones(2, 16), torch.ones(2, 1, 3, 5), pooled, pooled, torch.ones(2, 16),
            torch.ones(2, 16), torch.zeros(2, 16, dtype=torch.long))
    with pytest.raises(RuntimeError, match='takes both src and scale, or neither'):
        torch.ops.mmattn.cbam_input_grad(x, x, None, *rest)
    misfit_src = r"src is grad's size \[2, 16, 3, 5\], got \[2, 16, 3, 4\]"
    with pytest.raises(RuntimeError, match=misfit_src):
        torch.ops.mmattn.cbam_input_grad(x, x[..., :4].contiguous(), torch.ones(16), *rest)
    with pytest.raises(RuntimeError, match=f'cbam_input_grad: a folded BN.s {MISFIT_BN}'):
        torch.ops.mmattn.cbam_input_grad(x, x, torch.ones(8), *rest)


def test_training_kernels_name_a_misfit_bn():
    from mmattn.blocks import EfficientChannelAttention
    x = torch.randn(2, 16, 3, 5)
    weight = EfficientChannelAttention(16).conv.weight.detach()
    with pytest.raises(RuntimeError, match=MISFIT_BN):
        torch.ops.mmattn.eca_norm_residual(x, torch.ones(8), torch.zeros(8), x, weight)
    out, means, gate = torch.ops.mmattn.eca_norm_residual(x, torch.ones(16), torch.zeros(16), x,
                                                          weight)
    with pytest.raises(RuntimeError, match=r'saved means and gate are \(N, C\) = \(2, 16\)'):
        torch.ops.mmattn.eca_norm_residual_backward(out, x, means[:1].contiguous(), gate,
                                                    torch.ones(16), torch.zeros(16), weight)


def test_bam_gating_kernels_equal_the_eager_path(monkeypatch):
    # 33 x 35 positions: three of bam.cpp's backward chunks of 512, the last one partial, and a
    # partial vector at the end of each row. float64, random weights, train mode.
    from mmattn.blocks import BottleneckAttention
    block = BottleneckAttention(32).double()
    with torch.no_grad():
        for param in block.parameters():
            param.normal_(0, 0.5)
    x = torch.randn(2, 32, 33, 35, dtype=torch.float64)
    upstream = torch.randn_like(x)
    results = {}
    for switch in ('1', '0'):
        monkeypatch.setenv('MMATTN_KERNELS', switch)
        block.zero_grad()
        x_in = x.clone().requires_grad_()

        def step(x_in=x_in):
            out = block(x_in)
            (out * upstream).sum().backward()
            return out
        names = op_names(step)
        ran = {name for name in names if name.startswith('mmattn::')}
        assert ran == ({'mmattn::bam_apply', 'mmattn::bam_apply_backward'} if switch == '1'
                       else set())
        results[switch] = [block(x_in).detach(), x_in.grad,
                           *(p.grad for p in block.parameters())]
    torch.testing.assert_close(results['1'], results['0'], rtol=1e-10, atol=1e-12)
    monkeypatch.setenv('MMATTN_KERNELS', '1')
    with torch.no_grad():
        names = op_names(lambda: block.eval()(x))
    assert 'mmattn::bam_apply' in names


def test_bam_gating_kernel_keeps_float32_precision_with_its_faster_exp():
    # The float32 kernel's exponential is ATen's exp_u20 (within 20 ULP); the gated output and
    # its gradients must stay as close to the eager ops as float32 rounding allows.
    from mmattn.blocks.bam import gated
    x = (torch.randn(2, 32, 9, 11) * 3).requires_grad_()
    channel = (torch.randn(2, 32) * 4).requires_grad_()
    spatial = (torch.randn(2, 1, 9, 11) * 4).requires_grad_()
    upstream = torch.randn_like(x)
    results = []
    for fn in (gated, lambda x, c, s: torch.addcmul(x, x, (c[:, :, None, None] * s).sigmoid())):
        out = fn(x, channel, spatial)
        results.append([out, *torch.autograd.grad(out, [x, channel, spatial], upstream)])
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-5 * want.abs().max().item())


def test_bam_gating_kernel_trains_the_block_on_an_input_without_grad(monkeypatch):
    # A frozen stem and stage before BAM: x needs no gradient, the block's parameters do.
    from mmattn.blocks import BottleneckAttention
    block = BottleneckAttention(32).double()
    x = torch.randn(2, 32, 9, 11, dtype=torch.float64)
    grads = {}
    for switch in ('1', '0'):
        monkeypatch.setenv('MMATTN_KERNELS', switch)
        block.zero_grad()
        (block(x) * x).sum().backward()
        grads[switch] = [p.grad for p in block.parameters()]
    torch.testing.assert_close(grads['1'], grads['0'], rtol=1e-10, atol=1e-12)
