"""Checkpoint loading: safe unpickling of mmengine checkpoints."""
from .safe_load import allow_mmengine_checkpoints, mmengine_checkpoint_globals

__all__ = ['allow_mmengine_checkpoints', 'mmengine_checkpoint_globals']
