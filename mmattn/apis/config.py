"""Loading a config the way every mmattn tool does."""
from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

from mmengine.config import Config

from mmattn.preflight import ConfigError, follow_data_root


def load_config(path: str, cfg_options: dict | None = None) -> Config:
    """Read ``path``, merge ``cfg_options`` and let the data paths follow ``data_root``."""
    cfg = Config.fromfile(path)
    original_root = cfg.get('data_root')
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    follow_data_root(cfg, original_root)
    return cfg


@contextlib.contextmanager
def exit_on_known_error() -> Iterator[None]:
    """In a command-line tool: a failure mmattn explains ends the program with its message.

    Config mistakes (preflight), refused checkpoints, a training stopped on a non-finite loss or a
    dead peer process, and a checkpoint that could not be written all carry a message that names
    the problem and the fix; a traceback would only bury it.
    """
    from mmattn.engine import CheckpointSaveError, TrainingAborted
    try:
        yield
    except (ConfigError, TrainingAborted, CheckpointSaveError) as err:
        sys.exit(f'error: {err}')
