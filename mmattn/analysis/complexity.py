"""Backbone parameters and FLOPs in the papers' convention, including the blocks' own work.

mmengine's counter (an fvcore port) counts convolutions, linear layers, matmuls and norms, one
multiply-add as one FLOP, and skips element-wise ops: the gating multiply, sigmoid, pooling reads,
which are most of what SE, SGE or CGD cost. Here the backbone is counted as mmengine counts it, and
every attention block is counted again with its element-wise ops included: one FLOP per output
element of an element-wise op, one per input element of a reduction (mean, sum, max, softmax).
Only the blocks get that treatment, so a plain ResNet counts exactly as mmengine counts it.
"""
from __future__ import annotations

from dataclasses import dataclass
from math import prod

import torch
import torch.nn as nn
from mmengine.analysis import FlopAnalyzer
from mmengine.analysis.jit_handles import get_shape

_ELEMENTWISE = ('aten::mul', 'aten::mul_', 'aten::add', 'aten::add_', 'aten::sub', 'aten::sub_',
                'aten::div', 'aten::div_', 'aten::sigmoid', 'aten::sigmoid_', 'aten::tanh',
                'aten::relu', 'aten::relu_', 'aten::addcmul', 'aten::addcmul_', 'aten::sqrt',
                'aten::rsqrt', 'aten::square', 'aten::pow', 'aten::exp', 'aten::maximum',
                'aten::where', 'aten::clamp', 'aten::clamp_min')
_REDUCTIONS = ('aten::mean', 'aten::sum', 'aten::amax', 'aten::max', 'aten::softmax',
               'aten::_softmax', 'aten::adaptive_avg_pool2d', 'aten::adaptive_max_pool2d',
               'aten::var', 'aten::std', 'aten::std_mean', 'aten::var_mean')


@dataclass(frozen=True)
class Complexity:
    """Counts for one model at one input size."""

    params: int
    flops: int
    """mmengine's count plus the attention blocks' element-wise work."""
    block_flops: int
    """The part of ``flops`` spent inside attention blocks (their convs and element-wise ops)."""


def _per_output_element(inputs, outputs) -> int:
    return prod(get_shape(outputs[0]) or [])


def _per_input_element(inputs, outputs) -> int:
    return prod(get_shape(inputs[0]) or [])


def _analyzer(model: nn.Module, inputs: tuple) -> FlopAnalyzer:
    analyzer = FlopAnalyzer(model, inputs)
    analyzer.unsupported_ops_warnings(False)
    analyzer.uncalled_modules_warnings(False)
    analyzer.tracer_warnings('none')
    return analyzer


def attention_block_types() -> tuple[type, ...]:
    """The module classes counted as attention blocks: mmattn's and mmcv's ContextBlock (GC)."""
    from mmcv.cnn import ContextBlock

    from mmattn import blocks
    return tuple(getattr(blocks, name) for name in blocks.__all__) + (ContextBlock, )


@torch.no_grad()
def model_complexity(model: nn.Module, input_shape: tuple[int, int, int]) -> Complexity:
    """Params and FLOPs of ``model`` (in eval mode) for one image of ``input_shape`` (C, H, W)."""
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        inputs = (torch.zeros(1, *input_shape, device=device), )
        plain = _analyzer(model, inputs)
        total = plain.total()
        block_names = [name for name, module in model.named_modules()
                       if isinstance(module, attention_block_types())]
        block_flops = 0
        if block_names:
            detailed = _analyzer(model, inputs)
            for op in _ELEMENTWISE:
                detailed.set_op_handle(op, _per_output_element)
            for op in _REDUCTIONS:
                detailed.set_op_handle(op, _per_input_element)
            with_ops, without_ops = detailed.by_module(), plain.by_module()
            block_flops = sum(with_ops[name] for name in block_names)
            total += block_flops - sum(without_ops[name] for name in block_names)
    finally:
        model.train(was_training)
    return Complexity(params=sum(p.numel() for p in model.parameters()), flops=total,
                      block_flops=block_flops)


def backbone_complexity(backbone_cfg: dict,
                        input_shape: tuple[int, int, int] = (3, 800, 1333)) -> Complexity:
    """Build a backbone from its config (no weights loaded) and count it.

    The default input is the papers' detection size, 1333 x 800; the backbone has no classifier, as
    in the papers' detection tables ("fc removed").
    """
    from mmengine.registry import MODELS
    cfg = dict(backbone_cfg)
    cfg['init_cfg'] = None
    return model_complexity(MODELS.build(cfg), input_shape)
