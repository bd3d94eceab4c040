"""Importing mmattn registers every block where mmdet, mmpretrain and plain mmengine find it."""
import pytest
from mmdet.registry import MODELS as MMDET_MODELS
from mmengine.registry import MODELS as ROOT_MODELS
from mmpretrain.registry import MODELS as MMPRETRAIN_MODELS

from mmattn import blocks


@pytest.mark.parametrize('name', blocks.__all__)
@pytest.mark.parametrize('registry', [ROOT_MODELS, MMDET_MODELS, MMPRETRAIN_MODELS],
                         ids=['root', 'mmdet', 'mmpretrain'])
def test_block_resolves_in_every_scope(registry, name):
    assert registry.get(name) is getattr(blocks, name)


@pytest.mark.parametrize('name', blocks.__all__)
def test_block_builds_from_a_plugin_config(name):
    from mmcv.cnn import build_plugin_layer
    layer_name, layer = build_plugin_layer(dict(type=name), postfix='', in_channels=128)
    assert layer_name == getattr(blocks, name)._abbr_
    assert layer.in_channels == 128
