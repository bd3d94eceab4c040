"""Evaluation entry point shared by tools/test.py and the demo."""
from __future__ import annotations

import os.path as osp

from mmengine.config import ConfigDict
from mmengine.registry import RUNNERS
from mmengine.runner import Runner

from mmattn.engine import (
    close_distributed,
    configure_distributed,
    distributed_fault_guard,
    init_distributed,
)
from mmattn.preflight import (
    ConfigError,
    DataNotFoundError,
    check_checkpoint_architecture,
    check_config,
)

from .config import load_config


def test(config: str, checkpoint: str, *, work_dir: str | None = None, out: str | None = None,
         show_dir: str | None = None, tta: bool = False, cfg_options: dict | None = None,
         launcher: str = 'none') -> dict:
    """Evaluate ``checkpoint`` on the config's test set; returns the metrics dict.

    Once the model is built, the checkpoint is read completely with weights_only and compared
    with it: a torn file, one carrying pickled code or one of another architecture is refused
    with a message instead of evaluated.

    Args:
        config: Config file.
        checkpoint: Checkpoint file to evaluate.
        work_dir: Where the evaluation logs go. Defaults to ``./work_dirs/<config name>``.
        out: Also dump the raw detections to this ``.pkl`` file.
        show_dir: Save drawn predictions under ``<work_dir>/<timestamp>/<show_dir>``.
        tta: Evaluate with the config's test-time augmentation (``tta_model``, ``tta_pipeline``).
        cfg_options: Overrides merged into the config.
        launcher: ``'none'``, ``'pytorch'``, ``'slurm'`` or ``'mpi'``.
    """
    if out is not None and not out.endswith(('.pkl', '.pickle')):
        raise ConfigError(f"--out {out!r}: the dump is a pickle; give a file ending in '.pkl'.")
    if not osp.isfile(checkpoint):
        raise DataNotFoundError(f"checkpoint '{checkpoint}' does not exist.")
    cfg = load_config(config, cfg_options)
    cfg.launcher = launcher
    if work_dir is not None:
        cfg.work_dir = work_dir
    elif cfg.get('work_dir') is None:
        cfg.work_dir = osp.join('./work_dirs', osp.splitext(osp.basename(config))[0])
    cfg.load_from = checkpoint
    if show_dir is not None:
        from mmdet.engine.hooks.utils import trigger_visualization_hook
        trigger_visualization_hook(cfg, ConfigDict(show=False, show_dir=show_dir))
    if tta:
        _use_tta(cfg, config)
    configure_distributed(cfg)
    check_config(cfg, 'test')
    init_distributed(cfg)
    runner = RUNNERS.build(cfg) if 'runner_type' in cfg else Runner.from_cfg(cfg)
    check_checkpoint_architecture(runner.model, cfg)
    if out is not None:
        from mmdet.evaluation import DumpDetResults
        runner.test_evaluator.metrics.append(DumpDetResults(out_file_path=out))
    with distributed_fault_guard(runner.work_dir):
        metrics = runner.test()
        close_distributed()
    return metrics


def _use_tta(cfg, config: str) -> None:
    if 'tta_model' not in cfg or 'tta_pipeline' not in cfg:
        raise ConfigError(
            f'--tta: {config} defines no tta_model / tta_pipeline; add them (see mmdet\'s '
            'configs/_base_/default_runtime.py and the RetinaNet configs) or drop --tta.')
    cfg.tta_model.module = cfg.model
    cfg.model = cfg.tta_model
    cfg.test_dataloader.dataset.pipeline = cfg.tta_pipeline
