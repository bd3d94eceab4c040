"""A hook that makes RetinaNet's classification loss NaN from a given iteration on (tests only)."""
from mmengine.hooks import Hook
from mmengine.registry import HOOKS


@HOOKS.register_module()
class InjectNaNClassScoresHook(Hook):
    """From ``iteration`` (1-based) on, the classification branch outputs NaN."""

    def __init__(self, iteration: int) -> None:
        self.iteration = iteration

    def before_train_iter(self, runner, batch_idx, data_batch=None) -> None:
        if runner.iter + 1 == self.iteration:
            model = runner.model.module if hasattr(runner.model, 'module') else runner.model
            model.bbox_head.retina_cls.register_forward_hook(
                lambda module, inputs, output: output * float('nan'))
