"""Training that survives kills, torn files, diverging losses and dead processes.

Importing this package registers, in MMEngine's root registries (found under scope mmdet and
mmpretrain too): the ``atomic_local`` file backend, the loops ``ResumableEpochBasedTrainLoop`` and
``ResumableIterBasedTrainLoop``, and the hooks ``ResumableCheckpointHook`` and
``NonFiniteLossHook``. :func:`protect_training` puts them into a config; mmattn's training
(tools/train.py, :func:`mmattn.apis.train`) does that for every config.
"""
from .atomic import AtomicLocalBackend, atomic_write
from .checkpoint_hook import CheckpointSaveError, ResumableCheckpointHook
from .dist import (
                   DistributedFaultError,
                   close_distributed,
                   configure_distributed,
                   distributed_fault_guard,
                   init_distributed,
)
from .loops import ResumableEpochBasedTrainLoop, ResumableIterBasedTrainLoop
from .nonfinite import NonFiniteLossError, NonFiniteLossHook, TrainingAborted
from .protect import protect_training
from .resume import CorruptCheckpointError, find_resumable_checkpoint, verify_checkpoint

__all__ = [
    'AtomicLocalBackend', 'CheckpointSaveError', 'CorruptCheckpointError',
    'DistributedFaultError', 'NonFiniteLossError', 'NonFiniteLossHook',
    'ResumableCheckpointHook', 'ResumableEpochBasedTrainLoop', 'ResumableIterBasedTrainLoop',
    'TrainingAborted', 'atomic_write', 'close_distributed', 'configure_distributed',
    'distributed_fault_guard', 'find_resumable_checkpoint', 'init_distributed', 'protect_training',
    'verify_checkpoint'
]
