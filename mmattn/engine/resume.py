"""Choose the checkpoint ``--resume`` continues from: the newest one that is complete and sound.

mmengine resumes from whatever ``<work_dir>/last_checkpoint`` names and crashes if that file is
truncated or corrupt. Here every candidate is read in full first (zip CRCs checked, unpickled with
weights_only), and a bad one is reported and skipped in favour of the next older checkpoint.
"""
from __future__ import annotations

import logging
import os
import os.path as osp
import re
import zipfile

from mmengine.logging import print_log

from mmattn.checkpoint.safe_load import CheckpointRefusedError, load_checkpoint_file
from mmattn.preflight import ConfigError, DataNotFoundError

# The names mmengine's CheckpointHook gives checkpoints (filename_tmpl defaults).
_CHECKPOINT_NAME = re.compile(r'^(?:epoch|iter)_(\d+)\.pth$')


class CorruptCheckpointError(ConfigError):
    """A checkpoint file is truncated, damaged or not a training checkpoint."""


def verify_checkpoint(path: str, *, for_resume: bool = True) -> dict:
    """Read ``path`` completely and return it; raise if it is torn, corrupt or unsafe.

    Raises:
        CorruptCheckpointError: Truncated or damaged (a CRC mismatch in the zip, an unreadable
            pickle), or for ``for_resume`` lacking the ``meta`` / ``state_dict`` a resume needs.
        CheckpointRefusedError: The file carries pickled code (never executed).
    """
    if not osp.isfile(path):
        raise DataNotFoundError(f"checkpoint '{path}' does not exist.")
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                damaged = archive.testzip()
            if damaged is not None:
                raise CorruptCheckpointError(f'{path}: record {damaged} fails its CRC check')
        checkpoint = load_checkpoint_file(path)
    except (CorruptCheckpointError, CheckpointRefusedError):
        raise
    except Exception as err:  # torch reports a torn file as RuntimeError, EOFError, ...
        reason = str(err).strip().split('. ')[0].splitlines()[0][:200]
        raise CorruptCheckpointError(
            f'{path}: truncated or corrupt ({type(err).__name__}: {reason})') from err
    if for_resume:
        meta = checkpoint.get('meta') if isinstance(checkpoint, dict) else None
        if not isinstance(meta, dict) or 'iter' not in meta or 'state_dict' not in checkpoint:
            raise CorruptCheckpointError(
                f'{path}: not a training checkpoint (it lacks meta.iter or state_dict); '
                'resume needs one written by tools/train.py')
    return checkpoint


def checkpoint_candidates(work_dir: str) -> list[str]:
    """Checkpoints to try, best first: the one ``last_checkpoint`` names, then older ones.

    The others are those in the same folder (and in ``work_dir``) named like mmengine's
    checkpoints, newest step first.
    """
    named = None
    marker = osp.join(work_dir, 'last_checkpoint')
    if osp.isfile(marker):
        with open(marker) as f:
            named = f.read().strip() or None
    folders = {work_dir} | ({osp.dirname(named)} if named else set())
    found = []
    for folder in folders:
        if not osp.isdir(folder):
            continue
        for name in os.listdir(folder):
            match = _CHECKPOINT_NAME.match(name)
            if match:
                found.append((int(match.group(1)), osp.join(folder, name)))
    ordered = [path for _, path in sorted(found, reverse=True)]
    if named is not None:
        ordered = [named] + [p for p in ordered if osp.abspath(p) != osp.abspath(named)]
    return ordered


def find_resumable_checkpoint(work_dir: str) -> str | None:
    """The newest sound checkpoint of ``work_dir`` (see :func:`checkpoint_candidates`), or None.

    Each unusable candidate is logged with the reason, and the next older one is tried. A file
    that carries pickled code stops the search with :class:`CheckpointRefusedError`: someone
    replaced a checkpoint, which a silent fallback would hide.
    """
    for path in checkpoint_candidates(work_dir):
        if not osp.isfile(path):
            print_log(f'Resume: {path} (named by last_checkpoint) does not exist; trying the '
                      'previous checkpoint.', logger='current', level=logging.WARNING)
            continue
        try:
            verify_checkpoint(path)
        except CorruptCheckpointError as err:
            print_log(f'Resume: skipping {err}. Falling back to the previous checkpoint.',
                      logger='current', level=logging.WARNING)
            continue
        return path
    return None
