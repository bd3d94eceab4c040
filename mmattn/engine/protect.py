"""Give every config trained through mmattn the reliability pieces, without editing the config."""
from __future__ import annotations

from mmengine.config import Config, ConfigDict

# mmengine's classes -> mmattn's drop-in subclasses (same arguments).
_LOOPS = {'EpochBasedTrainLoop': 'ResumableEpochBasedTrainLoop',
          'IterBasedTrainLoop': 'ResumableIterBasedTrainLoop'}
_CHECKPOINT_HOOKS = {'CheckpointHook': 'ResumableCheckpointHook'}


def protect_training(cfg: Config) -> None:
    """Swap in mmattn's resumable loop and checkpoint hook and add the NaN/Inf guard.

    - ``train_cfg``: mmengine's epoch- or iteration-based loop becomes
      :class:`ResumableEpochBasedTrainLoop` / :class:`ResumableIterBasedTrainLoop`.
    - ``default_hooks.checkpoint``: ``CheckpointHook`` becomes :class:`ResumableCheckpointHook`
      (mmengine's default, ``interval=1``, when the config has none; left out if set to None).
    - ``custom_hooks``: :class:`NonFiniteLossHook` is added unless present.

    Other loop or checkpoint hook types are left as they are: a config that chose its own keeps
    it (and the guarantees it gives).
    """
    train_cfg = cfg.get('train_cfg')
    if train_cfg is not None:
        loop_type = train_cfg.get('type')
        if loop_type is None:
            loop_type = 'EpochBasedTrainLoop' if train_cfg.pop('by_epoch', True) else \
                'IterBasedTrainLoop'
        train_cfg.type = _LOOPS.get(_name(loop_type), loop_type)

    if cfg.get('default_hooks') is None:
        cfg.default_hooks = ConfigDict()
    hooks = cfg.default_hooks
    if 'checkpoint' not in hooks:
        hooks.checkpoint = ConfigDict(type='CheckpointHook', interval=1)
    if hooks.checkpoint is not None:
        hooks.checkpoint.type = _CHECKPOINT_HOOKS.get(_name(hooks.checkpoint.type),
                                                      hooks.checkpoint.type)

    custom_hooks = list(cfg.get('custom_hooks') or [])
    if not any(_name(hook.get('type')) == 'NonFiniteLossHook' for hook in custom_hooks):
        custom_hooks.append(ConfigDict(type='NonFiniteLossHook'))
    cfg.custom_hooks = custom_hooks


def _name(hook_type) -> str:
    """A registry name, also for a class given as ``type`` (``mmengine.hooks.CheckpointHook``)."""
    if isinstance(hook_type, type):
        return hook_type.__name__ if hook_type.__module__.startswith('mmengine') else ''
    return str(hook_type).split('.')[-1] if hook_type else ''
