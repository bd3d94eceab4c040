"""AttnResNet: mmdet's ResNet, unchanged where mmdet has a placement, plus the ones it lacks."""
import pytest
import torch
import torch.nn as nn
import torchvision
from mmdet.models.backbones import ResNet
from mmdet.registry import MODELS as MMDET_MODELS
from mmengine.registry import MODELS
from mmpretrain.models.backbones import ResNet as MMPretrainResNet
from mmpretrain.registry import MODELS as MMPRETRAIN_MODELS

from mmattn.backbones import AttnResNet

SGE = dict(type='SpatialGroupEnhance', groups=4)
BOTTLENECK_POSITIONS = ('after_conv1_pre_norm', 'after_conv1', 'after_conv2', 'after_conv3')


@MODELS.register_module(name='AttnResNetTestProbe', force=True)
class Probe(nn.Module):
    """Records what it receives and passes it on doubled, so the next op can be recognised."""

    _abbr_ = 'probe'

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.in_channels = in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.received = x.detach().clone()
        out = x * 2
        self.sent = out.detach().clone()
        return out


@MODELS.register_module(name='AttnResNetTestNorm', force=True)
class NormPlugin(nn.Module):
    """A plugin with a BatchNorm, to see what frozen_stages and norm_eval do to it."""

    _abbr_ = 'norm_plugin'

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(in_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(x)


def small(depth: int = 50, **kwargs) -> AttnResNet:
    return AttnResNet(depth, base_channels=16, **kwargs)


def image() -> torch.Tensor:
    return torch.randn(2, 3, 45, 53)


def randomise(module: nn.Module) -> None:
    with torch.no_grad():
        for param in module.parameters():
            param.normal_(0, 0.5)


# ---------------------------------------------------------------------------------------------
# Registry and mmdet compatibility


@pytest.mark.parametrize('registry', [MODELS, MMDET_MODELS, MMPRETRAIN_MODELS],
                         ids=['root', 'mmdet', 'mmpretrain'])
def test_resolves_in_every_scope(registry):
    assert registry.get('AttnResNet') is AttnResNet


MMDET_PLUGINS = {
    'none': None,
    'context_block': [dict(cfg=dict(type='ContextBlock', ratio=1 / 4), position='after_conv3')],
    'sge': [dict(cfg=SGE, position='after_conv3')],
    'mixed': [
        dict(cfg=SGE, position='after_conv3', stages=(False, True, True, True)),
        dict(cfg=dict(type='ContextBlock', ratio=1 / 4), position='after_conv2'),
        dict(cfg=dict(SGE, postfix=2), position='after_conv1', stages=(True, False, True, False)),
    ],
}
BACKBONE_OPTIONS = {
    'default': {},
    'variants': dict(out_indices=(1, 3), style='caffe', deep_stem=True, avg_down=True),
}


@pytest.mark.parametrize('plugins', MMDET_PLUGINS)
def test_mmdet_plugins_give_mmdets_state_dict_keys(plugins):
    ours = small(plugins=MMDET_PLUGINS[plugins])
    theirs = ResNet(50, base_channels=16, plugins=MMDET_PLUGINS[plugins])
    assert list(ours.state_dict()) == list(theirs.state_dict())


@pytest.mark.parametrize('options', BACKBONE_OPTIONS)
@pytest.mark.parametrize('plugins', MMDET_PLUGINS)
def test_mmdet_plugins_give_mmdets_outputs(plugins, options):
    kwargs = dict(BACKBONE_OPTIONS[options], norm_eval=False, plugins=MMDET_PLUGINS[plugins])
    theirs = ResNet(50, base_channels=16, **kwargs)
    randomise(theirs)
    ours = small(**kwargs)
    ours.load_state_dict(theirs.state_dict())
    x = image()
    expected = theirs(x)
    outputs = ours(x)
    torch.testing.assert_close(outputs, expected, rtol=0, atol=0)


def _torchvision_resnet50() -> dict:
    state = torchvision.models.resnet50(weights=None).state_dict()
    return {k: v for k, v in state.items() if not k.startswith('fc.')}


STOCK_WEIGHTS = {
    'mmdet': lambda: ResNet(50).state_dict(),
    'mmpretrain': lambda: MMPretrainResNet(50).state_dict(),
    'torchvision': _torchvision_resnet50,
}


@pytest.fixture(scope='module')
def sge_resnet50() -> AttnResNet:
    return AttnResNet(50, plugins=[
        dict(cfg=dict(type='SpatialGroupEnhance', groups=64), position='after_conv3')])


@pytest.mark.parametrize('source', STOCK_WEIGHTS)
def test_stock_resnet50_weights_load_and_only_plugins_are_missing(sge_resnet50, source):
    missing, unexpected = sge_resnet50.load_state_dict(STOCK_WEIGHTS[source](), strict=False)
    assert unexpected == []
    assert missing and all('.sge.' in key for key in missing)
    assert len(missing) == 2 * 16  # weight and bias in each of the 16 blocks


# ---------------------------------------------------------------------------------------------
# Positions


def _capture(module: nn.Module, store: dict, key: str, what: str) -> None:
    """Keep a copy of ``module``'s output (or input) at call time, before any in-place op."""
    if what == 'output':
        module.register_forward_hook(lambda m, args, out: store.__setitem__(key, out.clone()))
    else:
        module.register_forward_pre_hook(lambda m, args: store.__setitem__(key, args[0].clone()))


# (depth, position) -> (layer whose output the plugin receives, ReLU in between,
#                       layer that receives the plugin's output; None: the residual add)
WIRING = {
    (50, 'after_conv1_pre_norm'): ('conv1', False, 'bn1'),
    (50, 'after_conv1'): ('bn1', True, 'conv2'),
    (50, 'after_conv2'): ('bn2', True, 'conv3'),
    (50, 'after_conv3'): ('bn3', False, None),
    (18, 'after_conv1_pre_norm'): ('conv1', False, 'bn1'),
    (18, 'after_conv1'): ('bn1', True, 'conv2'),
    (18, 'after_conv2'): ('bn2', False, None),
}
WIDTH = {(50, 'after_conv3'): 4 * 32}  # stage 2: planes 32, times 4 after a Bottleneck's conv3


@pytest.mark.parametrize('depth, position', WIRING, ids=[f'r{d}-{p}' for d, p in WIRING])
def test_position_sits_where_documented(depth, position):
    source, relu, sink = WIRING[depth, position]
    backbone = small(depth, plugins=[dict(
        cfg=dict(type='AttnResNetTestProbe'), position=position,
        stages=(False, True, False, False), blocks=(1, ))])
    block = backbone.layer2[1]  # stride 1, no downsample: the identity is the block's input
    seen = {}
    _capture(getattr(block, source), seen, 'source', 'output')
    _capture(block, seen, 'block_in', 'input')
    _capture(block, seen, 'block_out', 'output')
    if sink:
        _capture(getattr(block, sink), seen, 'sink', 'input')
    backbone.eval()
    backbone(image())

    expected = seen['source'].relu() if relu else seen['source']
    assert block.probe.in_channels == WIDTH.get((depth, position), 32)
    assert block.probe.received.shape[1] == block.probe.in_channels
    torch.testing.assert_close(block.probe.received, expected)
    if sink:
        torch.testing.assert_close(seen['sink'], block.probe.sent)
    else:
        torch.testing.assert_close(seen['block_out'], (block.probe.sent + seen['block_in']).relu())


BLOCK_CHOICES = {
    'last': (dict(blocks='last'), ['layer1.2', 'layer2.3', 'layer3.5', 'layer4.2']),
    'indices': (dict(blocks=(0, 2), stages=(True, True, False, False)),
                ['layer1.0', 'layer1.2', 'layer2.0', 'layer2.2']),
    'all': (dict(stages=(True, False, False, False)), ['layer1.0', 'layer1.1', 'layer1.2']),
}


@pytest.mark.parametrize('choice', BLOCK_CHOICES)
def test_blocks_key_chooses_the_blocks(choice):
    options, expected = BLOCK_CHOICES[choice]
    backbone = small(plugins=[dict(cfg=SGE, position='after_conv3', **options)])
    keys = [k for k in backbone.state_dict() if '.sge.' in k]
    assert keys == [f'{block}.sge.{p}' for block in expected for p in ('weight', 'bias')]


@pytest.mark.parametrize('depth, widths', [(50, (64, 128, 256)), (18, (16, 32, 64))])
def test_after_stage_modules_are_named_by_stage(depth, widths):
    backbone = small(depth, plugins=[
        dict(cfg=SGE, position='after_stage', stages=(True, True, True, False))])
    assert [name for name, _ in backbone.named_children() if name.startswith('sge')] == [
        'sge1', 'sge2', 'sge3']
    assert tuple(getattr(backbone, f'sge{i}').in_channels for i in (1, 2, 3)) == widths
    assert 'sge1.weight' in backbone.state_dict()


def test_after_stage_runs_on_the_stage_output():
    backbone = small(plugins=[dict(cfg=dict(type='AttnResNetTestProbe'), position='after_stage',
                                   stages=(False, True, False, False))])
    seen = {}
    _capture(backbone.layer2, seen, 'stage', 'output')
    _capture(backbone.layer3, seen, 'next', 'input')
    backbone.eval()
    outs = backbone(image())
    torch.testing.assert_close(backbone.probe2.received, seen['stage'])
    torch.testing.assert_close(outs[1], backbone.probe2.sent)
    torch.testing.assert_close(seen['next'], backbone.probe2.sent)


@pytest.mark.parametrize('position', ['after_conv1_pre_norm', 'after_conv1', 'after_conv2',
                                      'after_stage'])
def test_basic_block_takes_sge_and_trains(position):
    backbone = small(18, zero_init_residual=False, plugins=[dict(cfg=SGE, position=position)])
    backbone.init_weights()
    outs = backbone(image())
    assert [o.shape[1] for o in outs] == [16, 32, 64, 128]
    sum(o.square().mean() for o in outs).backward()
    grads = [p.grad for name, p in backbone.named_parameters() if 'sge' in name]
    assert len(grads) == 2 * (4 if position == 'after_stage' else 8)
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


# ---------------------------------------------------------------------------------------------
# Errors


def _build(depth, plugins, base_channels=16):
    AttnResNet(depth, base_channels=base_channels, plugins=plugins)


def _check_only(depth, plugins, base_channels=16):
    AttnResNet.check_plugins(plugins, depth, base_channels=base_channels)


ERRORS = {
    'groups-stage1': (
        50, [dict(cfg=dict(type='SpatialGroupEnhance', groups=64), position='after_conv3')], 24,
        ValueError, ['SpatialGroupEnhance: in_channels=96 is not divisible by groups=64',
                     'stage 1, block 0 (layer1.0)', "'after_conv3'"]),
    'groups-stage2-block2': (
        50, [dict(cfg=dict(type='SpatialGroupEnhance', groups=64), position='after_conv1',
                  stages=(False, True, True, True), blocks=(2, ))], 16,
        ValueError, ['in_channels=32 is not divisible', 'stage 2, block 2 (layer2.2)',
                     "'after_conv1'"]),
    'groups-after-stage': (
        18, [dict(cfg=dict(type='SpatialGroupEnhance', groups=64), position='after_stage')], 16,
        ValueError, ['in_channels=16 is not divisible', 'stage 1 output', "'after_stage'"]),
    'constructor-type-error': (
        50, [dict(cfg=dict(SGE, ratio=4), position='after_conv3')], 16,
        TypeError, ['ratio', 'stage 1, block 0', 'in_channels=64']),
    'unknown-position': (
        50, [dict(cfg=SGE, position='after_conv4')], 16,
        ValueError, ["'after_conv4'", "'after_conv1_pre_norm'", "'after_conv3'", "'after_stage'"]),
    'after-conv3-in-basic-block': (
        18, [dict(cfg=SGE, position='after_conv3')], 16,
        ValueError, ['BasicBlock', "position='after_conv2'"]),
    'block-index-out-of-range': (
        50, [dict(cfg=SGE, position='after_conv3', blocks=(1, 3))], 16,
        ValueError, ['stage 1', 'has 3 blocks', 'indices 0 to 2']),
    'negative-block-index': (
        50, [dict(cfg=SGE, position='after_conv3', blocks=(-1, ))], 16,
        ValueError, ["'last'"]),
    'unknown-type': (
        50, [dict(cfg=dict(type='NoSuchBlock'), position='after_conv3')], 16,
        ValueError, ['NoSuchBlock', 'SpatialGroupEnhance', 'custom_imports']),
    'blocks-with-after-stage': (
        50, [dict(cfg=SGE, position='after_stage', blocks='last')], 16,
        ValueError, ['blocks does not apply', "'after_stage'"]),
    'stages-length': (
        50, [dict(cfg=SGE, position='after_conv3', stages=(True, False))], 16,
        ValueError, ['num_stages=4', 'one bool per stage']),
    'unknown-key': (
        50, [dict(cfg=SGE, position='after_conv3', stage=(True, ) * 4)], 16,
        ValueError, ["unknown keys ['stage']"]),
    'duplicate-name': (
        50, [dict(cfg=SGE, position='after_conv3'), dict(cfg=SGE, position='after_conv2')], 16,
        ValueError, ["'sge' is already taken", 'postfix']),
}


@pytest.mark.parametrize('check', [_build, _check_only], ids=['build', 'check_plugins'])
@pytest.mark.parametrize('case', ERRORS)
def test_impossible_plugins_raise_naming_the_fix(case, check):
    depth, plugins, base_channels, error, fragments = ERRORS[case]
    with pytest.raises(error) as info:
        check(depth, plugins, base_channels)
    for fragment in fragments:
        assert fragment in str(info.value)


# ---------------------------------------------------------------------------------------------
# Init, freezing, norm_eval, checkpointing


def test_plugin_init_survives_backbone_init():
    backbone = small(plugins=[dict(cfg=SGE, position='after_conv3'),
                              dict(cfg=SGE, position='after_stage')])
    randomise(backbone)
    backbone.init_weights()
    gates = {name: p for name, p in backbone.named_parameters() if 'sge' in name}
    assert len(gates) == 2 * (16 + 4)
    for name, param in gates.items():
        assert torch.all(param == (0 if name.endswith('weight') else 1)), name


FROZEN_PLUGINS = [
    dict(cfg=SGE, position='after_conv3'),
    dict(cfg=dict(type='AttnResNetTestNorm'), position='after_conv1_pre_norm'),
    dict(cfg=SGE, position='after_stage'),
]


def test_frozen_stages_freeze_their_plugins():
    backbone = small(frozen_stages=1, plugins=FROZEN_PLUGINS).train()
    for name, param in backbone.named_parameters():
        if 'sge' not in name and 'norm_plugin' not in name:
            continue
        frozen = name.startswith(('layer1.', 'sge1.'))
        assert param.requires_grad is not frozen, name


def test_frozen_stage_plugins_stay_in_eval_mode():
    backbone = small(frozen_stages=1, norm_eval=False, plugins=FROZEN_PLUGINS).train()
    assert not backbone.sge1.training and not backbone.layer1[0].norm_plugin.bn.training
    assert backbone.sge2.training and backbone.layer2[0].norm_plugin.bn.training


@pytest.mark.parametrize('norm_eval', [True, False])
def test_norm_eval_reaches_plugin_norms(norm_eval):
    backbone = small(norm_eval=norm_eval, plugins=[
        dict(cfg=dict(type='AttnResNetTestNorm'), position='after_conv2'),
        dict(cfg=dict(type='AttnResNetTestNorm'), position='after_stage')]).train()
    plugin_bns = [m for n, m in backbone.named_modules() if 'norm_plugin' in n and
                  isinstance(m, nn.BatchNorm2d)]
    assert len(plugin_bns) == 16 + 4
    assert all(bn.training is not norm_eval for bn in plugin_bns)


@pytest.mark.parametrize('depth', [18, 50])
def test_with_cp_gives_the_same_outputs_and_gradients(depth):
    plugins = [dict(cfg=SGE, position='after_conv1_pre_norm'),
               dict(cfg=dict(SGE, postfix=2), position='after_conv2')]
    plain = small(depth, plugins=plugins, zero_init_residual=False)
    plain.init_weights()
    checkpointed = small(depth, plugins=plugins, with_cp=True)
    checkpointed.load_state_dict(plain.state_dict())
    results = []
    inputs = image()
    for backbone in (plain, checkpointed):
        x = inputs.clone().requires_grad_()
        outs = backbone(x)
        sum(o.sum() for o in outs).backward()
        results.append((outs, x.grad))
    torch.testing.assert_close(results[0], results[1])


def test_context_block_keeps_its_zero_init_under_the_backbones_init():
    # mmcv's ContextBlock is a plain nn.Module: mmengine would leave it with the backbone's
    # Kaiming init; GCNet zero-initialises the last conv so each block starts as the identity.
    backbone = AttnResNet(50, base_channels=16, plugins=[
        dict(cfg=dict(type='ContextBlock', ratio=1 / 4), position='after_conv3')])
    backbone.init_weights()
    last_conv = backbone.layer2[0].context_block.channel_add_conv[-1]
    assert torch.count_nonzero(last_conv.weight) == 0
    assert torch.count_nonzero(last_conv.bias) == 0


def test_restoring_plugin_init_leaves_the_resnet_init_alone():
    plain = AttnResNet(50, base_channels=16)
    with_gc = AttnResNet(50, base_channels=16, plugins=[
        dict(cfg=dict(type='ContextBlock', ratio=1 / 4), position='after_conv3')])
    for backbone in (plain, with_gc):
        torch.manual_seed(0)
        backbone.init_weights()
    # Kaiming (fan_out) draws have std 0.059 for this conv; PyTorch's default init 0.024.
    conv = 'layer3.1.conv2.weight'
    torch.testing.assert_close(with_gc.state_dict()[conv].std(), plain.state_dict()[conv].std(),
                               rtol=0.1, atol=0)
