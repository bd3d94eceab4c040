"""Parameters and FLOPs in the papers' convention, plus the attention blocks' own work.

The papers' GFLOPs (SGE paper and PytorchInsight, mmdetection 1.x ``get_flops``) come from a
ptflops-style counter that hooks ``nn`` layers and counts

- convolutions and linear layers: one FLOP per multiply-add, plus one per output for a bias,
- batch norm (and other affine norms): 2 per element, ReLU: 1 per element,
- pooling: 1 per input element,

and nothing written as tensor arithmetic: the residual additions, and inside the attention
blocks the gating products, sigmoids, sums and normalisations. Counted that way, mmdet's
ResNet-50 at 1333x800 is 88.029 GFLOPs against the published 88.032 (the 2.15 M left is the
ImageNet network's global average pool, which their "fc removed" count kept and a detection
backbone does not have); R101 167.906 (167.908), SE-R50 88.150 (88.152), SGE-R50 88.147
(88.149), CBAM-R50 88.300 (88.302), and the whole ResNet-50 classifier at 224x224 4.122 (4.122).
mmengine's counter (87.807 for R50) skips ReLU and pooling; it is not used.

Here one pass over the model's aten ops gives two totals:

- ``papers_flops``: that convention everywhere. In a block it sees what the authors' blocks
  run as layers: convolutions, linear layers, norms, ReLU, pooling, and reductions of the
  block's input to one value per channel (their ``nn.AdaptiveAvgPool2d``).
- ``flops``: the same for the network outside the blocks, and every op inside the blocks:
  element-wise ops 1 per output element (``addcmul`` 2), other reductions and softmax 1 per
  input element, products of activations (``bmm``) as multiply-adds.

The model runs on fake tensors (shapes only, no arithmetic), so even R101 at 1333x800 takes
about a second; a model that needs real data falls back to one real forward pass.
"""
from __future__ import annotations

import contextlib
import os.path as osp
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from math import prod

import torch
import torch.nn as nn
from mmengine.registry import MODELS, DefaultScope
from torch.utils._python_dispatch import TorchDispatchMode

from .papers import PaperFigure, block_name, paper_figure

COUNTING_RULES = (
    "papers' convention (ptflops / mmdetection 1.x get_flops, as in the SGE paper): "
    'conv and linear multiply-adds (+1 per output for a bias), norms 2 and ReLU 1 per element, '
    'pooling 1 per input element; residual adds and other element-wise arithmetic not counted; '
    "in a block only its layers, ReLU and global pooling. 'all block ops' adds every op inside "
    'the attention blocks: element-wise 1 per output element, reductions and softmax 1 per input '
    'element, activation products as multiply-adds.')
"""One line saying what is counted, for tools to print beside their numbers."""

# aten op names (without the in-place '_') by category.
_MATMULS = frozenset({'convolution', 'addmm', 'mm', 'bmm', 'baddbmm'})
_LAYER_MATMULS = frozenset({'convolution', 'addmm'})  # what nn.Conv*/nn.Linear run
_NORMS = frozenset({
    'native_batch_norm', '_native_batch_norm_legit', '_native_batch_norm_legit_no_training',
    '_batch_norm_with_update', '_batch_norm_no_update', 'cudnn_batch_norm', 'miopen_batch_norm',
    'native_layer_norm', 'native_group_norm'})
_RELUS = frozenset({'relu', 'leaky_relu', 'elu', 'prelu', '_prelu_kernel', 'hardtanh'})
_POOLS = frozenset({
    'max_pool1d', 'max_pool2d', 'max_pool3d', 'max_pool2d_with_indices', 'avg_pool1d',
    'avg_pool2d', 'avg_pool3d', '_adaptive_avg_pool2d', 'adaptive_avg_pool1d',
    'adaptive_max_pool1d', 'adaptive_max_pool2d', 'upsample_nearest2d', 'upsample_bilinear2d'})
_REDUCTIONS = frozenset({
    'mean', 'sum', 'amax', 'amin', 'max', 'min', 'var', 'std', 'var_mean', 'std_mean', 'prod',
    'norm', 'linalg_vector_norm', 'logsumexp', '_softmax', 'softmax', '_log_softmax', 'cumsum'})
_ELEMENTWISE = frozenset({
    'add', 'sub', 'rsub', 'mul', 'div', 'neg', 'abs', 'sign', 'reciprocal', 'sqrt', 'rsqrt',
    'square', 'pow', 'exp', 'exp2', 'log', 'log2', 'sigmoid', 'tanh', 'hardsigmoid', 'silu',
    'gelu', 'softplus', 'erf', 'clamp', 'clamp_min', 'clamp_max', 'where', 'maximum', 'minimum',
    'gt', 'lt', 'ge', 'le', 'eq', 'ne', 'masked_fill', 'lerp', 'floor', 'ceil', 'round', 'sin',
    'cos', 'fmod', 'remainder'})
_TWO_PER_ELEMENT = frozenset({'addcmul', 'addcdiv'})


@dataclass(frozen=True)
class Complexity:
    """Counts for one model at one input size (see the module docstring for the rules)."""

    params: int
    flops: int
    """The papers' convention outside the attention blocks, every op inside them."""
    block_flops: int
    """The part of ``flops`` spent inside attention blocks."""
    papers_flops: int
    """The papers' convention everywhere, blocks included: comparable to their tables."""
    per_block: dict[str, int] = field(default_factory=dict, compare=False)
    """Every op inside each attention block, by module name."""


def attention_block_types() -> tuple[type, ...]:
    """The module classes counted as attention blocks: mmattn's and mmcv's ContextBlock (GC)."""
    from mmcv.cnn import ContextBlock

    from mmattn import blocks
    return tuple(getattr(blocks, name) for name in blocks.__all__) + (ContextBlock, )


def _first_tensor(value: object) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)):
        return next((v for v in value if isinstance(v, torch.Tensor)), None)
    return None


def _matmul_flops(name: str, args: Sequence, out: torch.Tensor) -> int:
    if name == 'convolution':
        inputs, weight, bias, transposed = args[0], args[1], args[2], args[6]
        # A transposed conv multiplies every input element by a kernel slice of this size.
        macs = (inputs if transposed else out).numel() * prod(weight.shape[1:])
        return macs + (out.numel() if bias is not None else 0)
    if name in ('addmm', 'baddbmm'):
        a, b = args[1], args[2]
        return a.numel() * b.shape[-1] + out.numel()
    a, b = args[0], args[1]
    return a.numel() * b.shape[-1]


def _reduced_dims(args: Sequence, ndim: int) -> tuple[int, ...]:
    dims = args[1] if len(args) > 1 else None
    if dims is None or (isinstance(dims, (list, tuple)) and not dims):
        return tuple(range(ndim))
    if isinstance(dims, int):
        dims = (dims, )
    return tuple(d % ndim for d in dims)


class _OpCounter(TorchDispatchMode):
    """Counts every aten op that runs, under both conventions, attributed to attention blocks.

    ``enter_block`` / ``exit_block`` (called from forward hooks) keep the stack of the attention
    blocks being run, with the shape of the outermost one's input.
    """

    def __init__(self) -> None:
        super().__init__()
        self.outside = 0
        self.papers_inside = 0
        self.per_block: Counter[str] = Counter()
        self._stack: list[tuple[str, torch.Size]] = []

    def enter_block(self, name: str, shape: torch.Size) -> None:
        self._stack.append((name, shape))

    def exit_block(self) -> None:
        self._stack.pop()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name.endswith('_') and not name.startswith('_'):
            name = name[:-1]
        result = _first_tensor(out)
        if result is None:
            return out
        all_ops, papers = self._flops(name, args, result)
        if self._stack:
            self.per_block[self._stack[0][0]] += all_ops
            self.papers_inside += papers
        else:
            self.outside += papers
        return out

    def _flops(self, name: str, args: Sequence, out: torch.Tensor) -> tuple[int, int]:
        """(every op's count, the papers' count) of one op."""
        if name in _MATMULS:
            flops = _matmul_flops(name, args, out)
            return flops, (flops if name in _LAYER_MATMULS or not self._stack else 0)
        if name in _NORMS:
            weight = next((a for a in args[1:3] if isinstance(a, torch.Tensor)), None)
            flops = args[0].numel() * (2 if weight is not None else 1)
            return flops, flops
        if name in _RELUS:
            return out.numel(), out.numel()
        if name in _POOLS:
            flops = out.numel() if name.startswith('upsample') else args[0].numel()
            return flops, flops
        if name in _REDUCTIONS:
            flops = args[0].numel()
            return flops, (flops if self._is_global_pool(name, args, out) else 0)
        if name in _ELEMENTWISE:
            return out.numel(), 0
        if name in _TWO_PER_ELEMENT:
            return 2 * out.numel(), 0
        return 0, 0

    def _is_global_pool(self, name: str, args: Sequence, out: torch.Tensor) -> bool:
        """Outside blocks every reduction is a pooling layer (a classifier's global pool);
        inside a block, one that pools the block's input to one value per channel."""
        if not self._stack:
            return True
        shape = self._stack[0][1]
        inputs = args[0]
        return (name in ('mean', 'sum', 'amax', 'max') and len(shape) > 2
                and inputs.numel() == prod(shape) and out.numel() == shape[0] * shape[1]
                and min(_reduced_dims(args, inputs.dim())) >= 2)


@contextlib.contextmanager
def _block_hooks(model: nn.Module, counter: _OpCounter) -> Iterator[None]:
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, attention_block_types()):
            handles.append(module.register_forward_pre_hook(
                lambda _, inputs, name=name: counter.enter_block(name, inputs[0].shape)))
            handles.append(module.register_forward_hook(
                lambda *_: counter.exit_block()))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _fake_mode() -> contextlib.AbstractContextManager:
    from torch._subclasses.fake_tensor import FakeTensorMode
    return FakeTensorMode(allow_non_fake_inputs=True)


def _count(model: nn.Module, input_shape: tuple[int, ...], fake: bool) -> _OpCounter:
    counter = _OpCounter()
    device = next(model.parameters(), torch.empty(0)).device
    with contextlib.ExitStack() as stack:
        if fake:
            stack.enter_context(_fake_mode())
        inputs = torch.zeros(1, *input_shape, device=device)
        stack.enter_context(_block_hooks(model, counter))
        stack.enter_context(counter)
        model(inputs)
    return counter


@torch.no_grad()
def model_complexity(model: nn.Module, input_shape: tuple[int, int, int]) -> Complexity:
    """Params and FLOPs of ``model`` (in eval mode) for one image of ``input_shape`` (C, H, W).

    The model is called as ``model(images)``; its weights are not changed.
    """
    was_training = model.training
    model.eval()
    try:
        try:
            counter = _count(model, input_shape, fake=True)
        except Exception:  # an op that needs real values: count one real forward pass instead
            counter = _count(model, input_shape, fake=False)
    finally:
        model.train(was_training)
    block_flops = sum(counter.per_block.values())
    return Complexity(
        params=sum(p.numel() for p in model.parameters()),
        flops=counter.outside + block_flops,
        block_flops=block_flops,
        papers_flops=counter.outside + counter.papers_inside,
        per_block=dict(counter.per_block))


def backbone_complexity(backbone_cfg: dict,
                        input_shape: tuple[int, int, int] = (3, 800, 1333)) -> Complexity:
    """Build a backbone from its config (no weights loaded) and count it.

    The default input is the papers' detection size, 1333 x 800; the backbone has no classifier, as
    in the papers' detection tables ("fc removed").
    """
    cfg = dict(backbone_cfg)
    cfg['init_cfg'] = None
    return model_complexity(MODELS.build(cfg), input_shape)


@dataclass(frozen=True)
class ConfigComplexity:
    """The counts of one config beside the papers' figures.

    Attributes:
        config (str): The config's name (file name without ``.py``).
        task (str): ``'detection'`` (the backbone alone, fc removed) or ``'classification'``
            (the whole classifier).
        block (str, optional): The attention block's short name, None for a plain ResNet.
        depth (int, optional): The ResNet depth.
        input_shape (tuple): (C, H, W) counted.
        complexity (Complexity): The counts.
        paper (PaperFigure, optional): The published row for (block, depth), if any.
    """

    config: str
    task: str
    block: str | None
    depth: int | None
    input_shape: tuple[int, int, int]
    complexity: Complexity
    paper: PaperFigure | None


def config_complexity(config: str, shape: tuple[int, int] | None = None) -> ConfigComplexity:
    """Count the model of a config file, no dataset and no weights needed.

    A detector config counts its backbone at ``shape`` (H, W), default 800 x 1333, as the
    papers' detection tables do (fc removed). An MMPretrain classifier config counts the whole
    classifier at ``shape``, default 224 x 224, as the papers' ImageNet table does.
    """
    from mmattn.apis import load_config
    cfg = load_config(config)
    scope = cfg.get('default_scope', 'mmdet')
    backbone = cfg.model.get('backbone', {})
    plugin_types = {plugin['cfg']['type'] for plugin in backbone.get('plugins') or []}
    block = block_name(plugin_types)
    depth = backbone.get('depth')
    classifier = scope == 'mmpretrain' or cfg.model.get('type') == 'ImageClassifier'
    task = 'classification' if classifier else 'detection'
    height, width = shape or ((224, 224) if classifier else (800, 1333))
    input_shape = (3, height, width)
    with DefaultScope.overwrite_default_scope(scope):
        if classifier:
            model_cfg = cfg.model.copy()
            model_cfg['init_cfg'] = None
            model_cfg['backbone'] = dict(backbone, init_cfg=None)
            complexity = model_complexity(MODELS.build(model_cfg), input_shape)
        else:
            complexity = backbone_complexity(backbone, input_shape)
    name = osp.splitext(osp.basename(config))[0]
    return ConfigComplexity(name, task, block, depth, input_shape, complexity,
                            paper_figure(block, depth, task))


def complexity_table(rows: Sequence[ConfigComplexity]) -> str:
    """Markdown: our #P and GFLOPs (papers' convention and with all block ops) beside the
    papers', and the difference in percent."""
    def number(value: float | None, digits: int) -> str:
        return '-' if value is None else f'{value:.{digits}f}'

    def difference(ours: float, paper: float | None) -> str:
        if paper is None:
            return '-'
        return f'{ours - paper:+.3f} ({100 * (ours - paper) / paper:+.2f}%)'

    header = ['config', 'counted', 'input', '#P (M)', 'paper #P (M)',
              "GFLOPs (papers' convention)", 'paper GFLOPs', 'difference',
              'GFLOPs, all block ops', 'in blocks']
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    for row in rows:
        c, paper = row.complexity, row.paper
        params, gflops = c.params / 1e6, c.papers_flops / 1e9
        counted = 'backbone, fc removed' if row.task == 'detection' else 'classifier'
        cells = [row.config, counted, f'{row.input_shape[2]}x{row.input_shape[1]}',
                 f'{params:.2f}', number(paper and paper.params_m, 2), f'{gflops:.3f}',
                 number(paper and paper.gflops, 3), difference(gflops, paper and paper.gflops),
                 f'{c.flops / 1e9:.3f}', f'{c.block_flops / 1e9:.3f}']
        lines.append('| ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)
