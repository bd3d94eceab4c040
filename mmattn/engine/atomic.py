"""Atomic file writes: a reader sees the old file or the complete new one, never a torn one.

mmengine's ``LocalBackend.put`` opens the destination with ``'wb'`` and writes into it, so a job
killed in the middle of a checkpoint save leaves a truncated ``epoch_N.pth`` under the final name,
and a full disk leaves a half-written one. Here the bytes go to a temporary file in the same
folder, are flushed and fsynced, and only then renamed over the destination (``os.replace`` is
atomic on POSIX and Windows); the folder is fsynced so the rename itself survives a power cut.
"""
from __future__ import annotations

import os
import os.path as osp
import tempfile
import time
from pathlib import Path

from mmengine.fileio import LocalBackend, register_backend

# Set only by tests: seconds to sleep between the fsync and the rename, which makes the window in
# which a kill leaves only the temporary file wide enough to hit on purpose.
SAVE_DELAY_ENV = 'MMATTN_TEST_SAVE_DELAY'
TMP_SUFFIX = '.tmp'


def temporary_target(name: str) -> str | None:
    """The file a temporary file of :func:`atomic_write` was to become, or None if it is not one.

    ``.epoch_3.pth.k2j4x9ab.tmp`` -> ``epoch_3.pth``.
    """
    if not (name.startswith('.') and name.endswith(TMP_SUFFIX)) or name.count('.') < 3:
        return None
    return name[1:].rsplit('.', 2)[0]


def atomic_write(path: str | Path, data: bytes | str, encoding: str = 'utf-8') -> None:
    """Write ``data`` to ``path`` so that ``path`` is always either absent, old or complete.

    Raises the OSError of a failed write (e.g. ENOSPC) after removing the temporary file; the
    previous content of ``path`` is then untouched.
    """
    if isinstance(data, str):
        data = data.encode(encoding)
    folder = osp.dirname(osp.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f'.{osp.basename(path)}.', suffix=TMP_SUFFIX)
    try:
        if hasattr(os, 'fchmod'):  # mkstemp's 0600 would hide checkpoints from the group
            os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, 'wb') as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        delay = float(os.environ.get(SAVE_DELAY_ENV, 0) or 0)
        if delay > 0:
            time.sleep(delay)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_folder(folder)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_folder(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open a folder; the rename is still atomic there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@register_backend('atomic_local')
class AtomicLocalBackend(LocalBackend):
    """mmengine's local file backend whose ``put`` and ``put_text`` are atomic.

    Selected with ``backend_args=dict(backend='atomic_local')``; :class:`ResumableCheckpointHook`
    uses it for every checkpoint it writes to a local folder.
    """

    def put(self, obj: bytes, filepath: str | Path) -> None:
        atomic_write(filepath, obj)

    def put_text(self, obj: str, filepath: str | Path, encoding: str = 'utf-8') -> None:
        atomic_write(filepath, obj, encoding=encoding)
