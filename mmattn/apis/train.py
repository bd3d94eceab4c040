"""Training entry point shared by tools/train.py and the demo."""
from __future__ import annotations

import os.path as osp

from mmengine.config import Config
from mmengine.logging import print_log
from mmengine.registry import RUNNERS
from mmengine.runner import Runner

from mmattn.engine import (
    close_distributed,
    configure_distributed,
    distributed_fault_guard,
    find_resumable_checkpoint,
    init_distributed,
    protect_training,
    verify_checkpoint,
)
from mmattn.preflight import ConfigError, check_checkpoint_architecture, check_config

from .config import load_config


def build_train_runner(cfg: Config, *, config_path: str, work_dir: str | None = None,
                       amp: bool = False, auto_scale_lr: bool = False,
                       resume: str | None = None, launcher: str = 'none') -> Runner:
    """Apply mmdet's train.py options to ``cfg``, check it, and build the Runner.

    Every config gets mmattn's reliability pieces (:func:`mmattn.engine.protect_training`):
    atomic checkpoints that resume exactly, a stop at the first NaN/Inf loss, gloo and a
    collective timeout for distributed runs without a GPU. ``resume='auto'`` continues from the
    newest sound checkpoint, skipping (and reporting) torn or corrupt ones. Checkpoints of another
    architecture are refused once the model is built, before anything trains.

    Args:
        cfg: A loaded config (see :func:`mmattn.apis.load_config`).
        config_path: The file ``cfg`` came from; names the default work dir.
        work_dir: Where logs and checkpoints go. Defaults to the config's ``work_dir``, else
            ``./work_dirs/<config name>``.
        amp: Train with automatic mixed precision.
        auto_scale_lr: Scale the learning rate by the real batch size over
            ``auto_scale_lr.base_batch_size``.
        resume: ``'auto'`` resumes from the newest sound checkpoint in ``work_dir`` (when there
            is none, training starts as without ``resume``: from the config's ``load_from`` or
            from scratch); a path resumes from that checkpoint, which must be sound; None starts
            afresh.
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
    protect_training(cfg)
    configure_distributed(cfg)
    if resume == 'auto':
        # mmengine would take whatever last_checkpoint names, torn or not. With nothing to
        # resume, the config's load_from still applies, so a job script can always pass --resume.
        found = find_resumable_checkpoint(cfg.work_dir)
        cfg.resume = found is not None
        if found is not None:
            cfg.load_from = found
        else:
            start = f"load_from='{cfg.load_from}'" if cfg.get('load_from') else 'the beginning'
            print_log(f'Nothing to resume in {cfg.work_dir}: training starts from {start}.',
                      logger='current')
    elif resume is not None:
        verify_checkpoint(resume)
        cfg.resume = True
        cfg.load_from = resume
    check_config(cfg, 'train')
    init_distributed(cfg)
    runner = RUNNERS.build(cfg) if 'runner_type' in cfg else Runner.from_cfg(cfg)
    check_checkpoint_architecture(runner.model, cfg)
    return runner


def train(config: str, *, cfg_options: dict | None = None, **options) -> Runner:
    """Train ``config`` as tools/train.py does (``options``: see :func:`build_train_runner`).

    A distributed run ends by closing its process group (:func:`close_distributed`).
    """
    cfg = load_config(config, cfg_options)
    runner = build_train_runner(cfg, config_path=config, **options)
    with distributed_fault_guard(runner.work_dir):
        runner.train()
        close_distributed()
    return runner
