"""Training loops that resume exactly where a checkpoint was taken, also inside an epoch.

mmengine's ``EpochBasedTrainLoop`` resumed from an iteration checkpoint starts the epoch over, so a
killed run ends with more iterations than one that was never killed; neither of mmengine's loops
restores the random state, so data augmentation after a resume differs from the unkilled run.
These loops (mmattn's training swaps them in for mmengine's) fix both:

- The batches of the current epoch that were trained before the checkpoint are drawn again from
  the dataloader but not trained on, so the sampler, the batch sampler and the dataloader workers
  are where they were (drawing them costs their data-loading time, not their training time).
- The random state of every rank at the checkpoint (saved by
  :class:`~mmattn.engine.ResumableCheckpointHook`) is restored just before the first batch that
  is trained, and for a resume inside an epoch, the state at that epoch's start is restored before
  its dataloader is created, so dataloader workers get the same seeds.
- Validation runs with the random state saved and restored around it, so evaluating (or being
  killed before an evaluation) never changes what training draws afterwards.
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

from mmengine.dist import get_rank, get_world_size
from mmengine.logging import print_log
from mmengine.registry import LOOPS
from mmengine.runner import EpochBasedTrainLoop, IterBasedTrainLoop

from .rng import get_rng_state, set_rng_state


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Run a block (an evaluation) without changing the random state seen after it."""
    state = get_rng_state()
    try:
        yield
    finally:
        set_rng_state(state)


class _ResumableMixin:
    """What both loops share: the loaded resume state of this rank, and validation."""

    # Set by ResumableCheckpointHook.before_train: the 'resume_state' list (one entry per rank)
    # of the checkpoint the runner loaded, if any.
    resume_states: list | None = None
    # The random state when the current epoch's dataloader iterator was created.
    epoch_rng_state: dict | None = None

    def _take_resume_state(self) -> dict | None:
        """This rank's saved state if the runner resumed from a checkpoint that has one."""
        states, self.resume_states = self.resume_states, None
        if self._iter == 0:
            return None  # load_from (weights only) or a fresh start: nothing to continue
        if not states:
            print_log('The checkpoint holds no random state (it was not written by '
                      'ResumableCheckpointHook): training continues at the right iteration, but '
                      'random augmentation will differ from an uninterrupted run.',
                      logger='current', level=logging.WARNING)
            return None
        if len(states) != get_world_size():
            print_log(f'The checkpoint was written by {len(states)} processes, this run has '
                      f'{get_world_size()}: the random state is not restored.',
                      logger='current', level=logging.WARNING)
            return None
        state = states[get_rank()]
        if state.get('iter') != self._iter:
            print_log(f"The checkpoint's random state belongs to iteration {state.get('iter')}, "
                      f'not {self._iter}: it is not restored.',
                      logger='current', level=logging.WARNING)
            return None
        return state

    def _validate(self) -> None:
        with preserved_rng():
            self.runner.val_loop.run()


@LOOPS.register_module()
class ResumableEpochBasedTrainLoop(_ResumableMixin, EpochBasedTrainLoop):
    """``EpochBasedTrainLoop`` that resumes inside an epoch and restores the random state.

    Same arguments as mmengine's ``EpochBasedTrainLoop``.
    """

    def run(self):
        self.runner.call_hook('before_train')
        resume = self._take_resume_state()
        while self._epoch < self._max_epochs and not self.stop_training:
            self.run_epoch(resume)
            resume = None
            self._decide_current_val_interval()
            if (self.runner.val_loop is not None and self._epoch >= self.val_begin
                    and (self._epoch % self.val_interval == 0
                         or self._epoch == self._max_epochs)):
                self._validate()
        self.runner.call_hook('after_train')
        return self.runner.model

    def run_epoch(self, resume: dict | None = None) -> None:
        """Iterate one epoch; after a resume, skip the batches trained before the checkpoint."""
        done = self._batches_done()
        if resume is not None and done == 0:
            set_rng_state(resume['rng'])
        self.runner.call_hook('before_train_epoch')
        self.runner.model.train()
        if resume is not None and done > 0 and resume.get('epoch_rng') is not None:
            set_rng_state(resume['epoch_rng'])
        self.epoch_rng_state = get_rng_state()
        batches = iter(self.dataloader)
        if done:
            print_log(f'Resuming inside epoch {self._epoch + 1}: drawing its first {done} batches '
                      'again without training on them.', logger='current')
            for _ in range(done):
                next(batches)
            if resume is not None:
                set_rng_state(resume['rng'])
        for idx, data_batch in enumerate(batches, start=done):
            self.run_iter(idx, data_batch)
        self.runner.call_hook('after_train_epoch')
        self._epoch += 1

    def _batches_done(self) -> int:
        """Batches of the current epoch trained before the checkpoint this run resumed from."""
        done = self._iter - self._epoch * len(self.dataloader)
        if 0 <= done <= len(self.dataloader):
            return done
        print_log(f'Iteration {self._iter} does not fall in epoch {self._epoch + 1} of '
                  f'{len(self.dataloader)} batches (was the batch size or the number of '
                  'processes changed?): the epoch starts over.',
                  logger='current', level=logging.WARNING)
        return 0


@LOOPS.register_module()
class ResumableIterBasedTrainLoop(_ResumableMixin, IterBasedTrainLoop):
    """``IterBasedTrainLoop`` that restores the random state after skipping trained batches.

    Same arguments as mmengine's ``IterBasedTrainLoop``.
    """

    def run(self):
        self.runner.call_hook('before_train')
        resume = self._take_resume_state()
        self.runner.call_hook('before_train_epoch')
        if self._iter > 0:
            print_log(f'Resuming at iteration {self._iter}: drawing the batches before it again '
                      'without training on them.', logger='current')
            for _ in range(self._iter):
                next(self.dataloader_iterator)
            if resume is not None:
                set_rng_state(resume['rng'])
        while self._iter < self._max_iters and not self.stop_training:
            self.runner.model.train()
            data_batch = next(self.dataloader_iterator)
            self.run_iter(data_batch)
            self._decide_current_val_interval()
            if (self.runner.val_loop is not None and self._iter >= self.val_begin
                    and (self._iter % self.val_interval == 0
                         or self._iter == self._max_iters)):
                self._validate()
        self.runner.call_hook('after_train_epoch')
        self.runner.call_hook('after_train')
        return self.runner.model
