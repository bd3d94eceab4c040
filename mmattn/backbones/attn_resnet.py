"""AttnResNet: mmdet's ResNet with the plugin placements the attention papers use."""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
from mmcv.cnn import build_plugin_layer
from mmdet.models.backbones import ResNet
from mmdet.models.backbones.resnet import BasicBlock, Bottleneck
from mmdet.models.layers import ResLayer
from mmengine.model import BaseModule
from mmengine.registry import MODELS

from .. import blocks as attention_blocks
from .res_blocks import AttnBasicBlock, AttnBottleneck

AFTER_STAGE = 'after_stage'
PLUGIN_KEYS = ('cfg', 'position', 'stages', 'blocks')
BLOCK_CHOICES = ('all', 'last')
# mmdet's block class (what ResNet.arch_settings names) -> the class AttnResNet builds.
ATTN_BLOCKS = {BasicBlock: AttnBasicBlock, Bottleneck: AttnBottleneck}


@dataclass(frozen=True)
class PluginSpec:
    """One checked entry of ``plugins``.

    Attributes:
        index (int): Its index in ``plugins``, for messages.
        cfg (dict): The block config, ``type`` resolvable in the registry.
        position (str): A position of the backbone's block type, or ``'after_stage'``.
        stages (tuple[int]): The chosen stages, 0-based.
        blocks (str | tuple[int]): ``'all'``, ``'last'`` or block indices valid in every chosen
            stage.
    """

    index: int
    cfg: dict
    position: str
    stages: tuple[int, ...]
    blocks: str | tuple[int, ...]

    def block_indices(self, num_blocks: int) -> Sequence[int]:
        """Indices of the blocks that get the plugin in a stage of ``num_blocks`` blocks."""
        if self.blocks == 'all':
            return range(num_blocks)
        if self.blocks == 'last':
            return (num_blocks - 1, )
        return self.blocks


@MODELS.register_module()
class AttnResNet(ResNet):
    """mmdet's ResNet with the plugin placements mmdet lacks.

    Registered in MMEngine's root MODELS, so mmdet configs (scope mmdet) and mmpretrain configs
    (scope mmpretrain) both find ``type='AttnResNet'``. The ResNet layers keep mmdet's names and
    shapes, so torchvision, mmdet and mmpretrain ResNet weights load into them unchanged; only
    plugin parameters are new. Every other argument, and the behaviour of ``out_indices``,
    ``frozen_stages``, ``norm_eval``, ``with_cp`` and ``zero_init_residual``, is mmdet's
    (:class:`mmdet.models.backbones.ResNet`).

    Each entry of ``plugins`` is a dict:

    - ``cfg`` (dict, required): the block, e.g. ``dict(type='SpatialGroupEnhance', groups=64)``,
      built with mmcv's ``build_plugin_layer`` and ``in_channels=`` set from the position. An
      optional ``postfix`` in ``cfg`` is appended to the module name, as in mmdet.
    - ``position`` (str, required), where the block runs (``[P]``):

      ====================  ===============================  ===============================
      position              Bottleneck (depth 50/101/152)    BasicBlock (depth 18/34)
      ====================  ===============================  ===============================
      after_conv1_pre_norm  conv1 -> [P] -> bn1 -> relu      conv1 -> [P] -> bn1 -> relu
      after_conv1           conv1 -> bn1 -> relu -> [P]      conv1 -> bn1 -> relu -> [P]
      after_conv2           conv2 -> bn2 -> relu -> [P]      conv2 -> bn2 -> [P] -> + id
      after_conv3           conv3 -> bn3 -> [P] -> + id      error: use 'after_conv2'
      after_stage           the stage's output -> [P] -> the next stage and ``out_indices``
      ====================  ===============================  ===============================

      ``+ id`` is the residual add, which the block's final ReLU follows. In a block,
      in_channels is the block's planes (64, 128, 256, 512 at base_channels=64),
      times 4 for a Bottleneck's after_conv3; after_stage gets the stage's output channels.
      after_conv1/2/3 of a Bottleneck are mmdet's positions. after_conv1_pre_norm is CGD's
      published placement. "After the last conv + BN, before the residual add" (SE, SGE, CBAM)
      is after_conv3 for a Bottleneck and after_conv2 for a BasicBlock.
    - ``stages`` (tuple[bool], optional): one flag per stage; every stage when omitted.
    - ``blocks`` (optional, not with after_stage): ``'all'`` (the default: every block of a
      chosen stage, mmdet's behaviour), ``'last'`` (the last block of each chosen stage: GSoP) or
      a tuple of 0-based block indices, each valid in every chosen stage.

    Plugins at one position run in list order. A plugin in a block is the block's submodule
    ``_abbr_ + postfix``, as mmdet names it (``layer1.0.sge.weight``); an after_stage plugin is
    the backbone's submodule ``_abbr_ + stage (1-based) + postfix`` (``bam1``, ``bam2``, as in
    PytorchInsight's BAM-ResNet). Plugins of frozen stages are frozen with them; ``norm_eval``
    reaches plugin norm layers; ``with_cp`` checkpoints each block with its plugins (after_stage
    modules run outside the checkpoints). ``init_weights`` applies the backbone's init (Kaiming
    convs, constant norms) to everything first and then each plugin's own ``init_weights``, so a
    plugin that is an mmengine ``BaseModule`` keeps its init; a plain ``nn.Module`` does not (as
    in mmdet).

    Args:
        depth (int): 18, 34 (BasicBlock), 50, 101 or 152 (Bottleneck).
        plugins (list[dict], optional): The plugins, as above. Defaults to None.
        **kwargs: The other arguments of mmdet's ResNet.

    Raises:
        ValueError, TypeError: For a plugin that cannot be placed or built, naming the plugin,
            the stage, the block, the position and the channels.

    Example:
        >>> # SGE in every block (layer1.0.sge, ...), SE after stages 1-3 (se1, se2, se3)
        >>> backbone = AttnResNet(50, plugins=[
        ...     dict(cfg=dict(type='SpatialGroupEnhance'), position='after_conv3'),
        ...     dict(cfg=dict(type='SqueezeExcitation'), position='after_stage',
        ...          stages=(True, True, True, False)),
        ... ])
    """

    def __init__(self, depth: int, plugins: Sequence[dict] | None = None, **kwargs) -> None:
        # mmdet's blocks take one plugin list per stage and refuse the new positions (BasicBlock
        # refuses any plugin): the network is built plain, then each plugin is attached.
        super().__init__(depth, **kwargs)
        specs = parse_plugins(plugins, depth, self.num_stages)
        self.plugins = plugins
        self.block = ATTN_BLOCKS[self.block]
        self.after_stage_plugin_names: list[list[str]] = [[] for _ in self.stage_blocks]
        # Attached in forward order, so modules are registered where mmdet registers them.
        order = [*self.block.plugin_positions, AFTER_STAGE]
        for spec in sorted(specs, key=lambda spec: order.index(spec.position)):
            for stage in spec.stages:
                self._attach(spec, stage)
        # ResNet.__init__ froze the stages before the plugins existed.
        self._freeze_stages()

    @classmethod
    def check_plugins(cls,
                      plugins: Sequence[dict] | None,
                      depth: int,
                      num_stages: int = 4,
                      base_channels: int = 64,
                      arch: str = 'AttnResNet') -> None:
        """Raise the error ``AttnResNet(depth, plugins=plugins, ...)`` would, without building it.

        Checks the entries, builds each plugin once per chosen stage at that stage's channels,
        and checks that no two plugins share a module name in a block. ``arch`` names the
        network in messages (a config checker passes the type the config uses).
        """
        specs = parse_plugins(plugins, depth, num_stages, arch)
        net = f'{arch}-{depth}'
        block, stage_blocks = cls.arch_settings[depth]
        block = ATTN_BLOCKS[block]
        taken: dict[tuple[int, int | None], set[str]] = {}
        for spec in specs:
            for stage in spec.stages:
                channels = _plugin_channels(block, spec.position, base_channels, stage)
                if spec.position == AFTER_STAGE:
                    indices: Sequence[int | None] = (None, )
                else:
                    indices = spec.block_indices(stage_blocks[stage])
                name, _ = _build(spec, net, stage, indices[0], channels)
                for index in indices:
                    names = taken.setdefault((stage, index), set())
                    if name in names:
                        raise _duplicate(spec, net, stage, index, name)
                    names.add(name)

    def make_res_layer(self, **kwargs) -> ResLayer:
        # arch_settings keeps mmdet's classes: ResNet.__init__ picks the zero_init_residual norm
        # by identity (``block is Bottleneck``). The layers are built from the subclasses here.
        kwargs['block'] = ATTN_BLOCKS[kwargs['block']]
        return super().make_res_layer(**kwargs)

    def _attach(self, spec: PluginSpec, stage: int) -> None:
        channels = _plugin_channels(self.block, spec.position, self.base_channels, stage)
        net = f'AttnResNet-{self.depth}'
        if spec.position == AFTER_STAGE:
            name, module = _build(spec, net, stage, None, channels)
            if hasattr(self, name):
                raise _duplicate(spec, net, stage, None, name)
            self.add_module(name, module)
            self.after_stage_plugin_names[stage].append(name)
            return
        layer = getattr(self, self.res_layers[stage])
        for index in spec.block_indices(len(layer)):
            name, module = _build(spec, net, stage, index, channels)
            if hasattr(layer[index], name):
                raise _duplicate(spec, net, stage, index, name)
            layer[index].add_plugin(spec.position, name, module)

    def _freeze_stages(self) -> None:
        super()._freeze_stages()
        # ResNet.__init__ calls this before the after_stage plugins exist.
        frozen = getattr(self, 'after_stage_plugin_names', [])[:max(self.frozen_stages, 0)]
        for names in frozen:
            for name in names:
                module = getattr(self, name)
                module.eval()
                for param in module.parameters():
                    param.requires_grad = False

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.deep_stem:
            x = self.stem(x)
        else:
            x = self.conv1(x)
            x = self.norm1(x)
            x = self.relu(x)
        x = self.maxpool(x)
        outs = []
        for i, layer_name in enumerate(self.res_layers):
            x = getattr(self, layer_name)(x)
            for name in self.after_stage_plugin_names[i]:
                x = getattr(self, name)(x)
            if i in self.out_indices:
                outs.append(x)
        return tuple(outs)

    def init_weights(self) -> None:
        super().init_weights()
        # mmengine gives plugins that are plain nn.Modules (mmcv's ContextBlock) the backbone's
        # Kaiming init and never calls theirs: restore their own init, unless a Pretrained
        # checkpoint (applied last, possibly with plugin weights) has just loaded them.
        if not any(cfg.get('type') == 'Pretrained' for cfg in _as_list(self.init_cfg)):
            for module in self.plugin_modules():
                if not isinstance(module, BaseModule) and hasattr(module, 'reset_parameters'):
                    module.reset_parameters()

    def plugin_modules(self) -> Iterator[nn.Module]:
        """The plugin modules attached to this backbone, in forward order."""
        for stage, layer_name in enumerate(self.res_layers):
            for block in getattr(self, layer_name):
                for position in block.plugin_positions:
                    for name in getattr(block, f'{position}_plugin_names'):
                        yield getattr(block, name)
            for name in self.after_stage_plugin_names[stage]:
                yield getattr(self, name)

    def train(self, mode: bool = True) -> AttnResNet:
        # mmdet's train() keeps frozen stages (plugins included) and, with norm_eval, every
        # norm layer in eval mode, but returns None; nn.Module.train returns the module.
        super().train(mode)
        return self


def _as_list(init_cfg) -> list:
    if not init_cfg:
        return []
    return list(init_cfg) if isinstance(init_cfg, (list, tuple)) else [init_cfg]


# ---------------------------------------------------------------------------------------------
# Checking and building plugins


def parse_plugins(plugins: Sequence[dict] | None, depth: int, num_stages: int = 4,
                  arch: str = 'AttnResNet') -> list[PluginSpec]:
    """Check a ``plugins`` list against an AttnResNet of ``depth`` and ``num_stages``.

    Raises ValueError or TypeError naming the entry (``plugins[i]``) and what would be right.
    """
    if depth not in ResNet.arch_settings:
        raise ValueError(
            f'{arch}: depth={depth!r}; use one of {", ".join(map(str, ResNet.arch_settings))}.')
    mmdet_block, stage_blocks = ResNet.arch_settings[depth]
    stage_blocks = stage_blocks[:num_stages]
    if plugins is None:
        return []
    if isinstance(plugins, (dict, str)) or not isinstance(plugins, Sequence):
        raise TypeError(
            f'{arch}: plugins must be a list of dicts, got {type(plugins).__name__}; e.g. '
            "plugins=[dict(cfg=dict(type='SpatialGroupEnhance'), position='after_conv3')].")
    net = f'{arch}-{depth} ({mmdet_block.__name__})'
    positions = (*ATTN_BLOCKS[mmdet_block].plugin_positions, AFTER_STAGE)
    specs = []
    for index, plugin in enumerate(plugins):
        key = f'plugins[{index}]'
        if not isinstance(plugin, dict):
            raise TypeError(
                f'{key} must be a dict with keys {", ".join(PLUGIN_KEYS)}, '
                f'got {type(plugin).__name__}.')
        unknown = sorted(set(plugin) - set(PLUGIN_KEYS))
        if unknown:
            raise ValueError(
                f'{key} has unknown keys {unknown}; a plugin takes cfg, position, and optionally '
                'stages and blocks.')
        cfg = plugin.get('cfg')
        if not isinstance(cfg, dict) or 'type' not in cfg:
            raise TypeError(
                f"{key}.cfg must be a dict with a type, e.g. cfg=dict(type='SpatialGroupEnhance'); "
                f'got {cfg!r}.')
        _check_type(key, cfg['type'])
        position = plugin.get('position')
        _check_position(key, position, positions, net, mmdet_block)
        stages = _parse_stages(key, plugin.get('stages'), num_stages, net)
        if position == AFTER_STAGE and 'blocks' in plugin:
            raise ValueError(
                f"{key}: blocks does not apply to position 'after_stage' (one module at the end "
                'of each chosen stage); remove it, or use a position inside the blocks.')
        blocks = _parse_blocks(key, plugin.get('blocks', 'all'), stages, stage_blocks, net)
        specs.append(PluginSpec(index, cfg, position, stages, blocks))
    return specs


def _check_type(key: str, block_type) -> None:
    if isinstance(block_type, type):
        return
    if isinstance(block_type, str):
        # Resolved as mmcv's build_plugin_layer resolves it: in the current default scope.
        with MODELS.switch_scope_and_registry(None) as registry:
            if registry.get(block_type) is not None:
                return
    raise ValueError(
        f'{key}.cfg.type={block_type!r} is not a registered block. mmattn registers '
        f'{", ".join(sorted(attention_blocks.__all__))}; mmcv registers ContextBlock, '
        'GeneralizedAttention and NonLocal2d. A config that uses mmattn blocks needs '
        "custom_imports=dict(imports=['mmattn'], allow_failed_imports=False).")


def _check_position(key: str, position, positions: tuple[str, ...], net: str,
                    mmdet_block: type) -> None:
    if position in positions:
        return
    if position == 'after_conv3' and mmdet_block is BasicBlock:
        raise ValueError(
            f"{key}.position='after_conv3': {net} has no conv3 (a BasicBlock has two convs). "
            "After the last conv + BN, before the residual add, is position='after_conv2' in a "
            'BasicBlock.')
    raise ValueError(
        f'{key}.position={position!r} is not a position of {net}; use one of '
        f'{", ".join(map(repr, positions))}.')


def _parse_stages(key: str, stages, num_stages: int, net: str) -> tuple[int, ...]:
    if stages is None:
        return tuple(range(num_stages))
    if isinstance(stages, str) or not isinstance(stages, Sequence) or len(stages) != num_stages:
        raise ValueError(
            f'{key}.stages={stages!r}: {net} has num_stages={num_stages}, so give one bool per '
            f'stage, e.g. stages={(True, ) * num_stages}.')
    return tuple(i for i, wanted in enumerate(stages) if wanted)


def _parse_blocks(key: str, blocks, stages: tuple[int, ...], stage_blocks: Sequence[int],
                  net: str) -> str | tuple[int, ...]:
    if isinstance(blocks, str) and blocks in BLOCK_CHOICES:
        return blocks
    is_indices = (isinstance(blocks, Sequence) and not isinstance(blocks, str) and blocks
                  and all(isinstance(i, int) and not isinstance(i, bool) for i in blocks))
    if not is_indices or min(blocks) < 0 or len(set(blocks)) != len(blocks):
        raise ValueError(
            f"{key}.blocks={blocks!r}: use 'all' (every block of a chosen stage), 'last' (the last "
            'block of each chosen stage) or a tuple of distinct block indices from 0, e.g. (0, 2).')
    for stage in stages:
        if max(blocks) >= stage_blocks[stage]:
            num = stage_blocks[stage]
            raise ValueError(
                f'{key}.blocks={tuple(blocks)}: stage {stage + 1} of {net} has {num} blocks '
                f"(indices 0 to {num - 1}); use indices below {num}, blocks='last', or leave "
                'that stage out with stages=.')
    return tuple(blocks)


def _plugin_channels(block: type, position: str, base_channels: int, stage: int) -> int:
    planes = base_channels * 2**stage
    if position == AFTER_STAGE:
        return planes * block.expansion
    return planes * block.plugin_positions[position]


def _where(spec: PluginSpec, net: str, stage: int, index: int | None) -> str:
    block_type = spec.cfg['type']
    block_type = getattr(block_type, '__name__', block_type)
    place = f', block {index} (layer{stage + 1}.{index})' if index is not None else ' output'
    return (f'{net} plugins[{spec.index}] ({block_type}) at stage {stage + 1}'
            f'{place}, position {spec.position!r}')


def _build(spec: PluginSpec, net: str, stage: int, index: int | None,
           channels: int) -> tuple[str, nn.Module]:
    """Build the plugin; its constructor's error comes back with where and at what width."""
    cfg = dict(spec.cfg)
    postfix = str(cfg.pop('postfix', ''))
    if index is None:  # an after_stage module is named by its 1-based stage
        postfix = f'{stage + 1}{postfix}'
    try:
        return build_plugin_layer(cfg, postfix=postfix, in_channels=channels)
    except (TypeError, ValueError, KeyError, AssertionError) as err:
        detail = str(err.args[0]) if len(err.args) == 1 else (str(err) or type(err).__name__)
        message = f'{detail} ({_where(spec, net, stage, index)}, in_channels={channels})'
        raise (TypeError if isinstance(err, TypeError) else ValueError)(message) from err


def _duplicate(spec: PluginSpec, net: str, stage: int, index: int | None,
               name: str) -> ValueError:
    return ValueError(
        f'{_where(spec, net, stage, index)}: the module name {name!r} is already taken there '
        '(by another plugin or a layer); give each plugin of one type its own cfg postfix, e.g. '
        "cfg=dict(type=..., postfix='_2').")
