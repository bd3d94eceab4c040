"""Distributed runs that work without a GPU and never wait forever on a dead process.

- mmdet's configs ask for NCCL, and mmengine's ``init_dist`` calls ``torch.cuda.set_device``
  whatever the backend, so a CPU-only machine cannot start a distributed run at all. Without a
  GPU, mmattn switches the config to gloo, creates the process group itself (mmengine then uses
  it), and wraps the model in DDP without ``device_ids`` (which DDP refuses for a CPU module).
- Every collective gets a timeout (``env_cfg.dist_cfg.timeout``, seconds; 1800 unless the config
  says otherwise), so a rank whose peer hangs stops after at most that long. A peer that dies is
  noticed at the next collective (its sockets close): the survivor gets an error at once.
- :func:`distributed_fault_guard` turns those backend errors into one message that says what
  happened and how to continue, and closes the process group so the process exits normally.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import os.path as osp
import re
import subprocess
from collections.abc import Iterator

import torch
import torch.distributed as torch_dist
from mmengine.config import Config, ConfigDict
from mmengine.dist import get_rank, get_world_size, is_distributed

from mmattn.preflight import ConfigError

from .nonfinite import TrainingAborted

DEFAULT_TIMEOUT_S = 1800

# What gloo and NCCL say when a peer is gone or silent (gloo raises plain RuntimeErrors).
_PEER_FAILURE_SIGNS = ('connection reset by peer', 'connection closed by peer', 'broken pipe',
                       'timed out waiting', 'collective operation timeout', 'econnreset',
                       'nccl communicator was aborted', 'connection refused', 'gloo/transport')


class DistributedFaultError(TrainingAborted):
    """Another process of a distributed job died or stopped answering."""


def configure_distributed(cfg: Config) -> None:
    """Adjust ``cfg`` to its launcher: a collective timeout; on CPU, gloo and no device ids."""
    if cfg.get('launcher', 'none') == 'none':
        return
    if cfg.get('env_cfg') is None:
        cfg.env_cfg = ConfigDict()
    if cfg.env_cfg.get('dist_cfg') is None:
        cfg.env_cfg.dist_cfg = ConfigDict()
    dist_cfg = cfg.env_cfg.dist_cfg
    dist_cfg.setdefault('timeout', DEFAULT_TIMEOUT_S)
    if torch.cuda.is_available():
        return
    dist_cfg.backend = 'gloo'
    wrapper = cfg.get('model_wrapper_cfg') or ConfigDict(
        type='MMDistributedDataParallel', broadcast_buffers=False,
        find_unused_parameters=cfg.get('find_unused_parameters', False))
    wrapper.setdefault('device_ids', None)
    cfg.model_wrapper_cfg = wrapper


def init_distributed(cfg: Config) -> None:
    """On CPU, create the gloo process group mmengine's ``init_dist`` cannot (see module doc).

    With a GPU this does nothing: the Runner initialises NCCL from ``env_cfg.dist_cfg``.
    """
    launcher = cfg.get('launcher', 'none')
    if launcher == 'none' or torch.cuda.is_available() or is_distributed():
        return
    timeout = cfg.env_cfg.dist_cfg.get('timeout', DEFAULT_TIMEOUT_S)
    _set_env_from_launcher(launcher)
    missing = [name for name in ('RANK', 'WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT')
               if name not in os.environ]
    if missing:
        raise ConfigError(
            f"--launcher {launcher}: the environment lacks {', '.join(missing)}, which the "
            'launcher sets for every process. Start distributed runs with tools/dist_train.sh '
            '(torchrun) or tools/slurm_train.sh, or drop --launcher for a single process.')
    try:
        torch_dist.init_process_group(
            backend='gloo', timeout=datetime.timedelta(seconds=timeout))
    except Exception as err:
        raise DistributedFaultError(
            f"rank {os.environ.get('RANK')} of {os.environ.get('WORLD_SIZE')}: the processes "
            f"did not all join at {os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')} "
            f'within {timeout} s ({_first_line(err)}). Check that every process was started '
            'with the same MASTER_ADDR, PORT and number of processes.') from err


def _set_env_from_launcher(launcher: str) -> None:
    """RANK, WORLD_SIZE, LOCAL_RANK and the master address as mmengine derives them."""
    env = os.environ
    if launcher == 'slurm':
        if 'MASTER_ADDR' not in env:
            env['MASTER_ADDR'] = subprocess.getoutput(
                f"scontrol show hostname {env['SLURM_NODELIST']} | head -n1")
        env.setdefault('MASTER_PORT', '29500')
        env['WORLD_SIZE'] = env['SLURM_NTASKS']
        env['RANK'] = env['SLURM_PROCID']
        env['LOCAL_RANK'] = env.get('SLURM_LOCALID', '0')
    elif launcher == 'mpi':
        env.setdefault('MASTER_PORT', '29500')
        env['WORLD_SIZE'] = env['OMPI_COMM_WORLD_SIZE']
        env['RANK'] = env['OMPI_COMM_WORLD_RANK']
        env['LOCAL_RANK'] = env['OMPI_COMM_WORLD_LOCAL_RANK']


def is_peer_failure(err: BaseException) -> bool:
    """Whether ``err`` is a collective failing because another process died or hangs."""
    if isinstance(err, getattr(torch_dist, 'DistError', ())):
        return True
    return isinstance(err, RuntimeError) and any(
        sign in str(err).lower() for sign in _PEER_FAILURE_SIGNS)


@contextlib.contextmanager
def distributed_fault_guard(work_dir: str | None = None) -> Iterator[None]:
    """In a distributed run, report a dead or silent peer as :class:`DistributedFaultError`.

    The process group is destroyed first, so the process exits instead of aborting in the
    backend's destructor.
    """
    try:
        yield
    except Exception as err:
        if not is_distributed() or not is_peer_failure(err) or isinstance(err, TrainingAborted):
            raise
        rank, world = get_rank(), get_world_size()
        with contextlib.suppress(Exception):
            torch_dist.destroy_process_group()
        raise DistributedFaultError(
            f'rank {rank} of {world}: another process of this job died or stopped answering '
            f'({_first_line(err)}), so this one stops too instead of waiting for it. '
            f'{_resume_hint(work_dir)}') from err


def close_distributed() -> None:
    """End a distributed run that finished: wait for every process, then destroy the process
    group, so that the backend's threads are joined before the interpreter exits (left to the
    destructors at exit, a gloo process can abort with "terminate called without an active
    exception" after its work is done). Nothing outside a distributed run."""
    if is_distributed():
        torch_dist.barrier()
        torch_dist.destroy_process_group()


def _resume_hint(work_dir: str | None) -> str:
    last = None
    marker = osp.join(work_dir, 'last_checkpoint') if work_dir else None
    if marker and osp.isfile(marker):
        with open(marker) as f:
            last = f.read().strip() or None
    where = f'the last complete checkpoint, {last}' if last else 'its last complete checkpoint'
    return (f'Find the cause in the log of the process that failed first, then restart the whole '
            f'job with --resume: it continues from {where}.')


def _first_line(err: BaseException) -> str:
    """``RuntimeError: Read error [127.0.0.1]:8837: Connection reset by peer`` from gloo's text."""
    lines = str(err).strip().splitlines()
    text = re.sub(r'^\[[^\]]*\]\s*', '', lines[0] if lines else '')  # the C++ source location
    return f'{type(err).__name__}: {text.split(". ")[0].rstrip(".")}'
