"""Distributed runs on CPU: two gloo processes train, and a dead or stuck process stops the job.

The passing run goes through tools/dist_train.sh (torchrun). The fault tests start the two ranks
themselves, as torchrun would (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), so that it is mmattn,
not torchrun's agent, that notices the dead peer and ends the survivor.
"""
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from mmattn.datasets import make_synthetic_coco

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / 'tests' / 'engine'))  # the forked tool runner lives there
from forked_tools import Tool  # noqa: E402

CONFIG = 'tests/engine/configs/tiny_retinanet.py'


@pytest.fixture(scope='module')
def data_root(tmp_path_factory) -> pathlib.Path:
    root = tmp_path_factory.mktemp('dist_data')
    make_synthetic_coco(root, seed=1, num_train=6, num_val=2, image_size=(128, 128))
    return root


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def test_two_cpu_processes_train_with_dist_train_sh(data_root, tmp_path):
    work_dir = tmp_path / 'work'
    env = dict(os.environ, PYTHON=sys.executable, PORT=str(free_port()), OMP_NUM_THREADS='1')
    result = subprocess.run(
        ['bash', 'tools/dist_train.sh', CONFIG, '2', '--work-dir', str(work_dir),
         '--cfg-options', f'data_root={data_root}/', 'train_cfg.max_epochs=1'],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "dist_cfg=dict(backend='gloo', timeout=1800)" in output
    # 6 images, batch 2 per process: 2 iterations, each over 4 images.
    assert 'Epoch(train) [1][2/2]' in output
    checkpoint = torch.load(work_dir / 'iter_2.pth', weights_only=True)
    assert len(checkpoint['resume_state']) == 2  # the random state of both ranks


def start_ranks(data_root, tmp_path, timeout_s: int) -> list[Tool]:
    port = str(free_port())
    ranks = []
    for rank in (0, 1):
        env = dict(MASTER_ADDR='127.0.0.1', MASTER_PORT=port, RANK=str(rank), WORLD_SIZE='2',
                   LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE='2')
        ranks.append(Tool(
            'tools/train.py', CONFIG, '--work-dir', str(tmp_path / 'work'), '--launcher',
            'pytorch', '--cfg-options', f'data_root={data_root}/',
            f'env_cfg.dist_cfg.timeout={timeout_s}', 'train_cfg.max_epochs=50',
            log=tmp_path / f'rank{rank}.log', env=env))
    ranks[0].wait_for('Saving checkpoint at 2 iterations')  # both are training
    return ranks


@pytest.mark.parametrize('dead', [1, 0])
def test_when_a_rank_is_killed_the_other_stops_with_a_message(data_root, tmp_path, dead):
    ranks = start_ranks(data_root, tmp_path, timeout_s=60)
    ranks[dead].kill()
    survivor = ranks[1 - dead]
    start = time.monotonic()
    assert survivor.wait(timeout=30) == 1
    assert time.monotonic() - start < 30
    # The tool ends with the message itself (`error: ...`), not a traceback.
    assert (f'error: rank {1 - dead} of 2: another process of this job died or '
            'stopped answering') in survivor.output()
    assert 'Traceback' not in survivor.output()
    assert 'restart the whole job with --resume' in survivor.output()


def test_when_a_rank_hangs_the_other_stops_after_the_timeout(data_root, tmp_path):
    ranks = start_ranks(data_root, tmp_path, timeout_s=5)
    os.kill(ranks[1].process.pid, signal.SIGSTOP)
    try:
        start = time.monotonic()
        assert ranks[0].wait(timeout=60) == 1
        assert time.monotonic() - start < 30
        assert 'rank 0 of 2: another process of this job died or stopped answering' in \
            ranks[0].output()
        assert 'Timed out waiting' in ranks[0].output()
    finally:
        ranks[1].kill()
