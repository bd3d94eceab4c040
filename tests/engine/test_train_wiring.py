"""What mmattn's training changes in any config, before anything is built."""
import pytest
import torch
from conftest import TINY_CONFIG
from mmengine.config import Config
from mmengine.registry import MODELS, DefaultScope

from mmattn.apis import build_train_runner, load_config
from mmattn.engine import configure_distributed, init_distributed, protect_training
from mmattn.preflight import ConfigError


def test_mmengine_loop_and_checkpoint_hook_become_the_resumable_ones():
    cfg = load_config(TINY_CONFIG)
    protect_training(cfg)
    assert cfg.train_cfg.type == 'ResumableEpochBasedTrainLoop'
    assert cfg.default_hooks.checkpoint.type == 'ResumableCheckpointHook'
    assert [hook.type for hook in cfg.custom_hooks] == ['NonFiniteLossHook']


@pytest.mark.parametrize('train_cfg, loop', [
    (dict(by_epoch=True, max_epochs=2), 'ResumableEpochBasedTrainLoop'),
    (dict(by_epoch=False, max_iters=2), 'ResumableIterBasedTrainLoop'),
    (dict(type='IterBasedTrainLoop', max_iters=2), 'ResumableIterBasedTrainLoop'),
    (dict(type='MyLoop'), 'MyLoop'),
])
def test_loops_given_as_by_epoch_or_type(train_cfg, loop):
    cfg = Config(dict(train_cfg=train_cfg))
    protect_training(cfg)
    assert cfg.train_cfg.type == loop
    assert 'by_epoch' not in cfg.train_cfg
    assert cfg.default_hooks.checkpoint.type == 'ResumableCheckpointHook'  # mmengine's default


def test_without_a_gpu_distributed_runs_use_gloo_and_a_timeout(monkeypatch):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    cfg = load_config(TINY_CONFIG)
    cfg.launcher = 'pytorch'
    configure_distributed(cfg)
    assert cfg.env_cfg.dist_cfg == dict(backend='gloo', timeout=1800)
    assert cfg.model_wrapper_cfg.device_ids is None  # DDP refuses device ids for CPU modules


def test_a_launcher_without_its_environment_is_a_config_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    for name in ('RANK', 'WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT'):
        monkeypatch.delenv(name, raising=False)
    cfg = load_config(TINY_CONFIG)
    cfg.launcher = 'pytorch'
    configure_distributed(cfg)
    with pytest.raises(ConfigError, match='lacks RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT'):
        init_distributed(cfg)


def test_resume_with_nothing_to_resume_starts_from_load_from(tiny_data, tmp_path):
    cfg = load_config(TINY_CONFIG, {'data_root': f'{tiny_data}/'})
    weights = tmp_path / 'coco_detector.pth'
    with DefaultScope.overwrite_default_scope('mmdet'):
        torch.save({'state_dict': MODELS.build(cfg.model).state_dict()}, weights)
    cfg.load_from = str(weights)
    build_train_runner(cfg, config_path=TINY_CONFIG, work_dir=str(tmp_path / 'b'),
                       resume='auto')
    assert cfg.load_from == str(weights)
    assert not cfg.resume
