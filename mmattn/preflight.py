"""Checks a config before anything is built or trained, so a mistake costs seconds, not a job.

Each check raises an error that names the config key at fault and what would fix it:
- backbone plugins: the type is registered, the position exists, the block can be built at every
  stage it is asked for (e.g. SGE's groups divide that stage's channels);
- data: annotation files and image folders exist where the dataloaders and evaluators look;
- pretrained weights: a backbone ``init_cfg`` checkpoint can be read, or fetched now rather than
  minutes into a run.
"""
from __future__ import annotations

import os
import os.path as osp
from collections.abc import Iterator

from mmengine.config import Config, ConfigDict
from mmengine.registry import MODELS, init_default_scope

MMDET_POSITIONS = ('after_conv1', 'after_conv2', 'after_conv3')
SPLITS = ('train', 'val', 'test')


class ConfigError(ValueError):
    """A config asks for something that cannot be built or run."""


class DataNotFoundError(ConfigError, FileNotFoundError):
    """A dataloader, evaluator or checkpoint path of the config does not exist."""


class PretrainedUnavailableError(ConfigError, RuntimeError):
    """The backbone's pretrained weights are neither on disk nor downloadable."""


def check_config(cfg: Config, phase: str) -> None:
    """Run every check for ``phase`` ('train' or 'test') on a loaded config.

    Call :func:`follow_data_root` first when command-line options were merged into ``cfg``.
    """
    if phase not in ('train', 'test'):
        raise ValueError(f"phase={phase!r}; expected 'train' or 'test'")
    # Registry names resolve under the config's scope, as the Runner will resolve them.
    init_default_scope(cfg.get('default_scope', 'mmdet'))
    check_backbone_plugins(cfg.model.get('backbone', ConfigDict()))
    splits = ['train'] + (['val'] if cfg.get('val_cfg') else []) if phase == 'train' else ['test']
    check_data(cfg, splits)
    if phase == 'train' and not cfg.get('load_from'):
        check_pretrained(cfg.model.get('backbone', ConfigDict()))


# ---------------------------------------------------------------------------------------------
# Backbone plugins


def check_backbone_plugins(backbone: ConfigDict) -> None:
    """Validate ``plugins=`` of an mmdet-style ResNet config (stock ResNet or AttnResNet).

    AttnResNet's own check does the work (types, stages, blocks, every plugin built at its
    stage's width, duplicate names); a stock mmdet ResNet is also held to what it can build.
    """
    plugins = backbone.get('plugins')
    if not plugins:
        return
    from mmdet.models.backbones import ResNet

    from mmattn.backbones import AttnResNet

    backbone_cls = _resolve(backbone.get('type'))
    if backbone_cls is None or not issubclass(backbone_cls, ResNet):
        return
    depth = backbone.get('depth')
    arch = backbone_cls.__name__
    if not issubclass(backbone_cls, AttnResNet):
        _check_stock_resnet(plugins, backbone_cls, depth)
    try:
        AttnResNet.check_plugins(plugins, depth=depth, num_stages=backbone.get('num_stages', 4),
                                 base_channels=backbone.get('base_channels', 64), arch=arch)
    except (ValueError, TypeError) as err:
        # Structural messages start with the entry ("plugins[0].position=..."): anchor it in cfg.
        prefix = 'model.backbone.' if str(err).startswith('plugins[') else ''
        raise ConfigError(f'{prefix}{err}') from err


def _check_stock_resnet(plugins: list, backbone_cls: type, depth: int) -> None:
    """What mmdet's ResNet refuses beyond AttnResNet: new positions, ``blocks``, BasicBlock."""
    arch = backbone_cls.__name__
    block = backbone_cls.arch_settings[depth][0] if depth in backbone_cls.arch_settings else None
    for index, plugin in enumerate(plugins):
        key = f'model.backbone.plugins[{index}]'
        if block is not None and block.__name__ == 'BasicBlock':
            raise ConfigError(
                f"{key}: mmdet's {arch}-{depth} is built of BasicBlocks, which refuse plugins; "
                "use type='AttnResNet' (same weights and keys) or depth 50, 101 or 152.")
        position = plugin.get('position') if isinstance(plugin, dict) else None
        if position not in MMDET_POSITIONS:
            raise ConfigError(
                f'{key}.position={position!r} is not a position of {arch}; use one of '
                f'{", ".join(MMDET_POSITIONS)} (the papers place SE, SGE, CBAM and GC at '
                "'after_conv3'), or type='AttnResNet' for after_conv1_pre_norm and after_stage.")
        if isinstance(plugin, dict) and 'blocks' in plugin:
            raise ConfigError(
                f"{key}.blocks: {arch} puts a plugin in every block of a stage; use "
                "type='AttnResNet' to choose blocks.")


def _resolve(name: str | type | None) -> type | None:
    """A registry name as the Runner will resolve it: under the current default scope."""
    if name is None or isinstance(name, type):
        return name
    with MODELS.switch_scope_and_registry(None) as registry:
        return registry.get(name)


# ---------------------------------------------------------------------------------------------
# Data


def follow_data_root(cfg: Config, original_root: str | None) -> None:
    """Make dataloaders and evaluators follow a ``data_root`` changed after the config was read.

    mmengine substitutes ``data_root`` into the dataloaders when the file is read, so
    ``--cfg-options data_root=/my/coco/`` alone would change nothing. Here every dataset still at
    the file's ``original_root`` moves to the new root, and an evaluator whose ``ann_file`` lies
    inside ``original_root`` follows its split's dataset (also when only
    ``val_dataloader.dataset.data_root`` was changed).
    """
    new_root = cfg.get('data_root')
    if original_root is None:
        return
    for split in SPLITS:
        for dataset in _datasets(cfg.get(f'{split}_dataloader')):
            if new_root != original_root and dataset.get('data_root') == original_root:
                dataset.data_root = new_root
            root = dataset.get('data_root')
            if root is None or root == original_root:
                continue
            for evaluator in _as_list(cfg.get(f'{split}_evaluator')):
                ann_file = evaluator.get('ann_file')
                if isinstance(ann_file, str) and ann_file.startswith(original_root):
                    evaluator.ann_file = osp.join(root, ann_file[len(original_root):])


def check_data(cfg: Config, splits: list[str]) -> None:
    """Raise DataNotFoundError naming the missing path and how to point the config elsewhere."""
    for split in splits:
        for dataset in _datasets(cfg.get(f'{split}_dataloader')):
            root = dataset.get('data_root') or ''
            ann_file = dataset.get('ann_file')
            if ann_file:
                _require(osp.join(root, ann_file), f'{split}_dataloader annotation file', root)
            img_dir = (dataset.get('data_prefix') or {}).get('img')
            if img_dir is not None:
                _require(osp.join(root, img_dir), f'{split}_dataloader image folder', root)
        for evaluator in _as_list(cfg.get(f'{split}_evaluator')):
            if isinstance(evaluator.get('ann_file'), str):
                _require(evaluator.ann_file, f'{split}_evaluator.ann_file', None)


def _require(path: str, what: str, root: str | None) -> None:
    if osp.exists(path):
        return
    where = f" under data_root='{root}'" if root else ''
    raise DataNotFoundError(
        f"{what} not found: '{path}'{where}. COCO 2017 is expected at data/coco/ "
        '(annotations/instances_train2017.json, annotations/instances_val2017.json, train2017/, '
        'val2017/), relative to the directory you run from. Point to your copy with '
        '--cfg-options data_root=/path/to/coco/ (dataloaders and evaluators follow it).')


def _as_list(value) -> list:
    if not value:
        return []
    return value if isinstance(value, list) else [value]


def _datasets(dataloader) -> Iterator[ConfigDict]:
    """The leaf dataset configs of a dataloader, through Repeat/ClassBalanced/Concat wrappers."""
    if not dataloader:
        return
    stack = [dataloader.get('dataset')]
    while stack:
        dataset = stack.pop()
        if not dataset:
            continue
        if 'datasets' in dataset:
            stack.extend(dataset.datasets)
        elif 'dataset' in dataset:
            stack.append(dataset.dataset)
        else:
            yield dataset


# ---------------------------------------------------------------------------------------------
# Pretrained weights


def check_pretrained(backbone: ConfigDict) -> None:
    """Make sure a ``Pretrained`` backbone checkpoint is readable before training starts."""
    init_cfg = backbone.get('init_cfg')
    if not isinstance(init_cfg, dict) or init_cfg.get('type') != 'Pretrained':
        return
    checkpoint = init_cfg.get('checkpoint')
    fix = ('Download it on a machine with internet and copy it there, or set '
           '--cfg-options model.backbone.init_cfg.checkpoint=/path/to/weights.pth, or train from '
           'scratch with model.backbone.init_cfg=None.')
    url = _checkpoint_url(checkpoint)
    if url is None:
        if not osp.isfile(checkpoint):
            raise DataNotFoundError(
                f"model.backbone.init_cfg.checkpoint='{checkpoint}' does not exist. {fix}")
        return
    import torch.hub
    cached = osp.join(torch.hub.get_dir(), 'checkpoints', osp.basename(url))
    if osp.isfile(cached):
        return
    os.makedirs(osp.dirname(cached), exist_ok=True)
    try:
        torch.hub.download_url_to_file(url, cached, progress=False)
    except Exception as err:  # any network failure means the same thing here
        raise PretrainedUnavailableError(
            f"model.backbone.init_cfg.checkpoint='{checkpoint}' is not in the torch hub cache "
            f"('{cached}') and could not be downloaded from {url} ({type(err).__name__}: {err}). "
            f'{fix}') from err


def _checkpoint_url(checkpoint: str) -> str | None:
    """The URL a ``torchvision://`` / ``http(s)://`` checkpoint names; None for a local file."""
    if checkpoint.startswith('torchvision://'):
        from mmengine.runner.checkpoint import get_torchvision_models
        return get_torchvision_models()[checkpoint[len('torchvision://'):]]
    if checkpoint.startswith(('http://', 'https://')):
        return checkpoint
    if checkpoint.startswith(('open-mmlab://', 'openmmlab://', 'mmcls://', 'pavi://', 's3://')):
        return None if osp.isfile(checkpoint) else checkpoint
    return None
