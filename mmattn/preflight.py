"""Checks a config before anything is built or trained, so a mistake costs seconds, not a job.

Each check raises an error that names the config key at fault and what would fix it:
- backbone plugins: the type is registered, the position exists, the block can be built at every
  stage it is asked for (e.g. SGE's groups divide that stage's channels);
- data: annotation files and image folders exist where the dataloaders and evaluators look;
- pretrained weights: a backbone ``init_cfg`` checkpoint can be read, or fetched now rather than
  minutes into a run;
- annotations: COCO files pass :func:`mmattn.datasets.validate.validate_coco` (bad records are
  rejected with the file and record named; boxes mmdet drops are counted in the log);
- checkpoints of another architecture: once the model is built,
  :func:`check_checkpoint_architecture` compares ``load_from`` / the backbone's ``Pretrained``
  checkpoint with it, key by key and shape by shape.
"""
from __future__ import annotations

import os
import os.path as osp
from collections.abc import Iterator

from mmengine.config import Config, ConfigDict
from mmengine.registry import MODELS, DefaultScope

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
    # Registry names resolve under the config's scope, as the Runner will resolve them; the
    # scope is set only for the checks, so a caller's own scope is left as it was.
    with DefaultScope.overwrite_default_scope(cfg.get('default_scope', 'mmdet')):
        check_backbone_plugins(cfg.model.get('backbone', ConfigDict()))
        splits = ['train'] + (['val'] if cfg.get('val_cfg') else []) if phase == 'train' \
            else ['test']
        check_data(cfg, splits)
        check_annotations(cfg, splits)
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
        prefix = 'model.backbone.' if str(err).startswith('plugins[') else 'model.backbone: '
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


def check_annotations(cfg: Config, splits: list[str]) -> None:
    """Validate the COCO annotation files the dataloaders of ``splits`` read.

    Raises :class:`mmattn.datasets.validate.AnnotationError` (a ConfigError) for a file that
    would crash training or train on garbage; logs, on rank 0, what mmdet will drop.
    """
    from mmengine.logging import print_log

    from mmattn.datasets.validate import validate_dataset_config
    for split in splits:
        for dataset in _datasets(cfg.get(f'{split}_dataloader')):
            report = validate_dataset_config(dataset, require_annotations=split != 'test')
            if report is not None and os.environ.get('RANK', '0') == '0':
                print_log(f'{split}_dataloader annotations: {report.summary()}', logger='current')


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


# ---------------------------------------------------------------------------------------------
# Checkpoints of another architecture

# A checkpoint must fill at least this share of the target's elements (the whole model for
# load_from, the backbone for Pretrained) ...
MIN_FILLED = 0.5
# ... and at most this share of its own elements may have no place in it. A new head for another
# number of classes, plugins absent from the weights and a classifier's fc layer all stay under.
MAX_UNUSED = 0.25
_LISTED = 3


class CheckpointMismatchError(ConfigError):
    """A checkpoint was made for another architecture than the model it would be loaded into."""


def check_checkpoint_architecture(model, cfg: Config) -> None:
    """Compare ``load_from`` and the backbone's ``Pretrained`` checkpoint with ``model``.

    mmengine loads both with ``strict=False``, so the weights of another architecture load
    "successfully" and training starts from a mostly random model. Here each checkpoint is read
    with weights_only (the backbone's too when ``load_from`` is set: mmengine still loads it to
    initialise the model) and its keys and shapes are compared with the model's first. It is
    refused when it shares no parameter name with its target (the model, or the backbone), when a
    backbone tensor has another shape, when it fills less than :data:`MIN_FILLED` of the target,
    or when more than :data:`MAX_UNUSED` of it has no place there; smaller differences are
    logged. Checkpoints that are neither local files nor already in torch's hub cache are not
    checked.
    """
    from mmengine.model import is_model_wrapper
    if is_model_wrapper(model):
        model = model.module
    init_cfg = cfg.model.get('backbone', ConfigDict()).get('init_cfg')
    if (isinstance(init_cfg, dict) and init_cfg.get('type') == 'Pretrained'
            and hasattr(model, 'backbone') and isinstance(init_cfg.get('checkpoint'), str)):
        path = _cached_checkpoint(init_cfg.checkpoint)
        if path is not None:
            state = _with_prefix(_checkpoint_state_dict(path), init_cfg.get('prefix'),
                                 init_cfg.checkpoint)
            _check_fits(state, model.backbone.state_dict(), 'model.backbone.init_cfg.checkpoint',
                        init_cfg.checkpoint, None)
    load_from = cfg.get('load_from')
    path = _cached_checkpoint(load_from) if load_from else None
    if path is not None:
        _check_fits(_checkpoint_state_dict(path), model.state_dict(), 'load_from', load_from,
                    'backbone.')


def _cached_checkpoint(checkpoint: str) -> str | None:
    """The local file a checkpoint name refers to, or None when it is not on this machine."""
    if osp.isfile(checkpoint):
        return checkpoint
    url = _checkpoint_url(checkpoint) if '://' in checkpoint else None
    if url is None:
        return None
    import torch.hub
    cached = osp.join(torch.hub.get_dir(), 'checkpoints', osp.basename(url))
    return cached if osp.isfile(cached) else None


def _checkpoint_state_dict(path: str) -> dict:
    """The tensors mmengine would load from ``path`` (its ``state_dict``, ``module.`` stripped)."""
    import torch

    from mmattn.engine.resume import verify_checkpoint
    checkpoint = verify_checkpoint(path, for_resume=False)
    state = checkpoint.get('state_dict', checkpoint) if isinstance(checkpoint, dict) else {}
    return {key[len('module.'):] if key.startswith('module.') else key: value
            for key, value in state.items() if isinstance(value, torch.Tensor)}


def _with_prefix(state: dict, prefix: str | None, checkpoint: str) -> dict:
    """The part of ``state`` under ``prefix``, renamed as mmengine's ``Pretrained`` init does."""
    if not prefix:
        return state
    prefix = prefix if prefix.endswith('.') else prefix + '.'
    kept = {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}
    if not kept:
        raise CheckpointMismatchError(
            f"model.backbone.init_cfg.prefix='{prefix}': no tensor of '{checkpoint}' starts with "
            f'it (its names start like {", ".join(sorted(state)[:_LISTED])}). Set the prefix '
            'those names share, or remove it for a checkpoint of the backbone alone.')
    return kept


def _check_fits(state: dict, target: dict, key: str, checkpoint: str,
                backbone_prefix: str | None) -> None:
    import logging
    import math

    from mmengine.logging import print_log

    def size(shape) -> int:
        return math.prod(shape)

    ours = {name: tuple(value.shape) for name, value in target.items()}
    theirs = {name: tuple(value.shape) for name, value in state.items()}
    common = ours.keys() & theirs.keys()
    mismatched = sorted(name for name in common if ours[name] != theirs[name])
    matched = common.difference(mismatched)
    missing = sorted(ours.keys() - theirs.keys())
    unexpected = sorted(theirs.keys() - ours.keys())
    filled = sum(size(ours[name]) for name in matched) / max(1, sum(map(size, ours.values())))
    unused = (sum(size(theirs[name]) for name in unexpected + mismatched)
              / max(1, sum(map(size, theirs.values()))))
    # Weights first in messages: 'conv1.weight (64, 3, 7, 7)' says more than a BN bias.
    fatal = sorted((name for name in mismatched
                    if backbone_prefix is None or name.startswith(backbone_prefix)),
                   key=lambda name: (not name.endswith('.weight'), name))
    what = 'the backbone' if backbone_prefix is None else 'the model'
    if not matched:
        reason = (f'no tensor name in common with {what} (checkpoint: '
                  f'{", ".join(sorted(theirs)[:_LISTED]) or "no tensors"}; {what}: '
                  f'{", ".join(sorted(ours)[:_LISTED])})')
    elif fatal:
        reason = 'backbone tensors of another shape: ' + ', '.join(
            f'{name} {theirs[name]} in the checkpoint, {ours[name]} in the model'
            for name in fatal[:_LISTED])
    elif filled < MIN_FILLED:
        reason = (f'it fills only {filled:.0%} of {what} (missing, e.g.: '
                  f'{", ".join(missing[:_LISTED])})')
    elif unused > MAX_UNUSED:
        reason = (f'{unused:.0%} of it has no place in {what} (e.g. '
                  f'{", ".join((unexpected + mismatched)[:_LISTED])})')
    else:
        parts = []
        if missing:
            parts.append(f'{len(missing)} tensors of {what} are not in the checkpoint and keep '
                         f'their init (e.g. {", ".join(missing[:_LISTED])})')
        if unexpected:
            parts.append(f'{len(unexpected)} checkpoint tensors are unused (e.g. '
                         f'{", ".join(unexpected[:_LISTED])})')
        if mismatched:
            parts.append(f'{len(mismatched)} tensors differ in shape and keep their init (e.g. '
                         f'{", ".join(mismatched[:_LISTED])})')
        if parts:
            print_log(f"{key}='{checkpoint}': " + '; '.join(parts) + '.', logger='current',
                      level=logging.WARNING)
        return
    raise CheckpointMismatchError(
        f"{key}='{checkpoint}' is a checkpoint of another architecture: {reason}. "
        + _architecture_fix(key, theirs, ours))


def _architecture_fix(key: str, theirs: dict, ours: dict) -> str:
    stripped = {name[len('backbone.'):] for name in theirs if name.startswith('backbone.')}
    if key == 'load_from':
        if {f'backbone.{name}' for name in theirs} & ours.keys():
            return ('It holds backbone weights only: load it with model.backbone.init_cfg='
                    "dict(type='Pretrained', checkpoint=...) instead of load_from.")
        return ('Use a checkpoint of this model (same backbone depth, width and plugins, trained '
                "with this config or its parent), load only a backbone with model.backbone."
                "init_cfg=dict(type='Pretrained', prefix='backbone.', checkpoint=...), or drop "
                'load_from.')
    if stripped & ours.keys():
        return ("Its keys start with 'backbone.' (a classifier or detector checkpoint): add "
                "prefix='backbone.' to model.backbone.init_cfg.")
    return ('Use weights of the same backbone (depth, base_channels, and for plugin blocks the '
            'same blocks at the same places), set model.backbone.depth / plugins to match the '
            'weights, or train from scratch with model.backbone.init_cfg=None.')
