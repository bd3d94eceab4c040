"""The foundation blocks as plugins of mmdet's stock ResNet, counted against the papers."""
import pytest
import torch
from mmdet.models.backbones import ResNet

PLUGIN = {
    'none': None,
    'sge': [dict(cfg=dict(type='SpatialGroupEnhance', groups=64), position='after_conv3')],
    'se': [dict(cfg=dict(type='SqueezeExcitation', rd_ratio=1 / 16), position='after_conv3')],
}


def millions(module: torch.nn.Module) -> float:
    return round(sum(p.numel() for p in module.parameters()) / 1e6, 2)


@pytest.mark.parametrize('block, expected', [('none', 23.51), ('sge', 23.51), ('se', 26.04)])
def test_r50_detection_backbone_params_match_sge_paper(block, expected):
    assert millions(ResNet(50, plugins=PLUGIN[block])) == expected


@pytest.mark.parametrize('block, key, shape', [
    ('sge', 'layer1.0.sge.weight', (1, 64, 1, 1)),
    ('se', 'layer4.2.se.fc.0.weight', (128, 2048)),
])
def test_state_dict_keys_follow_the_authors(block, key, shape):
    state = ResNet(50, plugins=PLUGIN[block]).state_dict()
    assert tuple(state[key].shape) == shape


@pytest.mark.parametrize('block', ['sge', 'se'])
def test_backbone_runs_and_every_block_parameter_learns(block):
    # zero_init_residual would make every block input 0, so no gate could learn from it.
    backbone = ResNet(50, base_channels=16, zero_init_residual=False, plugins=[
        dict(p, cfg=dict(p['cfg'], **({'groups': 16} if block == 'sge' else {})))
        for p in PLUGIN[block]])
    backbone.init_weights()
    outs = backbone(torch.randn(2, 3, 45, 53))
    assert [o.shape[1] for o in outs] == [64, 128, 256, 512]
    sum(o.square().mean() for o in outs).backward()
    for name, param in backbone.named_parameters():
        if f'.{block}.' in name:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
