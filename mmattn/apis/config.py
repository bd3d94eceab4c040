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
def exit_on_config_error() -> Iterator[None]:
    """In a command-line tool: a config mistake ends the program with its message, not a trace."""
    try:
        yield
    except ConfigError as err:
        sys.exit(f'error: {err}')
