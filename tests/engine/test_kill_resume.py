"""A training killed with SIGKILL at any moment, during a save too, resumes to the same weights.

Guarantees 1 and 2 of the README's "Reliability" section, checked on tools/train.py with the
tiny RetinaNet (9 iterations, a checkpoint every 2, validation after every epoch).
"""
import random
import shutil
import time

import pytest
import torch
from conftest import TINY_CONFIG
from forked_tools import Tool

from mmattn.engine import verify_checkpoint

LAST_ITER = 9
ITERS_PER_EPOCH = 3


def start_training(work_dir, data_root, *extra: str, env: dict | None = None) -> Tool:
    log = work_dir.parent / f'{work_dir.name}-{len(list(work_dir.parent.glob("*.log")))}.log'
    return Tool('tools/train.py', TINY_CONFIG, '--work-dir', str(work_dir), *extra,
                '--cfg-options', f'data_root={data_root}/', log=log, env=env)


@pytest.fixture(scope='module')
def reference(tmp_path_factory, tiny_data):
    """The run that is never killed, started at once; ``reference()`` waits for its work dir."""
    work_dir = tmp_path_factory.mktemp('reference') / 'work'
    run = start_training(work_dir, tiny_data)

    def finished():
        assert run.wait() == 0, run.output()[-3000:]
        return work_dir
    return finished


def final_weights(work_dir) -> dict:
    checkpoint = torch.load(work_dir / f'iter_{LAST_ITER}.pth', weights_only=True)
    assert checkpoint['meta']['iter'] == LAST_ITER
    return checkpoint['state_dict']


def assert_same_weights(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-6, atol=1e-7, msg=key)


def assert_no_torn_checkpoint(work_dir) -> None:
    """Every checkpoint under its final name is complete; last_checkpoint names one of them."""
    for path in work_dir.glob('*.pth'):
        verify_checkpoint(str(path))
    marker = work_dir / 'last_checkpoint'
    if marker.exists():
        assert (work_dir / marker.read_text().strip()).is_file()


def kill_at_random_moment(run: Tool, work_dir, rng: random.Random) -> None:
    """SIGKILL in a random iteration still to come, at a random point of it.

    The moment is drawn in iterations rather than seconds, so a busy machine cannot let the run
    finish first; the delay after the iteration's log line lands in its checkpoint save, the
    validation or the next step.
    """
    marker = work_dir / 'last_checkpoint'
    done = torch.load(marker.read_text().strip(), weights_only=True)['meta']['iter'] \
        if marker.exists() else 0
    if done == LAST_ITER:
        assert run.wait() == 0, run.output()[-3000:]
        return
    iteration = rng.randint(done + 1, LAST_ITER)
    epoch, batch = divmod(iteration - 1, ITERS_PER_EPOCH)
    run.wait_for(f'Epoch(train) [{epoch + 1}][{batch + 1}/{ITERS_PER_EPOCH}]')
    exit_code = run.wait_or_kill(rng.uniform(0.0, 0.3))
    assert exit_code in (None, 0), run.output()[-3000:]  # killed, or finished first


def test_sigkill_anytime_then_resume_ends_with_the_unkilled_weights(reference, tiny_data,
                                                                    tmp_path):
    rng = random.Random(8)
    work_dir = tmp_path / 'work'

    kill_at_random_moment(start_training(work_dir, tiny_data, '--resume'), work_dir, rng)
    assert_no_torn_checkpoint(work_dir)

    # Killed between writing a checkpoint and renaming it into place: the writer waits there.
    run = start_training(work_dir, tiny_data, '--resume', env={'MMATTN_TEST_SAVE_DELAY': '60'})
    run.wait_for('Saving checkpoint')
    while not list(work_dir.glob('.iter_*.pth.*.tmp')):
        assert run.process.is_alive(), run.output()[-3000:]
        time.sleep(0.01)
    run.kill()
    torn = list(work_dir.glob('.iter_*.pth.*.tmp'))
    assert len(torn) == 1
    assert_no_torn_checkpoint(work_dir)

    kill_at_random_moment(start_training(work_dir, tiny_data, '--resume'), work_dir, rng)
    assert_no_torn_checkpoint(work_dir)

    run = start_training(work_dir, tiny_data, '--resume')
    assert run.wait() == 0, run.output()[-3000:]
    assert not torn[0].exists()  # the resumed run removed the unfinished write
    assert_same_weights(final_weights(work_dir), final_weights(reference()))


@pytest.mark.parametrize('damage', ['truncate', 'flip a byte'])
def test_resume_skips_a_damaged_newest_checkpoint_and_falls_back(reference, tiny_data, tmp_path,
                                                                  damage):
    work_dir = tmp_path / 'work'
    shutil.copytree(reference(), work_dir)
    newest = work_dir / f'iter_{LAST_ITER}.pth'
    (work_dir / 'last_checkpoint').write_text(str(newest))  # it named the reference's file
    data = bytearray(newest.read_bytes())
    if damage == 'truncate':
        data = data[:len(data) // 3]
    else:
        data[len(data) // 2] ^= 0xFF
    newest.write_bytes(bytes(data))

    run = start_training(work_dir, tiny_data, '--resume')
    assert run.wait() == 0, run.output()[-3000:]
    output = run.output()
    assert f'Resume: skipping {newest}' in output
    assert 'resumed epoch: 2, iter: 8' in output
    assert_same_weights(final_weights(work_dir), final_weights(reference()))
