"""Stop a diverging run at the first NaN or infinite loss, before it can overwrite a checkpoint."""
from __future__ import annotations

import math
import os.path as osp

import torch
import torch.distributed as torch_dist
from mmengine.dist import get_world_size
from mmengine.hooks import Hook
from mmengine.registry import HOOKS


class TrainingAborted(RuntimeError):
    """Training stopped on purpose because continuing would waste the run or its checkpoints."""


class NonFiniteLossError(TrainingAborted):
    """A loss term became NaN or infinite."""


@HOOKS.register_module()
class NonFiniteLossHook(Hook):
    """Raise :class:`NonFiniteLossError` when a loss term is NaN or infinite.

    It runs right after the training step, before the logger and the checkpoint hook, so the
    diverged weights are never saved and the last good checkpoint stays as it was. In distributed
    training the verdict is shared by all ranks (one all-reduce of a flag per iteration), so every
    process stops at the same iteration instead of the healthy ones waiting on the stopped one.
    """

    priority = 'VERY_HIGH'

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        losses = {name: value for name, value in (outputs or {}).items() if 'loss' in name}
        bad = {name: value for name, value in losses.items() if not _is_finite(value)}
        if get_world_size() > 1:
            flag = torch.tensor([float(bool(bad))], device=_device_of(losses))
            torch_dist.all_reduce(flag)
            if flag.item() and not bad:
                raise NonFiniteLossError(
                    f'training stopped at iteration {runner.iter + 1}: another process got a '
                    'NaN or infinite loss (its log names the term). ' + _advice(runner))
        if not bad:
            return
        # Name the individual terms first; the total 'loss' is bad because they are.
        terms = sorted(bad, key=lambda name: (name == 'loss', name))
        values = ', '.join(f'{name}={_as_float(bad[name])}' for name in terms)
        finite = ', '.join(f'{name}={_as_float(value):.4g}' for name, value in losses.items()
                           if name not in bad)
        loop = runner.train_loop
        where = f'iteration {runner.iter + 1}'
        if hasattr(loop, 'max_epochs') and loop.max_epochs > 1:
            where += (f' (epoch {runner.epoch + 1}, batch {batch_idx + 1} of '
                      f'{len(loop.dataloader)})')
        message = (f'training stopped at {where}: {terms[0]} is not finite ({values}'
                   + (f'; finite: {finite}' if finite else '') + '). ' + _advice(runner))
        runner.logger.error(message)
        raise NonFiniteLossError(message)


def _advice(runner) -> str:
    last = runner.message_hub.get_info('last_ckpt')
    if last is None:
        marker = osp.join(runner.work_dir, 'last_checkpoint')
        if osp.isfile(marker):
            with open(marker) as f:
                last = f.read().strip() or None
    kept = (f'The last good checkpoint, {last}, is left as it was'
            if last else 'No checkpoint had been written yet')
    return (f'{kept}; nothing after this iteration was saved. Lower the learning rate, lengthen '
            'the warm-up or clip gradients (optim_wrapper.clip_grad=dict(max_norm=35)), check the '
            'data, then run again with --resume.')


def _is_finite(value) -> bool:
    if isinstance(value, torch.Tensor):
        return bool(torch.isfinite(value.detach()).all())
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return True  # not a number (e.g. a list of per-level losses is not logged as one)


def _as_float(value) -> float:
    if isinstance(value, torch.Tensor):
        return float(value.detach().float().mean())
    return float(value)


def _device_of(losses: dict) -> torch.device:
    for value in losses.values():
        if isinstance(value, torch.Tensor):
            return value.device
    return torch.device('cpu')
