"""The process's random state (Python, numpy, torch CPU and CUDA) as a checkpointable dict.

Everything in it loads under torch's weights_only loader with mmattn's allowlist: ints, tuples,
a uint32 numpy array and uint8 tensors.
"""
from __future__ import annotations

import random

import numpy as np
import torch


def get_rng_state() -> dict:
    """A snapshot of every global random generator a training step may draw from."""
    state = {
        'python': random.getstate(),
        'numpy': np.random.get_state(),
        'torch': torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore a snapshot taken by :func:`get_rng_state` (CUDA only where it was saved)."""
    random.setstate(_as_python_state(state['python']))
    np.random.set_state(tuple(state['numpy']))
    torch.set_rng_state(state['torch'])
    cuda = state.get('cuda')
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def _as_python_state(state) -> tuple:
    # random.setstate wants (version, tuple_of_ints, gauss_next); a round trip through some
    # serializers turns the inner tuple into a list.
    version, internal, gauss_next = state
    return version, tuple(internal), gauss_next
