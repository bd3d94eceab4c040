"""Training entry point shared by tools/train.py and the demo."""
from __future__ import annotations

import os.path as osp

from mmengine.config import Config
from mmengine.registry import RUNNERS
from mmengine.runner import Runner

from mmattn.preflight import ConfigError, check_config

from .config import load_config


def build_train_runner(cfg: Config, *, config_path: str, work_dir: str | None = None,
                       amp: bool = False, auto_scale_lr: bool = False,
                       resume: str | None = None, launcher: str = 'none') -> Runner:
    """Apply mmdet's train.py options to ``cfg``, check it, and build the Runner.

    Args:
        cfg: A loaded config (see :func:`mmattn.apis.load_config`).
        config_path: The file ``cfg`` came from; names the default work dir.
        work_dir: Where logs and checkpoints go. Defaults to the config's ``work_dir``, else
            ``./work_dirs/<config name>``.
        amp: Train with automatic mixed precision.
        auto_scale_lr: Scale the learning rate by the real batch size over
            ``auto_scale_lr.base_batch_size``.
        resume: ``'auto'`` resumes from the latest checkpoint in ``work_dir``; a path resumes
            from that checkpoint; None starts afresh.
        launcher: ``'none'``, ``'pytorch'``, ``'slurm'`` or ``'mpi'``.
    """
    cfg.launcher = launcher
    if work_dir is not None:
        cfg.work_dir = work_dir
    elif cfg.get('work_dir') is None:
        cfg.work_dir = osp.join('./work_dirs', osp.splitext(osp.basename(config_path))[0])
    if amp:
        cfg.optim_wrapper.type = 'AmpOptimWrapper'
        cfg.optim_wrapper.loss_scale = 'dynamic'
    if auto_scale_lr:
        if 'auto_scale_lr' not in cfg or 'base_batch_size' not in cfg.auto_scale_lr:
            raise ConfigError(
                '--auto-scale-lr needs auto_scale_lr = dict(enable=False, base_batch_size=16) '
                'in the config (the batch size its learning rate was set for).')
        cfg.auto_scale_lr.enable = True
    if resume == 'auto':
        cfg.resume = True
        cfg.load_from = None
    elif resume is not None:
        cfg.resume = True
        cfg.load_from = resume
    check_config(cfg, 'train')
    if 'runner_type' in cfg:
        return RUNNERS.build(cfg)
    return Runner.from_cfg(cfg)


def train(config: str, *, cfg_options: dict | None = None, **options) -> Runner:
    """Train ``config`` as tools/train.py does (``options``: see :func:`build_train_runner`)."""
    cfg = load_config(config, cfg_options)
    runner = build_train_runner(cfg, config_path=config, **options)
    runner.train()
    return runner
