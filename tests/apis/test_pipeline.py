"""The user's path end to end on tiny synthetic data: tools/train.py, tools/test.py, --resume."""
import os
import pathlib
import subprocess
import sys

import pytest

from mmattn.datasets import make_synthetic_coco

ROOT = pathlib.Path(__file__).resolve().parents[2]


def run_tool(*args: str) -> str:
    # One thread: tiny tensors gain nothing from two, and spin-waiting threads slow a busy machine.
    env = dict(os.environ, OMP_NUM_THREADS='1')
    result = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                            timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


@pytest.fixture(scope='module')
def trained(tmp_path_factory) -> tuple[pathlib.Path, list[str]]:
    """One epoch of the demo's SGE RetinaNet on 4 images, as tools/train.py runs it."""
    tmp = tmp_path_factory.mktemp('pipeline')
    make_synthetic_coco(tmp / 'data', seed=1, num_train=4, num_val=2, image_size=(128, 128))
    options = ['--cfg-options', f'data_root={tmp}/data/', 'train_dataloader.batch_size=2',
               'val_dataloader.batch_size=2', 'test_dataloader.batch_size=2',
               'randomness.seed=0']
    work_dir = tmp / 'work'
    run_tool('tools/train.py', 'configs/demo/retinanet_r50_sge_synthetic.py', '--work-dir',
             str(work_dir), *options, 'train_cfg.max_epochs=1', 'train_cfg.val_interval=1')
    return work_dir, options


def test_train_writes_a_checkpoint(trained):
    work_dir, _ = trained
    assert (work_dir / 'epoch_1.pth').is_file()


def test_test_prints_the_coco_table(trained, tmp_path):
    work_dir, options = trained
    out = tmp_path / 'dets.pkl'
    output = run_tool('tools/test.py', 'configs/demo/retinanet_r50_sge_synthetic.py',
                      str(work_dir / 'epoch_1.pth'), '--work-dir', str(tmp_path), '--out',
                      str(out), *options)
    assert '| checkpoint | AP | AP50 | AP75 | AP_S | AP_M | AP_L |' in output
    assert out.is_file()


def test_resume_continues_from_the_last_checkpoint(trained):
    work_dir, options = trained
    output = run_tool('tools/train.py', 'configs/demo/retinanet_r50_sge_synthetic.py',
                      '--work-dir', str(work_dir), '--resume', *options,
                      'train_cfg.max_epochs=2', 'train_cfg.val_interval=2')
    assert 'resumed epoch: 1, iter: 2' in output
    assert (work_dir / 'epoch_2.pth').is_file()
