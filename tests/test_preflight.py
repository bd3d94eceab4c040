"""Config mistakes fail before anything is built, with messages that name the key and the fix."""
import pytest
import torch.hub
from mmengine.config import Config

from mmattn.apis import load_config
from mmattn.preflight import ConfigError, check_config


@pytest.fixture
def sge_config(configs) -> str:
    return str(configs / 'retinanet_r50_sge.py')


def with_plugin(config: str, **plugin) -> Config:
    cfg = load_config(config)
    cfg.model.backbone.plugins = [plugin]
    return cfg


def test_unknown_block_type_names_it_and_the_known_blocks(sge_config):
    cfg = with_plugin(sge_config, cfg=dict(type='SpatialGroupEnhanse'), position='after_conv3')
    with pytest.raises(ConfigError, match=r"cfg.type='SpatialGroupEnhanse' is not a registered"
                                          r".*SpatialGroupEnhance.*custom_imports"):
        check_config(cfg, 'train')


def test_groups_that_do_not_divide_name_the_stage(sge_config):
    cfg = with_plugin(sge_config, cfg=dict(type='SpatialGroupEnhance', groups=48),
                      position='after_conv3')
    with pytest.raises(ConfigError, match=r'in_channels=256 is not divisible by groups=48.*'
                                          r'ResNet-50 plugins\[0\].*stage 1'):
        check_config(cfg, 'train')


def test_two_plugins_with_one_name_are_refused_before_mmdet_asserts(sge_config):
    cfg = with_plugin(sge_config, cfg=dict(type='SpatialGroupEnhance'), position='after_conv3')
    cfg.model.backbone.plugins.append(cfg.model.backbone.plugins[0])
    with pytest.raises(ConfigError, match=r"module name 'sge' is already taken.*postfix"):
        check_config(cfg, 'train')


def test_unknown_position_lists_the_valid_ones(sge_config):
    cfg = with_plugin(sge_config, cfg=dict(type='SpatialGroupEnhance'), position='after_conv4')
    cfg.model.backbone.type = 'ResNet'  # mmdet's own ResNet: its three positions
    with pytest.raises(ConfigError, match=r"position='after_conv4'.*after_conv1, after_conv2, "
                                          r'after_conv3'):
        check_config(cfg, 'train')


def test_missing_coco_says_where_and_how_to_point_elsewhere(sge_config, tmp_path,
                                                            monkeypatch):
    monkeypatch.chdir(tmp_path)  # no data/coco/ here
    cfg = load_config(sge_config)
    with pytest.raises(FileNotFoundError, match=r"data/coco/annotations/instances_train2017.json"
                                                r".*--cfg-options data_root="):
        check_config(cfg, 'train')


def test_data_root_option_moves_dataloaders_and_evaluators(sge_config):
    cfg = load_config(sge_config, {'data_root': '/elsewhere/coco/'})
    for split in ('train', 'val', 'test'):
        assert cfg[f'{split}_dataloader'].dataset.data_root == '/elsewhere/coco/'
    assert cfg.val_evaluator.ann_file == '/elsewhere/coco/annotations/instances_val2017.json'
    assert cfg.test_evaluator.ann_file == '/elsewhere/coco/annotations/instances_val2017.json'


def test_evaluator_follows_a_dataloader_moved_alone(sge_config):
    cfg = load_config(sge_config, {'val_dataloader.dataset.data_root': '/val/'})
    assert cfg.val_evaluator.ann_file == '/val/annotations/instances_val2017.json'
    assert cfg.train_dataloader.dataset.data_root == 'data/coco/'


def test_unreachable_pretrained_weights_fail_with_the_ways_out(sge_config, tmp_path,
                                                              monkeypatch):
    monkeypatch.setattr(torch.hub, 'get_dir', lambda: str(tmp_path))

    def offline(*args, **kwargs):
        raise OSError('network unreachable')

    monkeypatch.setattr(torch.hub, 'download_url_to_file', offline)
    from mmattn.preflight import check_pretrained
    backbone = load_config(sge_config).model.backbone
    with pytest.raises(RuntimeError, match=r"torchvision://resnet50.*network unreachable.*"
                                           r"model.backbone.init_cfg.checkpoint=.*init_cfg=None"):
        check_pretrained(backbone)


def test_missing_local_pretrained_file_is_named(sge_config, tmp_path):
    from mmattn.preflight import check_pretrained
    backbone = load_config(sge_config).model.backbone
    backbone.init_cfg.checkpoint = str(tmp_path / 'nope.pth')
    with pytest.raises(FileNotFoundError, match='nope.pth'):
        check_pretrained(backbone)
