"""ResumableCheckpointHook and the resumable loops on a toy model: exact resume, safe saving."""
import errno
import random

import numpy as np
import pytest
import torch
from mmengine.model import BaseModel
from mmengine.runner import Runner
from torch.utils.data import Dataset

from mmattn.engine import CheckpointSaveError, find_resumable_checkpoint, verify_checkpoint
from mmattn.engine import atomic as atomic_module
from mmattn.engine.atomic import atomic_write, temporary_target

BATCHES_PER_EPOCH = 8
# Two epochs for the epoch loop. The iteration loop stops within one pass over the data: at the
# end of a pass mmengine's iterator sleeps 2 s.
MAX_ITERS = {'epoch': 2 * BATCHES_PER_EPOCH, 'iter': BATCHES_PER_EPOCH}


class ToyModel(BaseModel):
    """Dropout draws from torch's generator in every step."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 1)
        self.dropout = torch.nn.Dropout(0.5)

    def forward(self, inputs, targets, mode='tensor'):
        prediction = self.linear(self.dropout(torch.stack(inputs))).squeeze(1)
        return {'loss': (prediction - torch.stack(targets)).square().mean()}


class NoisyData(Dataset):
    """Augmentation draws from numpy's and Python's generators, as mmdet's transforms do."""

    def __len__(self) -> int:
        return 3 * BATCHES_PER_EPOCH

    def __getitem__(self, index: int) -> dict:
        noise = [np.random.rand(), random.random()]
        return {'inputs': torch.tensor([index, 1.0, *noise], dtype=torch.float32),
                'targets': torch.tensor(float(index))}


def make_runner(work_dir, loop: str, resume_from=None, max_keep_ckpts=-1,
                by_epoch: bool = False) -> Runner:
    train_cfg = (dict(type='ResumableIterBasedTrainLoop', max_iters=MAX_ITERS['iter'])
                 if loop == 'iter' else dict(type='ResumableEpochBasedTrainLoop', max_epochs=2))
    return Runner(
        model=ToyModel(), work_dir=str(work_dir),
        train_dataloader=dict(dataset=NoisyData(), sampler=dict(type='DefaultSampler'),
                              batch_size=3, num_workers=0),
        optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.01, momentum=0.9)),
        train_cfg=train_cfg,
        default_hooks=dict(checkpoint=dict(type='ResumableCheckpointHook',
                                           interval=1 if by_epoch else 3, by_epoch=by_epoch,
                                           max_keep_ckpts=max_keep_ckpts)),
        randomness=dict(seed=0), load_from=resume_from, resume=resume_from is not None,
        default_scope='mmengine')


def weights(runner: Runner) -> dict:
    return {key: value.clone() for key, value in runner.model.state_dict().items()}


@pytest.mark.parametrize('loop, checkpoint', [
    ('iter', 'iter_3.pth'),
    ('epoch', 'iter_3.pth'),  # inside the first epoch
    ('epoch', 'epoch_1.pth'),  # at the end of the first epoch
])
def test_resume_ends_like_the_uninterrupted_run(tmp_path, loop, checkpoint):
    by_epoch = checkpoint.startswith('epoch')
    whole = make_runner(tmp_path / 'whole', loop, by_epoch=by_epoch)
    whole.train()
    resumed = make_runner(tmp_path / 'resumed', loop, by_epoch=by_epoch,
                          resume_from=str(tmp_path / 'whole' / checkpoint))
    resumed.train()
    assert resumed.iter == whole.iter == MAX_ITERS[loop]
    for key, value in weights(whole).items():
        torch.testing.assert_close(weights(resumed)[key], value, rtol=0, atol=0)


def test_the_random_state_is_what_makes_the_resume_exact(tmp_path):
    whole = make_runner(tmp_path / 'whole', 'epoch')
    whole.train()
    checkpoint = torch.load(tmp_path / 'whole/iter_3.pth', weights_only=True)
    checkpoint.pop('resume_state')
    torch.save(checkpoint, tmp_path / 'no_rng.pth')
    resumed = make_runner(tmp_path / 'resumed', 'epoch', resume_from=str(tmp_path / 'no_rng.pth'))
    resumed.train()
    assert resumed.iter == MAX_ITERS['epoch']  # the position is still right ...
    assert not torch.equal(weights(resumed)['linear.weight'], weights(whole)['linear.weight'])


def test_a_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    runner = make_runner(tmp_path, 'epoch', max_keep_ckpts=1)
    real_fsync = atomic_module.os.fsync

    def fsync(fd):  # the disk fills up once iteration 3 is saved
        if (tmp_path / 'last_checkpoint').exists():
            raise OSError(errno.ENOSPC, 'No space left on device')
        real_fsync(fd)

    monkeypatch.setattr(atomic_module.os, 'fsync', fsync)
    with pytest.raises(CheckpointSaveError, match=r'iter_6\.pth: No space left on device.*'
                       r'last complete checkpoint is .*iter_3\.pth'):
        runner.train()
    # mmengine would have deleted iter_3.pth (max_keep_ckpts=1) before trying to write iter_6.
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix in ('.pth', '.tmp')) == [
        'iter_3.pth']
    assert (tmp_path / 'last_checkpoint').read_text() == str(tmp_path / 'iter_3.pth')
    assert verify_checkpoint(str(tmp_path / 'iter_3.pth'))['meta']['iter'] == 3


def test_max_keep_ckpts_prunes_after_the_new_checkpoint_is_in_place(tmp_path):
    make_runner(tmp_path, 'epoch', max_keep_ckpts=1).train()
    last = tmp_path / f"iter_{MAX_ITERS['epoch']}.pth"
    assert sorted(tmp_path.glob('*.pth')) == [last]
    assert (tmp_path / 'last_checkpoint').read_text() == str(last)


def test_atomic_write_leaves_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    path = tmp_path / 'last_checkpoint'
    atomic_write(path, 'old')

    def fail(fd):
        raise OSError(errno.ENOSPC, 'No space left on device')

    monkeypatch.setattr(atomic_module.os, 'fsync', fail)
    with pytest.raises(OSError):
        atomic_write(path, 'new')
    assert path.read_text() == 'old'
    assert [p.name for p in tmp_path.iterdir()] == ['last_checkpoint']


def test_temporary_files_name_their_target():
    assert temporary_target('.epoch_3.pth.k2j4x9ab.tmp') == 'epoch_3.pth'
    assert temporary_target('.last_checkpoint.abc.tmp') == 'last_checkpoint'
    assert temporary_target('epoch_3.pth') is None


def test_resume_falls_back_when_last_checkpoint_names_a_missing_file(tmp_path):
    make_runner(tmp_path, 'epoch').train()
    (tmp_path / f"iter_{MAX_ITERS['epoch']}.pth").unlink()
    assert find_resumable_checkpoint(str(tmp_path)) == str(tmp_path / 'iter_15.pth')


def test_nothing_to_resume_in_an_empty_work_dir(tmp_path):
    assert find_resumable_checkpoint(str(tmp_path)) is None
