import contextlib
import pathlib
import runpy
import sys

import pytest
import torch
from mmengine.registry import DefaultScope

from mmattn.apis import train
from mmattn.datasets import make_synthetic_coco

ROOT = pathlib.Path(__file__).resolve().parents[2]
DEMO_CONFIGS = {
    'retinanet_r50_synthetic': ROOT / 'configs/demo/retinanet_r50_synthetic.py',
    'retinanet_r50_sge_synthetic': ROOT / 'configs/demo/retinanet_r50_sge_synthetic.py',
}


@contextlib.contextmanager
def native_convolutions():
    # oneDNN compiles a kernel for every new convolution shape; at the demo's quarter width
    # torch's native kernels are faster.
    enabled = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = enabled


@pytest.fixture(scope='session')
def trained(tmp_path_factory) -> dict:
    """One epoch of the demo's baseline and SGE RetinaNet on 4 synthetic images, each with a
    validation at the end; shared by the compare and attention-map tests.

    score_thr=0 keeps the untrained detector's boxes, so CocoMetric logs numbers; each run gets
    its own visualizer, or the second would log into the first one's folder.
    """
    tmp = tmp_path_factory.mktemp('analysis')
    data_root = tmp / 'data'
    make_synthetic_coco(data_root, seed=1, num_train=4, num_val=2, image_size=(128, 128))
    work_dirs = {}
    # The Runner makes its scope the default one; leave no default scope behind for later tests.
    with native_convolutions(), DefaultScope.overwrite_default_scope('mmdet'):
        for name, config in DEMO_CONFIGS.items():
            work_dirs[name] = tmp / name
            train(str(config), work_dir=str(work_dirs[name]), cfg_options={
                'data_root': f'{data_root}/', 'train_dataloader.batch_size': 2,
                'val_dataloader.batch_size': 2, 'test_dataloader.batch_size': 2,
                'train_cfg.max_epochs': 1, 'train_cfg.val_interval': 1, 'randomness.seed': 0,
                'model.test_cfg.score_thr': 0.0, 'visualizer.name': f'analysis_{name}'})
    return dict(data_root=data_root, work_dirs=work_dirs, configs=DEMO_CONFIGS)


@pytest.fixture
def run_tool(monkeypatch, capsys):
    """Run ``tools/analysis/<tool>`` in this process with the given arguments; returns what it
    printed (no second start-up of torch and mmdet)."""
    def run(tool: str, *args) -> str:
        path = ROOT / 'tools' / 'analysis' / tool
        monkeypatch.setattr(sys, 'argv', [str(path), *map(str, args)])
        runpy.run_path(str(path), run_name='__main__')
        return capsys.readouterr().out
    return run
