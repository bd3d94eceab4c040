"""``mmattn::`` config paths: another project inherits mmattn's configs with
``_base_ = 'mmattn::retinanet_r50_sge.py'``."""
from __future__ import annotations

import os.path as osp

from mmengine.config import Config

SCOPE = 'mmattn::'
CONFIG_ROOT = osp.join(osp.dirname(osp.abspath(__file__)), '.mim', 'configs')


def resolve_mmattn_configs() -> None:
    """Let mmengine's Config read ``mmattn::<path>`` from the configs mmattn ships.

    mmengine 0.10.7 resolves ``pkg::path`` only for the OpenMMLab packages it lists
    (``MODULE2PACKAGE``), only in the form ``pkg::folder/file.py``, and finds the package through
    pkg_resources, which points into site-packages for an editable install. mmattn's configs are
    flat and sit in ``mmattn/.mim/configs`` (a link to the repository's configs/ in a checkout, a
    copy in a wheel), so ``mmattn::`` is resolved here, next to this file, and every other path is
    left to mmengine. The base is read like a local base (no ``_scope_``): its registry names
    resolve under the config's ``default_scope``. Idempotent.
    """
    original = Config._get_cfg_path
    if getattr(original, 'resolves_mmattn', False):
        return

    def _get_cfg_path(cfg_path: str, filename: str) -> tuple[str, str | None]:
        if not cfg_path.startswith(SCOPE):
            return original(cfg_path, filename)
        path = osp.join(CONFIG_ROOT, cfg_path[len(SCOPE):])
        if not osp.isfile(path):
            raise FileNotFoundError(f'{cfg_path!r} (in {filename}): mmattn ships no such config; '
                                    f'looked for {path}')
        return path, None

    _get_cfg_path.resolves_mmattn = True
    Config._get_cfg_path = staticmethod(_get_cfg_path)
