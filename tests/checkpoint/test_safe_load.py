"""mmengine's own checkpoints load under torch's weights_only loader; pickled callables do not."""
import pathlib
import pickle

import pytest
import torch
from mmengine.logging.history_buffer import HistoryBuffer
from mmengine.model import BaseModel
from mmengine.runner import Runner, load_checkpoint
from mmengine.runner.checkpoint import CheckpointLoader
from torch.utils.data import Dataset

from mmattn.checkpoint.safe_load import history_buffer_statistic


class ToyModel(BaseModel):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(2, 1)

    def forward(self, inputs, targets, mode='tensor'):
        loss = (self.linear(torch.stack(inputs)).squeeze(1) - torch.stack(targets)).square().mean()
        return {'loss': loss}


class ToyData(Dataset):
    def __len__(self) -> int:
        return 8

    def __getitem__(self, index: int) -> dict:
        return {'inputs': torch.tensor([index, 1.0]), 'targets': torch.tensor(float(index))}


def make_runner(work_dir: pathlib.Path, max_iters: int, resume: bool = False) -> Runner:
    return Runner(
        model=ToyModel(), work_dir=str(work_dir),
        train_dataloader=dict(dataset=ToyData(), sampler=dict(type='DefaultSampler'),
                              batch_size=2, num_workers=0),
        optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.01)),
        train_cfg=dict(by_epoch=False, max_iters=max_iters),
        default_hooks=dict(checkpoint=dict(type='CheckpointHook', interval=2, by_epoch=False)),
        resume=resume, default_scope='mmengine')


class GetattrPayload:
    """The classic escape through getattr: reach os.system via an allowed object's attributes."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return getattr, (pathlib.Path(self.marker), 'touch')


class Payload:
    """Unpickling this would create a marker file: the proof that pickled code ran."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker, )


def test_runner_checkpoint_resumes_under_weights_only(tmp_path):
    make_runner(tmp_path, max_iters=2).train()
    resumed = make_runner(tmp_path, max_iters=4, resume=True)
    resumed.train()
    assert resumed.iter == 4
    # The loss history saved at iteration 2 came back: 2 saved + 2 new entries.
    losses, _ = resumed.message_hub.get_scalar('train/loss').data
    assert len(losses) == 4


def test_load_from_reads_runner_checkpoint(tmp_path):
    make_runner(tmp_path, max_iters=2).train()
    checkpoint = load_checkpoint(ToyModel(), str(tmp_path / 'iter_2.pth'))
    assert checkpoint['meta']['iter'] == 2


@pytest.mark.parametrize('load', [
    lambda path: CheckpointLoader.load_checkpoint(path),
    lambda path: load_checkpoint(ToyModel(), path),
    lambda path: torch.load(path),
], ids=['CheckpointLoader', 'load_checkpoint', 'torch.load'])
def test_pickled_callable_is_refused_and_never_runs(tmp_path, load):
    marker = tmp_path / 'payload-ran'
    path = str(tmp_path / 'evil.pth')
    torch.save({'state_dict': {}, 'meta': Payload(marker)}, path)
    with pytest.raises(pickle.UnpicklingError, match='Unsupported global'):
        load(path)
    assert not marker.exists()


def test_getattr_reaches_only_history_buffer_statistics(tmp_path):
    path = str(tmp_path / 'evil.pth')
    torch.save({'meta': GetattrPayload(tmp_path / 'marker')}, path)
    with pytest.raises(pickle.UnpicklingError):
        CheckpointLoader.load_checkpoint(path)
    with pytest.raises(pickle.UnpicklingError, match="getattr"):
        history_buffer_statistic(HistoryBuffer, '__init__')
    assert history_buffer_statistic(HistoryBuffer, 'mean') is HistoryBuffer.mean
