"""A checkpoint of another architecture is refused before training, naming the key and the fix."""
import pytest
import torch
from conftest import TINY_CONFIG
from mmengine.registry import MODELS, DefaultScope

from mmattn.apis import build_train_runner, load_config
from mmattn.preflight import CheckpointMismatchError, check_checkpoint_architecture


def tiny_cfg(**backbone):
    cfg = load_config(TINY_CONFIG)
    cfg.model.backbone.update(backbone)
    return cfg


def build(cfg):
    with DefaultScope.overwrite_default_scope('mmdet'):
        return MODELS.build(cfg.model)


@pytest.fixture(scope='module')
def model():
    return build(tiny_cfg())


def save(tmp_path, name: str, state: dict) -> str:
    path = tmp_path / name
    torch.save(state, path)
    return str(path)


def detector_checkpoint(tmp_path, **backbone) -> str:
    return save(tmp_path, 'detector.pth', {'state_dict': build(tiny_cfg(**backbone)).state_dict()})


def test_load_from_of_the_same_model_passes(model, tmp_path):
    cfg = tiny_cfg()
    cfg.load_from = save(tmp_path, 'same.pth', {'state_dict': model.state_dict(), 'meta': {}})
    check_checkpoint_architecture(model, cfg)


def test_load_from_with_another_number_of_classes_passes(model, tmp_path):
    other = tiny_cfg()
    other.model.bbox_head.num_classes = 80  # fine-tuning a COCO detector: only the head differs
    cfg = tiny_cfg()
    cfg.load_from = save(tmp_path, 'coco.pth', {'state_dict': build(other).state_dict()})
    check_checkpoint_architecture(model, cfg)


@pytest.mark.parametrize('backbone, reason', [
    (dict(depth=101), r'has no place in the model \(e\.g\. backbone\.layer3\.'),
    (dict(base_channels=32), r'backbone tensors of another shape: backbone\.'),
    (dict(depth=18), r'backbone tensors of another shape: backbone\.layer1\.0\.conv1\.weight'),
])
def test_load_from_of_another_backbone_is_refused(model, tmp_path, backbone, reason):
    cfg = tiny_cfg()
    cfg.load_from = detector_checkpoint(tmp_path, **backbone)
    with pytest.raises(CheckpointMismatchError, match=reason) as refused:
        check_checkpoint_architecture(model, cfg)
    assert str(refused.value).startswith(f"load_from='{cfg.load_from}' is a checkpoint of "
                                         'another architecture')
    assert 'Use a checkpoint of this model' in str(refused.value)


def test_plugin_groups_that_differ_are_refused(tmp_path):
    sge = [dict(cfg=dict(type='SpatialGroupEnhance', groups=16), position='after_conv3')]
    model = build(tiny_cfg(plugins=sge))
    cfg = tiny_cfg(plugins=sge)
    sge_8 = [dict(cfg=dict(type='SpatialGroupEnhance', groups=8), position='after_conv3')]
    cfg.load_from = detector_checkpoint(tmp_path, plugins=sge_8)
    with pytest.raises(CheckpointMismatchError, match=r'backbone\.layer1\.0\.sge\.weight '
                       r'\(1, 8, 1, 1\) in the checkpoint, \(1, 16, 1, 1\) in the model'):
        check_checkpoint_architecture(model, cfg)


def pretrained_cfg(checkpoint: str, prefix: str | None = None):
    cfg = tiny_cfg(init_cfg=dict(type='Pretrained', checkpoint=checkpoint, prefix=prefix))
    return cfg


def test_pretrained_backbone_weights_pass(model, tmp_path):
    path = save(tmp_path, 'r50.pth', model.backbone.state_dict())
    check_checkpoint_architecture(model, pretrained_cfg(path))


def test_pretrained_classifier_checkpoint_needs_its_prefix(model, tmp_path):
    classifier = {f'backbone.{key}': value for key, value in model.backbone.state_dict().items()}
    classifier['head.fc.weight'] = torch.zeros(10, 512)
    path = save(tmp_path, 'classifier.pth', {'state_dict': classifier})
    with pytest.raises(CheckpointMismatchError, match=r"add prefix='backbone\.' to "
                       r'model\.backbone\.init_cfg'):
        check_checkpoint_architecture(model, pretrained_cfg(path))
    check_checkpoint_architecture(model, pretrained_cfg(path, prefix='backbone.'))


def test_pretrained_weights_of_another_depth_are_refused(model, tmp_path):
    path = save(tmp_path, 'r101.pth', build(tiny_cfg(depth=101)).backbone.state_dict())
    with pytest.raises(CheckpointMismatchError, match=r"model\.backbone\.init_cfg\.checkpoint="
                       r"'.*r101\.pth' is a checkpoint of another architecture.*depth"):
        check_checkpoint_architecture(model, pretrained_cfg(path))


def test_training_refuses_it_before_the_first_iteration(tiny_data, tmp_path):
    cfg = load_config(TINY_CONFIG, {'data_root': f'{tiny_data}/'})
    cfg.load_from = detector_checkpoint(tmp_path, depth=101)
    with pytest.raises(CheckpointMismatchError):
        build_train_runner(cfg, config_path=TINY_CONFIG, work_dir=str(tmp_path / 'work'))


def test_a_prefix_that_matches_nothing_is_named(model, tmp_path):
    path = save(tmp_path, 'r50.pth', model.backbone.state_dict())
    with pytest.raises(CheckpointMismatchError, match=r"init_cfg\.prefix='backbone\.': no tensor"):
        check_checkpoint_architecture(model, pretrained_cfg(path, prefix='backbone'))
