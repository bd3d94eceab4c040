"""Convert the attention papers' ImageNet checkpoints into AttnResNet classifier checkpoints.

The authors published ImageNet weights in their own layouts: torchvision-style ResNets, usually
saved under DataParallel (keys prefixed ``module.``), with each attention module named as their
code names it. :func:`convert_checkpoint` turns such a file into an mmengine checkpoint
``{'state_dict': ..., 'meta': ...}`` in MMPretrain's ImageClassifier layout
(``backbone.<AttnResNet key>``, ``head.fc.weight``, ``head.fc.bias``). That one file loads

- into ``ImageClassifier(backbone=dict(type='AttnResNet', ...), neck=GlobalAveragePooling,
  head=LinearClsHead)`` with no missing and no unexpected keys (``load_from``), and
- into a detector's backbone with
  ``init_cfg=dict(type='Pretrained', prefix='backbone.', checkpoint=...)``.

Each source format is one entry of :data:`SOURCE_FORMATS`: its key rules are a table of
full-key patterns and their AttnResNet names. The backbone config that fits the weights (depth,
width, and the ``plugins`` list with the block type, position, stages, blocks and the arguments
read from the tensor shapes) is inferred from the converted keys through :data:`PLUGIN_RULES`.

Nothing is guessed or written silently: the source is read with torch's weights_only loader (a
file that carries pickled code is refused before any of it runs), a file that matches no known
format is refused, every source key that no rule places is reported (and refused unless
``allow_unplaced``), the converted weights are loaded with ``strict=True`` into the inferred
classifier before anything is written, an existing destination is kept unless ``force``, and the
file is written to a temporary name and moved into place in one step.
"""
from __future__ import annotations

import contextlib
import copy
import os
import pickle
import re
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from mmdet.models.backbones.resnet import Bottleneck

from ..backbones import AttnResNet
from ..version import __version__

Tensor = torch.Tensor

# DataParallel and DistributedDataParallel save the wrapped model's keys under this prefix.
WRAPPER_PREFIX = 'module.'
# The keys of the linear head an ImageNet checkpoint converts to (LinearClsHead.fc).
HEAD_KEYS = ('head.fc.weight', 'head.fc.bias')


class ConversionError(ValueError):
    """A checkpoint that cannot be converted safely; the message says why and what to do."""


# ---------------------------------------------------------------------------------------------
# Key rules: one table per source format


def _conv1x1_as_linear(tensor: Tensor) -> Tensor:
    """A 1x1 conv weight (out, in, 1, 1) as the Linear weight (out, in); biases pass unchanged."""
    return tensor.flatten(1) if tensor.dim() == 4 else tensor


@dataclass(frozen=True)
class KeyRule:
    """A source key matching ``pattern`` (the whole key) becomes ``template`` (``re`` syntax).

    ``transform``, when given, reshapes the tensor to the AttnResNet parameter's shape.
    """

    pattern: str
    template: str
    transform: Callable[[Tensor], Tensor] | None = None


_LAYER = r'(layer[1-4]\.\d+)'
_STEM_AND_BLOCKS = (
    KeyRule(r'(conv1|bn1)\.(\w+)', r'backbone.\1.\2'),
    KeyRule(_LAYER + r'\.(conv[1-3]|bn[1-3]|downsample\.[01])\.(\w+)', r'backbone.\1.\2.\3'),
)
_FC = KeyRule(r'fc\.(weight|bias)', r'head.fc.\1')
_GSOP_LAYERS = ('conv_for_DR', 'bn_for_DR', 'row_bn', 'row_conv_group', 'fc_adapt_channels',
                'conv_for_DR_spatial', 'bn_for_DR_spatial', 'row_bn_for_spatial',
                'row_conv_group_for_spatial', 'fc_adapt_channels_for_spatial')
_PLUGIN_ABBRS = ('se', 'sge', 'cbam', 'eca', 'cgd', 'gsop')


@dataclass(frozen=True)
class SourceFormat:
    """One published checkpoint layout and how its keys become AttnResNet classifier keys.

    Attributes:
        name (str): The ``--format`` name.
        source (str): Whose checkpoints these are and how they were saved.
        stem (str): A key every checkpoint of the format has (the stem conv).
        signature (str): A key pattern that identifies the format in auto-detection; for the
            plain ResNet layout it only applies when no other format's signature matches.
        rules (tuple[KeyRule]): Tried in order; the first whose pattern matches places a key.
        imagenet_backbone (dict): AttnResNet arguments, beyond depth, width and plugins, that
            the authors' ImageNet network needs (used for the classifier, not for detectors).
        note (str): Printed with every conversion of this format.
    """

    name: str
    source: str
    stem: str
    signature: str
    rules: tuple[KeyRule, ...]
    imagenet_backbone: Mapping = field(default_factory=dict)
    note: str = ''


SOURCE_FORMATS: dict[str, SourceFormat] = {fmt.name: fmt for fmt in (
    SourceFormat(
        name='pytorchinsight',
        source='implus/PytorchInsight SE/SGE/CBAM/BAM ResNets (DataParallel)',
        stem=r'conv1\.weight',
        signature=(r'(?:layer[1-4]\.\d+\.(?:se\.fc\.0|sge|cbam\.ChannelGate\.mlp\.1)'
                   r'|bam1\.channel_att\.gate_c\.gate_c_fc_0)\.weight'),
        rules=(
            *_STEM_AND_BLOCKS,
            KeyRule(_LAYER + r'\.se\.(fc\.[02]\.(?:weight|bias))', r'backbone.\1.se.\2'),
            KeyRule(_LAYER + r'\.sge\.(weight|bias)', r'backbone.\1.sge.\2'),
            KeyRule(_LAYER + r'\.cbam\.(ChannelGate\.mlp\.[13]\.(?:weight|bias)'
                    r'|SpatialGate\.spatial\.conv\.weight|SpatialGate\.spatial\.bn\.\w+)',
                    r'backbone.\1.cbam.\2'),
            KeyRule(r'(bam[1-3])\.(channel_att\.gate_c\.gate_c_(?:fc_0|bn_1|fc_final)\.\w+'
                    r'|spatial_att\.gate_s\.gate_s_(?:conv_reduce0|bn_reduce0|conv_di_[01]'
                    r'|bn_di_[01]|conv_final)\.\w+)', r'backbone.\1.\2'),
            _FC,
        )),
    SourceFormat(
        name='cgd',
        source='HolmesShuan/Compact-Global-Descriptor ImageNet ResNets (DataParallel)',
        stem=r'conv1\.weight',
        signature=r'layer[1-4]\.\d+\.attention\.w0',
        rules=(
            *_STEM_AND_BLOCKS,
            KeyRule(_LAYER + r'\.attention\.(w[0-2]|bias[0-2])', r'backbone.\1.cgd.\2'),
            _FC,
        )),
    SourceFormat(
        name='gsop',
        source='ZilinGao/Global-Second-order-Pooling-Convolutional-Networks GSoP-Net1 '
               '(DataParallel)',
        stem=r'conv1\.weight',
        signature=r'layer[1-4]\.\d+\.conv_for_DR(?:_spatial)?\.weight',
        rules=(
            *_STEM_AND_BLOCKS,
            KeyRule(_LAYER + rf'\.((?:{"|".join(_GSOP_LAYERS)})\.\w+)', r'backbone.\1.gsop.\2'),
            _FC,
        ),
        imagenet_backbone=dict(strides=(1, 2, 2, 1)),
        note='GSoP-Net1 runs stage 4 at stride 1 on ImageNet, so the classifier config sets '
             'strides=(1, 2, 2, 1); detectors keep the standard strides (the backbone config).'),
    SourceFormat(
        name='eca',
        source='BangguWu/ECANet ECA-ResNets (DataParallel)',
        stem=r'conv1\.weight',
        signature=r'layer[1-4]\.\d+\.eca\.conv\.weight',
        rules=(
            *_STEM_AND_BLOCKS,
            KeyRule(_LAYER + r'\.eca\.conv\.weight', r'backbone.\1.eca.conv.weight'),
            _FC,
        )),
    SourceFormat(
        name='mmpretrain',
        source='MMPretrain ImageClassifier with a ResNet, SEResNet or AttnResNet backbone',
        stem=r'backbone\.conv1\.weight',
        signature=r'backbone\.conv1\.weight',
        rules=(
            *(KeyRule('backbone\\.' + rule.pattern, rule.template) for rule in _STEM_AND_BLOCKS),
            KeyRule(r'backbone\.' + _LAYER + r'\.se_layer\.conv1\.conv\.(weight|bias)',
                    r'backbone.\1.se.fc.0.\2', _conv1x1_as_linear),
            KeyRule(r'backbone\.' + _LAYER + r'\.se_layer\.conv2\.conv\.(weight|bias)',
                    r'backbone.\1.se.fc.2.\2', _conv1x1_as_linear),
            KeyRule(r'backbone\.' + _LAYER + rf'\.((?:{"|".join(_PLUGIN_ABBRS)})\..+)',
                    r'backbone.\1.\2'),
            KeyRule(r'backbone\.(bam[1-3]\..+)', r'backbone.\1'),
            KeyRule(r'head\.fc\.(weight|bias)', r'head.fc.\1'),
        )),
    SourceFormat(
        name='torchvision',
        source='torchvision ResNets (plain keys and fc)',
        stem=r'conv1\.weight',
        signature=r'conv1\.weight',
        rules=(*_STEM_AND_BLOCKS, _FC)),
)}
# Recognised only when no other format's signature matches: every layout has its keys.
FALLBACK_FORMAT = 'torchvision'


# ---------------------------------------------------------------------------------------------
# Plugin rules: from the converted keys to the AttnResNet plugins config


def _ratio(hidden: int, channels: int) -> float:
    return hidden / channels


@dataclass(frozen=True)
class PluginRule:
    """How one block type shows up in converted keys, and how its config is read from them.

    Attributes:
        abbr (str): Its submodule name (``layer1.0.<abbr>``; after a stage ``<abbr><stage>``).
        type (str): Its registry name.
        position (str): Its AttnResNet position in a Bottleneck; ``after_conv3`` means the
            last conv + BN, which is ``after_conv2`` in a BasicBlock.
        infer (callable): Its tensors (keys relative to the module) -> its cfg arguments.
    """

    abbr: str
    type: str
    position: str
    infer: Callable[[Mapping[str, Tensor]], dict]


def _gsop_args(tensors: Mapping[str, Tensor]) -> dict:
    channel = 'conv_for_DR.weight' in tensors
    position = 'conv_for_DR_spatial.weight' in tensors
    mode = 'sum' if channel and position else 'channel' if channel else 'position'
    reduce = tensors['conv_for_DR.weight' if channel else 'conv_for_DR_spatial.weight']
    return dict(mode=mode, att_dim=reduce.shape[0])


PLUGIN_RULES: tuple[PluginRule, ...] = (
    PluginRule('cgd', 'CompactGlobalDescriptor', 'after_conv1_pre_norm',
               lambda t: dict(mode='cascade' if 'w1' in t else 'plain')),
    PluginRule('se', 'SqueezeExcitation', 'after_conv3',
               lambda t: dict(rd_ratio=_ratio(*t['fc.0.weight'].shape))),
    PluginRule('sge', 'SpatialGroupEnhance', 'after_conv3',
               lambda t: dict(groups=t['weight'].shape[1])),
    PluginRule('cbam', 'ConvolutionalBlockAttention', 'after_conv3',
               lambda t: dict(rd_ratio=_ratio(*t['ChannelGate.mlp.1.weight'].shape))),
    PluginRule('eca', 'EfficientChannelAttention', 'after_conv3',
               lambda t: dict(kernel_size=t['conv.weight'].shape[-1])),
    PluginRule('gsop', 'GlobalSecondOrderPooling', 'after_conv3', _gsop_args),
    PluginRule('bam', 'BottleneckAttention', 'after_stage',
               lambda t: dict(rd_ratio=_ratio(*t['channel_att.gate_c.gate_c_fc_0.weight'].shape))),
)


# ---------------------------------------------------------------------------------------------
# The result


@dataclass
class Conversion:
    """A converted state dict and the configs it fits.

    Attributes:
        source_format (str): The format's name (see :data:`SOURCE_FORMATS`).
        state_dict (dict): ``backbone.*`` and (with a head) ``head.fc.*`` tensors.
        depth (int): The ResNet depth.
        backbone (dict): The AttnResNet config these weights fit (for a detector).
        classifier (dict | None): The ImageClassifier config they fit, None without a head.
        unplaced (dict): Source key -> why no AttnResNet key was found for it.
        notes (list[str]): What else a user should know about this conversion.
    """

    source_format: str
    state_dict: dict[str, Tensor]
    depth: int
    backbone: dict
    classifier: dict | None
    unplaced: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# Reading the source


def load_source(path: str | os.PathLike) -> dict[str, object]:
    """The state dict in ``path``, read with torch's weights_only loader.

    Accepts a raw state dict, ``{'state_dict': ...}`` and ``{'model': ...}``. A file that asks
    to run pickled code (any global outside torch's and mmattn's allowlist) is refused before
    the code runs.
    """
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f'{path}: no such file.')
    try:
        checkpoint = torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r'Unsupported global: GLOBAL (\S+)', str(err))
        what = f'the global {found.group(1)}' if found else str(err).splitlines()[-1]
        raise ConversionError(
            f'{path}: refused: the file asks to run pickled code ({what}), which a file of '
            'weights does not need; nothing in it was run. Convert only checkpoints from a '
            'source you trust, saved as tensors (torch.save(model.state_dict(), ...)).') from None
    except (RuntimeError, OSError, EOFError) as err:
        raise ConversionError(f'{path}: not a readable torch checkpoint ({err}).') from None
    if isinstance(checkpoint, Mapping):
        for key in ('state_dict', 'model'):
            if isinstance(checkpoint.get(key), Mapping):
                return dict(checkpoint[key])
        if any(isinstance(value, Tensor) for value in checkpoint.values()):
            return dict(checkpoint)
        kind = f'a dict with keys {_first(checkpoint)}'
    else:
        kind = f'a {type(checkpoint).__name__}'
    raise ConversionError(
        f'{path}: no state dict found: expected a dict of tensors, or one under "state_dict" '
        f'or "model"; the file holds {kind}.')


def _first(keys, count: int = 5) -> str:
    keys = list(keys)
    shown = ', '.join(map(str, keys[:count]))
    return shown + (f', ... ({len(keys)} keys)' if len(keys) > count else '')


def _unwrap(state_dict: Mapping[str, object]) -> tuple[dict[str, object], str]:
    """Drop the DataParallel prefix when every key has it; returns the dict and the prefix."""
    if state_dict and all(key.startswith(WRAPPER_PREFIX) for key in state_dict):
        size = len(WRAPPER_PREFIX)
        return {key[size:]: value for key, value in state_dict.items()}, WRAPPER_PREFIX
    return dict(state_dict), ''


def detect_format(state_dict: Mapping[str, object]) -> SourceFormat:
    """The format whose signature the (unwrapped) keys match; refuses none or several."""
    keys, _ = _unwrap(state_dict)

    def matches(fmt: SourceFormat) -> bool:
        return any(re.fullmatch(fmt.signature, key) for key in keys)

    found = [fmt for name, fmt in SOURCE_FORMATS.items()
             if name != FALLBACK_FORMAT and matches(fmt)]
    if not found and matches(SOURCE_FORMATS[FALLBACK_FORMAT]):
        found = [SOURCE_FORMATS[FALLBACK_FORMAT]]
    if len(found) == 1:
        return found[0]
    if found:
        raise ConversionError(
            f'the keys match several formats ({", ".join(fmt.name for fmt in found)}); pass '
            '--format to choose one.')
    raise ConversionError(
        f'does not look like a {" / ".join(SOURCE_FORMATS)} checkpoint: first keys '
        f'{_first(state_dict)}; pass --format if you know it.')


# ---------------------------------------------------------------------------------------------
# Converting


def convert_state_dict(state_dict: Mapping[str, object],
                       source_format: str = 'auto',
                       depth: int | None = None) -> Conversion:
    """Rename ``state_dict`` to AttnResNet classifier keys and infer the configs it fits.

    Args:
        state_dict (Mapping): The source's state dict (see :func:`load_source`).
        source_format (str): A name in :data:`SOURCE_FORMATS`, or ``'auto'`` to detect it.
        depth (int, optional): The expected ResNet depth; the keys decide when None, and a
            different depth in the keys is an error.

    Returns:
        Conversion: Unplaced keys are listed in ``unplaced``, not raised; the caller decides.
    """
    if source_format == 'auto':
        fmt = detect_format(state_dict)
    elif source_format in SOURCE_FORMATS:
        fmt = SOURCE_FORMATS[source_format]
        keys, _ = _unwrap(state_dict)
        if not any(re.fullmatch(fmt.stem, key) for key in keys):
            raise ConversionError(
                f'does not look like a {fmt.name} checkpoint ({fmt.source}): no key matches '
                f'{fmt.stem!r}; first keys {_first(state_dict)}.')
    else:
        raise ConversionError(f'unknown format {source_format!r}; use auto or one of '
                              f'{", ".join(SOURCE_FORMATS)}.')
    source, prefix = _unwrap(state_dict)
    converted: dict[str, Tensor] = {}
    origins: dict[str, str] = {}  # converted key -> source key, for messages
    unplaced: dict[str, str] = {}
    for key, value in source.items():
        if not isinstance(value, Tensor):
            unplaced[prefix + key] = f'not a tensor ({type(value).__name__})'
            continue
        placed = _place(key, fmt.rules)
        if placed is None:
            unplaced[prefix + key] = f'no {fmt.name} rule matches it'
            continue
        target, transform = placed
        converted[target] = transform(value) if transform else value
        origins[target] = prefix + key
    notes = [fmt.note] if fmt.note else []
    filled = _fill_num_batches_tracked(converted)
    if filled:
        notes.append(f'{filled} BatchNorm layers had no num_batches_tracked (saved before '
                     'PyTorch 0.4.1); it is set to 0, which only matters with momentum=None.')
    arch = _infer_arch(converted, depth)
    out_channels = arch['base_channels'] * 8 * (4 if arch['bottleneck'] else 1)
    head = _check_head(converted, out_channels, origins, unplaced)
    plugins = _infer_plugins(converted, arch, notes)
    backbone = dict(type='AttnResNet', depth=arch['depth'])
    if arch['base_channels'] != 64:
        backbone['base_channels'] = arch['base_channels']
    if arch['stem_channels'] != arch['base_channels']:
        backbone['stem_channels'] = arch['stem_channels']
    if plugins:
        backbone['plugins'] = plugins
    classifier = None
    if head is not None:
        classifier = dict(
            type='ImageClassifier',
            backbone=dict(backbone, out_indices=(3, ), **fmt.imagenet_backbone),
            neck=dict(type='GlobalAveragePooling'),
            head=dict(type='LinearClsHead', num_classes=head, in_channels=out_channels))
    else:
        notes.append('no classification head (fc) was converted: the file loads into a '
                     "detector's backbone only.")
    return Conversion(fmt.name, converted, arch['depth'], backbone, classifier, unplaced, notes)


def _place(key: str, rules: tuple[KeyRule, ...]):
    for rule in rules:
        match = re.fullmatch(rule.pattern, key)
        if match:
            return match.expand(rule.template), rule.transform
    return None


def _fill_num_batches_tracked(state_dict: dict[str, Tensor]) -> int:
    filled = 0
    for key in list(state_dict):
        if key.endswith('.running_mean'):
            counter = key[:-len('running_mean')] + 'num_batches_tracked'
            if counter not in state_dict:
                state_dict[counter] = torch.tensor(0, dtype=torch.long)
                filled += 1
    return filled


def _infer_arch(state_dict: Mapping[str, Tensor], depth: int | None) -> dict:
    """Depth, block type and widths from the stem and block keys."""
    blocks = [0, 0, 0, 0]
    for key in state_dict:
        match = re.fullmatch(r'backbone\.layer([1-4])\.(\d+)\.conv1\.weight', key)
        if match:
            stage, index = int(match.group(1)) - 1, int(match.group(2))
            blocks[stage] = max(blocks[stage], index + 1)
    bottleneck = any(re.fullmatch(r'backbone\.layer[1-4]\.\d+\.conv3\.weight', key)
                     for key in state_dict)
    stem = state_dict.get('backbone.conv1.weight')
    if stem is None or 0 in blocks:
        raise ConversionError(
            'the converted keys hold no complete ResNet: need backbone.conv1.weight and blocks '
            f'in all four stages, found {tuple(blocks)} blocks per stage.')
    found = [d for d, (block, counts) in AttnResNet.arch_settings.items()
             if tuple(counts) == tuple(blocks) and (block is Bottleneck) == bottleneck]
    kind = 'Bottleneck' if bottleneck else 'BasicBlock'
    if not found:
        known = '; '.join(f'{d}: {tuple(c)} {b.__name__}'
                          for d, (b, c) in AttnResNet.arch_settings.items())
        raise ConversionError(
            f'the keys hold a ResNet of {tuple(blocks)} {kind} blocks per stage, which is no '
            f'AttnResNet depth ({known}).')
    if depth is not None and depth != found[0]:
        raise ConversionError(
            f'--depth {depth} was given, but the keys hold a ResNet-{found[0]} '
            f'({tuple(blocks)} {kind} blocks per stage).')
    return dict(depth=found[0], bottleneck=bottleneck, blocks=tuple(blocks),
                stem_channels=stem.shape[0],
                base_channels=state_dict['backbone.layer1.0.conv1.weight'].shape[0])


def _check_head(state_dict: dict[str, Tensor], out_channels: int, origins: dict[str, str],
                unplaced: dict[str, str]) -> int | None:
    """The head's class count; a head that is no Linear on the pooled features is unplaced."""
    weight = state_dict.get('head.fc.weight')
    if weight is None:
        return None
    if weight.dim() == 2 and weight.shape[1] == out_channels:
        return weight.shape[0]
    for key in HEAD_KEYS:
        if state_dict.pop(key, None) is not None:
            unplaced[origins[key]] = (
                f'a head of shape {tuple(weight.shape)} is no Linear on the backbone\'s '
                f'{out_channels} average-pooled channels')
    return None


def _infer_plugins(state_dict: Mapping[str, Tensor], arch: dict, notes: list[str]) -> list[dict]:
    """The ``plugins`` list: one entry per block type and per group of equal settings."""
    rules = {rule.abbr: rule for rule in PLUGIN_RULES}
    # abbr -> (stage, block index or None after a stage) -> the module's tensors
    modules: dict[str, dict[tuple[int, int | None], dict[str, Tensor]]] = {}
    for key, tensor in state_dict.items():
        inner = re.fullmatch(r'backbone\.layer([1-4])\.(\d+)\.([a-z]+)\.(.+)', key)
        after = re.fullmatch(r'backbone\.([a-z]+)([1-4])\.(.+)', key)
        if inner and inner.group(3) in rules:
            where = (int(inner.group(1)) - 1, int(inner.group(2)))
            abbr, local = inner.group(3), inner.group(4)
        elif after and after.group(1) in rules:
            where, abbr, local = (int(after.group(2)) - 1, None), after.group(1), after.group(3)
        else:
            continue
        modules.setdefault(abbr, {}).setdefault(where, {})[local] = tensor
    plugins = []
    for rule in PLUGIN_RULES:
        if rule.abbr in modules:
            plugins += _plugin_entries(rule, modules[rule.abbr], arch)
    if any(entry['cfg'].get('type') == 'GlobalSecondOrderPooling'
           and entry['cfg'].get('mode') == 'sum' for entry in plugins):
        notes.append("GSoP blocks hold both branches: their fusion (the authors' '+' or 'M') "
                     "cannot be read from the weights; mode='sum' ('+') is assumed, set "
                     "mode='max' for a net trained with att_manner=fusion_max.")
    return plugins


def _plugin_entries(rule: PluginRule, found: dict[tuple[int, int | None], dict[str, Tensor]],
                    arch: dict) -> list[dict]:
    position = rule.position
    if position == 'after_conv3' and not arch['bottleneck']:
        position = 'after_conv2'
    # Per stage, the blocks that share one set of arguments.
    per_stage: dict[int, dict[tuple, list[int | None]]] = {}
    for (stage, index), tensors in sorted(found.items(), key=lambda item: (item[0][0],
                                                                            item[0][1] or 0)):
        args = tuple(rule.infer(tensors).items())
        per_stage.setdefault(stage, {}).setdefault(args, []).append(index)
    # Stages that share arguments and block choice become one entry.
    groups: dict[tuple, list[int]] = {}
    for stage, by_args in per_stage.items():
        for args, indices in by_args.items():
            blocks = None if position == 'after_stage' else _blocks(indices,
                                                                    arch['blocks'][stage])
            groups.setdefault((args, blocks), []).append(stage)
    entries = []
    for (args, blocks), stages in groups.items():
        entry = dict(cfg=dict(type=rule.type, **dict(args)), position=position)
        if len(stages) < len(arch['blocks']):
            entry['stages'] = tuple(stage in stages for stage in range(len(arch['blocks'])))
        if blocks not in (None, 'all'):
            entry['blocks'] = blocks
        entries.append(entry)
    return entries


def _blocks(indices: list[int], num_blocks: int) -> str | tuple[int, ...]:
    if sorted(indices) == list(range(num_blocks)):
        return 'all'
    if indices == [num_blocks - 1]:
        return 'last'
    return tuple(sorted(indices))


# ---------------------------------------------------------------------------------------------
# Verifying and writing


def verify_conversion(conversion: Conversion) -> None:
    """Load the converted weights with ``strict=True`` into the model their configs describe.

    The ImageClassifier (mmpretrain) when there is a head, else the AttnResNet backbone. Raises
    ConversionError naming every missing, unexpected and mis-shaped key.
    """
    if conversion.classifier is not None:
        import mmpretrain.models  # noqa: F401  (registers ImageClassifier; needs torchvision)
        from mmengine.registry import DefaultScope
        from mmpretrain.registry import MODELS

        # An earlier Runner in this process may have left another default scope behind.
        with DefaultScope.overwrite_default_scope('mmpretrain'):
            model = MODELS.build(copy.deepcopy(conversion.classifier))
        state_dict, what = conversion.state_dict, 'the inferred ImageClassifier'
    else:
        args = {k: v for k, v in conversion.backbone.items() if k != 'type'}
        model = AttnResNet(**copy.deepcopy(args))
        state_dict = {key[len('backbone.'):]: value
                      for key, value in conversion.state_dict.items()}
        what = 'the inferred AttnResNet'
    expected = model.state_dict()
    problems = []
    missing = [key for key in expected if key not in state_dict]
    unexpected = [key for key in state_dict if key not in expected]
    shapes = [f'{key} {tuple(state_dict[key].shape)} != {tuple(value.shape)}'
              for key, value in expected.items()
              if key in state_dict and state_dict[key].shape != value.shape]
    for label, keys in (('missing', missing), ('unexpected', unexpected), ('shape', shapes)):
        if keys:
            problems.append(f'{label} ({len(keys)}): {", ".join(keys)}')
    if problems:
        raise ConversionError(f'the converted weights do not fit {what}: '
                              + '; '.join(problems) + '. Nothing was written.')
    model.load_state_dict(state_dict, strict=True)


def _save_atomically(checkpoint: dict, dst: Path, force: bool) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f'.{dst.name}.', suffix='.tmp', dir=dst.parent)
    try:
        with os.fdopen(handle, 'wb') as file:
            torch.save(checkpoint, file)
            file.flush()
            os.fsync(file.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)  # mkstemp's 0600 would outlive the rename
        if dst.exists() and not force:
            raise ConversionError(f'{dst} appeared while converting; pass --force to replace it.')
        os.replace(temporary, dst)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


def convert_checkpoint(src: str | os.PathLike,
                       dst: str | os.PathLike,
                       source_format: str = 'auto',
                       depth: int | None = None,
                       allow_unplaced: bool = False,
                       force: bool = False) -> Conversion:
    """Convert the checkpoint ``src`` and write it to ``dst`` (see the module docstring).

    Args:
        src: The authors' checkpoint.
        dst: Where the mmengine checkpoint goes; an existing file is kept unless ``force``.
        source_format (str): ``'auto'`` or a name in :data:`SOURCE_FORMATS`.
        depth (int, optional): The depth the keys must hold.
        allow_unplaced (bool): Write even if some source keys have no AttnResNet key (they are
            dropped and listed in the checkpoint's meta). Defaults to False.
        force (bool): Replace an existing ``dst``. Defaults to False.

    Returns:
        Conversion: What was written and the configs it fits.

    Raises:
        ConversionError: Nothing was written; the message says why.
    """
    src, dst = Path(src), Path(dst)
    if dst.is_dir():
        raise ConversionError(f'{dst} is a folder; give the path of the file to write.')
    if dst.exists():
        if src.exists() and os.path.samefile(src, dst):
            raise ConversionError(f'{dst} is the source itself; write to another file.')
        if not force:
            raise ConversionError(f'{dst} exists; pass --force to replace it.')
    conversion = convert_state_dict(load_source(src), source_format, depth)
    if conversion.unplaced and not allow_unplaced:
        listed = '\n  '.join(f'{key}: {why}' for key, why in conversion.unplaced.items())
        raise ConversionError(
            f'{len(conversion.unplaced)} key(s) of {src} have no place in AttnResNet '
            f'(format {conversion.source_format}):\n  {listed}\nNothing was written; pass '
            '--allow-unplaced to drop them.')
    verify_conversion(conversion)
    meta = dict(mmattn_version=__version__, converted_from=src.name,
                source_format=conversion.source_format, backbone=conversion.backbone,
                classifier=conversion.classifier, unplaced=sorted(conversion.unplaced))
    _save_atomically(dict(state_dict=conversion.state_dict, meta=meta), dst, force)
    return conversion


# ---------------------------------------------------------------------------------------------
# Reporting


class _Code(str):
    """Config source shown as it is (a name defined earlier in the printed config)."""


def to_source(value: object, indent: int = 0, column: int = 0, width: int = 100) -> str:
    """``value`` as config source (``dict(a=1)``), wrapped to ``width`` columns.

    ``indent`` is the indentation of the line the value is on, ``column`` where it starts.
    """
    inline = _inline(value)
    if column + len(inline) < width or not isinstance(value, (dict, list, tuple)) or not value:
        return inline
    pad = ' ' * (indent + 4)
    if isinstance(value, dict):
        items = [f'{pad}{key}={to_source(item, indent + 4, indent + 5 + len(key), width)}'
                 for key, item in value.items()]
        return 'dict(\n' + ',\n'.join(items) + ')'
    opening, closing = ('[', ']') if isinstance(value, list) else ('(', ')')
    items = [pad + to_source(item, indent + 4, indent + 4, width) for item in value]
    return f'{opening}\n' + ',\n'.join(items) + f',\n{" " * indent}{closing}'


def _inline(value: object) -> str:
    if isinstance(value, _Code):
        return str(value)
    if isinstance(value, dict):
        return 'dict(' + ', '.join(f'{key}={_inline(item)}' for key, item in value.items()) + ')'
    if isinstance(value, list):
        return '[' + ', '.join(map(_inline, value)) + ']'
    if isinstance(value, tuple):
        return '(' + ', '.join(map(_inline, value)) + (', )' if len(value) == 1 else ')')
    return repr(value)


def describe_conversion(conversion: Conversion, src: str | os.PathLike,
                        dst: str | os.PathLike) -> str:
    """What was converted, the configs that fit it, and the lines that load it."""
    fmt = SOURCE_FORMATS[conversion.source_format]
    lines = [f'Converted {src} ({fmt.name}: {fmt.source})',
             f'  -> {dst}: ResNet-{conversion.depth}, {len(conversion.state_dict)} tensors']
    if conversion.unplaced:
        lines.append(f'Dropped {len(conversion.unplaced)} unplaced key(s):')
        lines += [f'  {key}: {why}' for key, why in conversion.unplaced.items()]
    lines += ['', 'Backbone config these weights fit:',
              'backbone = ' + to_source(conversion.backbone, 0, len('backbone = ')), '',
              'In a detector, add to that backbone:',
              f"    init_cfg=dict(type='Pretrained', prefix='backbone.', checkpoint={str(dst)!r})"]
    if conversion.classifier is not None:
        # The classifier's backbone is the one above plus ImageNet-only arguments.
        extra = {key: value for key, value in conversion.classifier['backbone'].items()
                 if key not in conversion.backbone}
        args = ', '.join(['backbone', *(f'{key}={_inline(value)}' for key, value in extra.items())])
        shown = dict(conversion.classifier, backbone=_Code(f'dict({args})'))
        lines += ['', 'As an MMPretrain classifier (no missing or unexpected keys):',
                  'model = ' + to_source(shown, 0, len('model = ')),
                  f'load_from = {str(dst)!r}']
    if conversion.notes:
        lines += ['', 'Notes:'] + [f'- {note}' for note in conversion.notes]
    return '\n'.join(lines)
