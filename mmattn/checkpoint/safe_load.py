"""Let torch's weights_only loader read the checkpoints mmengine writes, and nothing more.

torch >= 2.6 loads with ``weights_only=True`` by default; mmengine 0.10.7 calls ``torch.load``
without the argument, so its own checkpoints (``--resume``, ``load_from``, tools/test.py) fail on
the few non-tensor objects they contain: the message hub's ``HistoryBuffer``, the numpy arrays,
scalars and dtypes it holds, and its statistics methods, which pickle as
``getattr(HistoryBuffer, 'mean')``. Allowlisting exactly those keeps the loader's guarantee: a
checkpoint that carries any other pickled callable is still refused, and its payload never runs.
``getattr`` itself is never allowed (it reaches any attribute, and from there any callable): the
name ``builtins.getattr`` maps to :func:`history_buffer_statistic`, which resolves only those
methods. Turning weights_only off (or ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1``) would run arbitrary
code from any downloaded file instead.
"""
from __future__ import annotations

import pickle
import re

import numpy as np
import torch
from mmengine.logging.history_buffer import HistoryBuffer

from mmattn.preflight import ConfigError

# The numpy dtypes whose arrays and scalars mmengine's message hub and loops store.
_NUMPY_DTYPES = ('bool', 'int8', 'int16', 'int32', 'int64', 'uint8', 'uint16', 'uint32',
                 'uint64', 'float16', 'float32', 'float64')


# HistoryBuffer's built-in statistics; ones added with HistoryBuffer.register_statistics join them.
_STATISTICS = ('min', 'max', 'current', 'mean')


def history_buffer_statistic(owner: object, name: str):
    """``getattr`` restricted to ``HistoryBuffer.<statistic>``; anything else is refused."""
    if owner is HistoryBuffer and isinstance(name, str) and (
            name in _STATISTICS or name in HistoryBuffer._statistics_methods):
        return getattr(HistoryBuffer, name)
    raise pickle.UnpicklingError(
        f'checkpoint asks for getattr({owner!r}, {name!r}); only the statistics of mmengine\'s '
        'HistoryBuffer may be looked up while loading a checkpoint.')


def mmengine_checkpoint_globals() -> list:
    """The objects an mmengine checkpoint's pickle refers to, beyond torch's defaults.

    numpy 2 moved ``numpy.core`` to ``numpy._core``; checkpoints written under numpy 1 name the
    old module, so those entries are also allowed under their old names.
    """
    multiarray = np._core.multiarray if hasattr(np, '_core') else np.core.multiarray
    allowed: list = [HistoryBuffer, np.ndarray, np.dtype, multiarray._reconstruct,
                     multiarray.scalar]
    allowed += [type(np.dtype(name)) for name in _NUMPY_DTYPES]
    allowed += [(multiarray._reconstruct, 'numpy.core.multiarray._reconstruct'),
                (multiarray.scalar, 'numpy.core.multiarray.scalar'),
                (history_buffer_statistic, 'builtins.getattr')]
    return allowed


def allow_mmengine_checkpoints() -> None:
    """Add :func:`mmengine_checkpoint_globals` to torch's weights_only allowlist (idempotent)."""
    torch.serialization.add_safe_globals(mmengine_checkpoint_globals())


class CheckpointRefusedError(ConfigError, pickle.UnpicklingError):
    """A checkpoint asks to run pickled code; it was refused and none of that code ran.

    Still an ``UnpicklingError`` (what torch raises); as a ConfigError, mmattn's tools end with
    its message instead of a traceback.
    """


def load_checkpoint_file(path: str, map_location: str = 'cpu'):
    """``torch.load`` with ``weights_only=True`` and a refusal that says what and why.

    ``weights_only`` is passed explicitly, so ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` cannot turn it
    off. Only the globals of :func:`mmengine_checkpoint_globals` and torch's own are allowed.

    Raises:
        CheckpointRefusedError: The file references any other global (a pickled callable).
    """
    allow_mmengine_checkpoints()
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise refusal(path, err) from None


def refusal(path: str, err: pickle.UnpicklingError) -> CheckpointRefusedError:
    """The mmattn message for torch's (or :func:`history_buffer_statistic`'s) refusal."""
    found = re.search(r'GLOBAL (\S+)', str(err))
    what = found.group(1) if found else str(err).strip().splitlines()[0]
    return CheckpointRefusedError(
        f'refused: {path} contains pickled code ({what}); mmattn loads checkpoints with '
        "weights_only=True, which only rebuilds tensors and mmengine's own bookkeeping, so none "
        'of that code ran. A checkpoint needs no code: if the file comes from a source you '
        'trust, re-save its weights with torch.save(model.state_dict(), path); otherwise delete '
        'it. Do not set TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD, which would run whatever the file asks.')
