"""AttnResNet from configs: the repository's detection config, and the preflight check."""
import pathlib

import pytest
import torch
from mmdet.registry import MODELS as MMDET_MODELS
from mmengine.config import Config, ConfigDict
from mmengine.registry import DefaultScope

from mmattn.backbones import AttnResNet
from mmattn.preflight import ConfigError, check_backbone_plugins

CONFIGS = pathlib.Path(__file__).resolve().parents[2] / 'configs'
SGE = dict(type='SpatialGroupEnhance', groups=64)


def test_retinanet_sge_config_runs_on_attn_resnet():
    cfg = Config.fromfile(str(CONFIGS / 'retinanet_r50_sge.py'))
    backbone = MMDET_MODELS.build(dict(cfg.model.backbone, type='AttnResNet', init_cfg=None))
    assert isinstance(backbone, AttnResNet)
    assert sum('.sge.' in key for key in backbone.state_dict()) == 2 * 16
    backbone.train()  # frozen_stages=1 and norm_eval, as the detector trains it
    assert not any(p.requires_grad for p in backbone.layer1.parameters())
    outs = backbone(torch.randn(1, 3, 33, 47))
    assert [tuple(o.shape[1:]) for o in outs] == [
        (256, 9, 12), (512, 5, 6), (1024, 3, 3), (2048, 2, 2)]


def backbone_cfg(**kwargs) -> ConfigDict:
    return ConfigDict(dict(type='AttnResNet', depth=18, **kwargs))


@pytest.mark.parametrize('scope', ['mmdet', 'mmpretrain'])
def test_preflight_accepts_attn_resnet_placements(scope):
    backbone = backbone_cfg(plugins=[
        dict(cfg=dict(SGE, groups=16, postfix='_pre'), position='after_conv1_pre_norm'),
        dict(cfg=SGE, position='after_conv2', blocks='last'),
        dict(cfg=SGE, position='after_stage', stages=(True, True, True, False)),
    ])
    with DefaultScope.overwrite_default_scope(scope):
        check_backbone_plugins(backbone)


@pytest.mark.parametrize('plugins, fragments', [
    ([dict(cfg=SGE, position='after_conv3')], ['model.backbone', 'BasicBlock', "'after_conv2'"]),
    ([dict(cfg=dict(SGE, groups=48), position='after_stage')],
     ['model.backbone', 'in_channels=64 is not divisible by groups=48', 'stage 1 output']),
])
def test_preflight_reports_attn_resnets_own_errors(plugins, fragments):
    with DefaultScope.overwrite_default_scope('mmdet'), pytest.raises(ConfigError) as info:
        check_backbone_plugins(backbone_cfg(plugins=plugins))
    for fragment in fragments:
        assert fragment in str(info.value)


def test_preflight_keeps_stock_resnet_to_mmdets_positions():
    backbone = ConfigDict(type='ResNet', depth=50, plugins=[dict(cfg=SGE, position='after_stage')])
    with DefaultScope.overwrite_default_scope('mmdet'):
        with pytest.raises(ConfigError, match='after_stage'):
            check_backbone_plugins(backbone)
