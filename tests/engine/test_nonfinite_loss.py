"""A NaN loss stops training with the iteration and the loss term named; checkpoints stay good."""
import math

import pytest
import torch
from forked_tools import Tool

from mmattn.engine import NonFiniteLossError, NonFiniteLossHook, verify_checkpoint


def test_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(tiny_data, tmp_path):
    work_dir = tmp_path / 'work'
    run = Tool('tools/train.py', 'tests/engine/configs/tiny_retinanet_nan.py', '--work-dir',
               str(work_dir), '--cfg-options', f'data_root={tiny_data}/', log=tmp_path / 'log')
    assert run.wait() != 0
    output = run.output()
    assert 'training stopped at iteration 5 (epoch 2, batch 2 of 3): loss_cls is not finite' \
        in output
    assert f'The last good checkpoint, {work_dir}/iter_4.pth, is left as it was' in output
    assert sorted(p.name for p in work_dir.glob('*.pth')) == ['iter_2.pth', 'iter_4.pth']
    assert (work_dir / 'last_checkpoint').read_text() == str(work_dir / 'iter_4.pth')
    state = verify_checkpoint(str(work_dir / 'iter_4.pth'))['state_dict']
    assert all(torch.isfinite(value).all() for value in state.values())


class FakeRunner:
    iter, epoch, work_dir = 11, 0, '/nowhere'
    train_loop = None

    class logger:  # noqa: N801
        @staticmethod
        def error(message: str) -> None:
            pass

    class message_hub:  # noqa: N801
        @staticmethod
        def get_info(key):
            return None


@pytest.mark.parametrize('bad', [math.inf, -math.inf, math.nan])
def test_each_non_finite_value_names_the_term(bad):
    outputs = {'loss_cls': torch.tensor(0.5), 'loss_bbox': torch.tensor(bad),
               'loss': torch.tensor(bad)}
    with pytest.raises(NonFiniteLossError, match=r'iteration 12: loss_bbox is not finite'):
        NonFiniteLossHook().after_train_iter(FakeRunner, 0, outputs=outputs)


def test_finite_losses_pass():
    NonFiniteLossHook().after_train_iter(FakeRunner, 0, outputs={'loss': torch.tensor(1.0)})
