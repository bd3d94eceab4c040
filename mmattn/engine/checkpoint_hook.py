"""A CheckpointHook whose checkpoints survive kills and full disks, and resume exactly."""
from __future__ import annotations

import os
import os.path as osp

from mmengine.dist import all_gather_object, get_world_size, is_main_process
from mmengine.fileio import LocalBackend, get_file_backend
from mmengine.hooks import CheckpointHook
from mmengine.registry import HOOKS

from .atomic import atomic_write, temporary_target
from .rng import get_rng_state


class CheckpointSaveError(OSError):
    """A checkpoint could not be written; the previous one is intact."""


@HOOKS.register_module()
class ResumableCheckpointHook(CheckpointHook):
    """mmengine's ``CheckpointHook`` (same arguments) with three guarantees added.

    - Atomic: into a local folder, every file is written to a temporary name, flushed, fsynced
      and renamed (:class:`~mmattn.engine.atomic.AtomicLocalBackend`), ``last_checkpoint``
      included. A kill or a full disk leaves the previous checkpoint, never a torn one.
    - Pruning after saving: with ``max_keep_ckpts``, mmengine deletes the oldest checkpoint
      *before* writing the new one, so a kill in between leaves ``last_checkpoint`` naming a
      deleted file; here the old one goes only after the new one and ``last_checkpoint`` are in
      place.
    - Exact resume: every checkpoint also holds each rank's random state and, for
      epoch-based training, the state at the start of the epoch, which
      :class:`~mmattn.engine.ResumableEpochBasedTrainLoop` restores.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._resume_state: list | None = None  # gathered for the checkpoint being written
        self._loaded_resume_state: list | None = None  # from the checkpoint the runner loaded
        self._stale: list[str] = []

    def before_train(self, runner) -> None:
        local = self.file_client_args is None and self.backend_args is None and isinstance(
            get_file_backend(self.out_dir or runner.work_dir), LocalBackend)
        if local:
            self.backend_args = dict(backend='atomic_local')
        super().before_train(runner)
        if local and is_main_process():
            self._remove_leftovers(runner)
        # The runner has loaded its checkpoint by now; hand its random states to the loop.
        if hasattr(runner.train_loop, 'resume_states'):
            runner.train_loop.resume_states = self._loaded_resume_state
        self._loaded_resume_state = None

    def _remove_leftovers(self, runner) -> None:
        """Delete temporary files of saves that a kill interrupted."""
        for name in sorted(os.listdir(self.out_dir)) if osp.isdir(self.out_dir) else []:
            target = temporary_target(name)
            if target is not None and (target.endswith('.pth') or target == 'last_checkpoint'):
                os.remove(osp.join(self.out_dir, name))
                runner.logger.info(f'Removed {name}, the unfinished write of a killed run.')

    # -- saving ----------------------------------------------------------------------------------

    def _save_checkpoint(self, runner) -> None:
        # Every rank is here at the same moment (after_train_iter / after_train_epoch), so the
        # random states can be gathered; only rank 0 writes them.
        state = {'iter': runner.iter + (0 if self.by_epoch else 1), 'rng': get_rng_state(),
                 'epoch_rng': getattr(runner.train_loop, 'epoch_rng_state', None)}
        self._resume_state = all_gather_object(state) if get_world_size() > 1 else [state]
        try:
            super()._save_checkpoint(runner)
        finally:
            self._resume_state = None

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        if self._resume_state is not None:
            checkpoint['resume_state'] = self._resume_state

    def _save_checkpoint_with_step(self, runner, step, meta) -> None:
        """mmengine's version, reordered: write, point ``last_checkpoint`` at it, then prune."""
        if self.max_keep_ckpts > 0:
            # Bookkeeping as mmengine does it (the list is saved in the message hub), but the
            # files leave the disk only after the new checkpoint is complete.
            if not (self.keep_ckpt_ids and self.keep_ckpt_ids[-1] == step):
                if len(self.keep_ckpt_ids) == self.max_keep_ckpts:
                    self._stale.append(self.file_backend.join_path(
                        self.out_dir, self.filename_tmpl.format(self.keep_ckpt_ids.popleft())))
                self.keep_ckpt_ids.append(step)
                runner.message_hub.update_info('keep_ckpt_ids', list(self.keep_ckpt_ids))

        previous = self.last_ckpt or runner.message_hub.get_info('last_ckpt')
        ckpt_filename = self.filename_tmpl.format(step)
        self.last_ckpt = self.file_backend.join_path(self.out_dir, ckpt_filename)
        runner.message_hub.update_info('last_ckpt', self.last_ckpt)
        try:
            runner.save_checkpoint(
                self.out_dir, ckpt_filename, self.file_client_args,
                save_optimizer=self.save_optimizer,
                save_param_scheduler=self.save_param_scheduler, meta=meta,
                by_epoch=self.by_epoch, backend_args=self.backend_args, **self.args)
            if is_main_process():
                atomic_write(osp.join(runner.work_dir, 'last_checkpoint'), self.last_ckpt)
        except OSError as err:
            failed, self.last_ckpt = self.last_ckpt, previous
            runner.message_hub.update_info('last_ckpt', previous)
            raise CheckpointSaveError(
                f'could not write checkpoint {failed}: {err.strerror or err}. The last complete '
                f"checkpoint is {previous or 'none (this was the first)'}; free space (or fix "
                'the folder) and run again with --resume to continue from it.') from err
        if not is_main_process():
            return
        while self._stale:
            path = self._stale.pop(0)
            if path == self.last_ckpt:
                continue
            if self.file_backend.isfile(path):
                self.file_backend.remove(path)
            elif self.file_backend.isdir(path):  # deepspeed writes folders
                self.file_backend.rmtree(path)

    # -- loading ---------------------------------------------------------------------------------

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        self._loaded_resume_state = checkpoint.get('resume_state')
