"""The main job (`make demo`): a baseline and an SGE RetinaNet trained and compared on synthetic
data.

Everything runs from the embedded data that :func:`mmattn.datasets.make_synthetic_coco` writes, so
no download is needed. The table holds exactly what this run measured.
"""
from __future__ import annotations

import os.path as osp
import time

from mmengine.hooks import Hook
from mmengine.registry import init_default_scope

from mmattn.analysis import backbone_complexity
from mmattn.datasets import make_synthetic_coco
from mmattn.evaluation import COCO_BBOX_COLUMNS, coco_bbox_ap, markdown_table

from .config import load_config
from .train import build_train_runner

# (row name, config file under the config folder)
DEMO_RUNS = (
    ('ResNet-50 (w/4)', 'retinanet_r50_synthetic.py'),
    ('SGE-ResNet-50 (w/4)', 'retinanet_r50_sge_synthetic.py'),
)


class _LastMetrics(Hook):
    """Keeps the metrics of the last validation, which the training loop does not return."""

    def __init__(self) -> None:
        self.metrics: dict = {}

    def after_val_epoch(self, runner, metrics: dict | None = None) -> None:
        self.metrics = dict(metrics or {})


def run_demo(config_dir: str = 'configs/demo', data_root: str = 'data/synthetic/',
             work_dir: str = 'work_dirs/demo', seed: int = 0) -> str:
    """Generate the data, train and evaluate every demo config, and return the comparison table.

    Args:
        config_dir: Folder holding the demo configs named in ``DEMO_RUNS``.
        data_root: Where the synthetic dataset is written (reused when already there).
        work_dir: Each run's logs and checkpoint go to ``<work_dir>/<config name>``.
        seed: Seeds both the dataset and the training.
    """
    summary = make_synthetic_coco(data_root, seed=seed)
    train, val = summary['train'], summary['val']
    print(f"Synthetic data in {data_root}: {train['num_images']} train / {val['num_images']} val "
          f"images, val objects by size {val['size_buckets']}", flush=True)
    rows = []
    for name, config_name in DEMO_RUNS:
        config = osp.join(config_dir, config_name)
        stem = osp.splitext(config_name)[0]
        # Each run gets its own visualizer: mmengine keeps one instance per name in a process,
        # and a shared one would write the second run's scalars into the first run's folder.
        cfg = load_config(config, {'data_root': data_root, 'randomness': dict(seed=seed),
                                   'visualizer.name': f'visualizer_{stem}'})
        init_default_scope(cfg.get('default_scope', 'mmdet'))
        image_size = cfg.get('image_scale', (256, 256))
        complexity = backbone_complexity(cfg.model.backbone, (3, *image_size))
        print(f'\n=== {name}: training {config} ===', flush=True)
        runner = build_train_runner(cfg, config_path=config, work_dir=osp.join(work_dir, stem))
        recorder = _LastMetrics()
        runner.register_hook(recorder, priority='LOWEST')
        start = time.perf_counter()
        runner.train()
        minutes = (time.perf_counter() - start) / 60
        ap = coco_bbox_ap(recorder.metrics)
        rows.append([name, *ap.values(), f'{complexity.params / 1e6:.3f}',
                     f'{complexity.papers_flops / 1e9:.3f}', f'{minutes:.1f}'])
    height, width = image_size
    header = ['backbone', *COCO_BBOX_COLUMNS, 'params (M)', f'GFLOPs @{width}x{height}',
              'train min']
    return markdown_table(header, rows)
