"""Convert the authors' COCO detector checkpoints (mmdetection 0.6, v1) for mmdet 3.x configs.

The SGE paper's detectors (implus/PytorchInsight ``detection/``) were saved by mmdetection 0.6.
:func:`convert_detector_checkpoint` turns such a file into a checkpoint that mmattn's config of
the same detector loads with ``strict=True`` (``tools/test.py CONFIG DST``):

1. The source is read with :func:`mmattn.checkpoint.load_checkpoint_file` (weights_only: a file
   carrying pickled code is refused before any of it runs); a ``module.`` prefix is dropped.
2. v1 -> v2 (``meta['mmdet_version']`` < 2, or top-level ``bbox_head.*`` keys in a two-stage
   model): mmdet's own ``tools/model_converters/upgrade_model_version.py`` (from mmdet's
   installed ``.mim``) runs its ``convert()`` on the dict in memory. Two things of that script
   are replaced for the call: ``parse_config``, which would *execute* the checkpoint's
   ``meta['config']`` text as Python, answers from the target config instead; and ``torch.load`` /
   ``torch.save`` hand the dicts over in memory. One of its results is corrected afterwards: it
   rotates the bias of every ``*_cls`` layer by one, also of sigmoid layers that have no
   background channel (v1's ``retina_cls`` and ``rpn_cls``: ``num_classes - 1`` outputs per
   anchor), whose weights it leaves unchanged; those biases are kept as they were. And its
   ``fc_reg`` truncation drops the background (first) class of the weight but the last class of
   the bias; the bias is cut like the weight.
3. Backbone keys take AttnResNet's names through the ``pytorchinsight`` rules of
   :data:`mmattn.checkpoint.SOURCE_FORMATS` (``layerN.i.sge.*``, ``se.fc.*``, ... are already
   the same names under ``backbone.``).
4. The config's model is built (backbone ``init_cfg=None``) and the result must load into it with
   ``strict=True``: missing, unexpected and mis-shaped keys are reported and nothing is written.
5. The file is written atomically (temporary name, then one rename); an existing DST is kept
   unless ``force``.
"""
from __future__ import annotations

import contextlib
import copy
import importlib.util
import io
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..version import __version__
from .convert import SOURCE_FORMATS, ConversionError, _place, _save_atomically, _unwrap
from .safe_load import load_checkpoint_file

Tensor = torch.Tensor

_CLS_BIAS = re.compile(r'(conv_cls|retina_cls|rpn_cls|fc_cls|fcos_cls|fovea_cls)\.bias$')


@dataclass
class DetectorConversion:
    """The converted state dict and what was done to get it.

    Attributes:
        state_dict (dict): Keys of the config's mmdet 3.x model.
        source_version (str | None): ``meta['mmdet_version']`` of the source, when it has one.
        upgraded (bool): Whether mmdet's v1 -> v2 upgrade ran.
        log (list[str]): What the upgrade script printed, and mmattn's own corrections.
        renamed (dict): Backbone source key -> AttnResNet key, for the keys whose name changed.
    """

    state_dict: dict[str, Tensor]
    source_version: str | None
    upgraded: bool
    log: list[str] = field(default_factory=list)
    renamed: dict[str, str] = field(default_factory=dict)


def mmdet_upgrade_module():
    """A fresh module object of mmdet's installed ``upgrade_model_version.py``."""
    import mmdet
    path = (Path(mmdet.__file__).parent / '.mim' / 'tools' / 'model_converters'
            / 'upgrade_model_version.py')
    if not path.is_file():
        raise ConversionError(f'{path} is missing: the v1 -> v2 upgrade needs mmdet\'s '
                              'tools (pip install mmdet==3.3.0 ships them under .mim/).')
    spec = importlib.util.spec_from_file_location('_mmdet_upgrade_model_version', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _InMemoryTorch:
    """torch, except that ``load`` returns a given object and ``save`` keeps what it is given."""

    def __init__(self, loaded):
        self.loaded, self.saved = loaded, None

    def __getattr__(self, name):
        return getattr(torch, name)

    def load(self, *args, **kwargs):
        return self.loaded

    def save(self, obj, *args, **kwargs):
        self.saved = obj


def _head_facts(model_cfg) -> tuple[tuple[bool, bool, bool, bool], int]:
    """``parse_config``'s answer (is_two_stage, is_ssd, is_retina, reg_cls_agnostic) and the v1
    ``num_classes`` (background included), read from the target (v2+ layout) model config."""
    if 'rpn_head' in model_cfg:
        bbox_head = model_cfg['roi_head']['bbox_head']
        agnostic = isinstance(bbox_head, list) or bool(bbox_head.get('reg_class_agnostic'))
        first = bbox_head[0] if isinstance(bbox_head, list) else bbox_head
        return (True, False, False, agnostic), first['num_classes'] + 1
    head = model_cfg['bbox_head']
    facts = (False, head['type'] == 'SSDHead', head['type'] == 'RetinaHead', False)
    return facts, head['num_classes'] + 1


def _major(version: str | None) -> int | None:
    found = re.match(r'\s*v?(\d+)', str(version)) if version is not None else None
    return int(found.group(1)) if found else None


def upgrade_v1_state_dict(state_dict: dict, meta: dict, model_cfg) -> tuple[dict, list[str]]:
    """Run mmdet's ``upgrade_model_version.convert`` on ``state_dict`` in memory (see step 2)."""
    module = mmdet_upgrade_module()
    facts, num_classes = _head_facts(model_cfg)
    fake_torch = _InMemoryTorch({'state_dict': dict(state_dict),
                                 'meta': {'config': '', **meta,
                                          'mmdet_version': str(meta.get('mmdet_version', '1.0'))}})
    module.torch = fake_torch
    module.parse_config = lambda config_text: facts  # never execute the checkpoint's config
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        module.convert('<in memory>', '<in memory>', num_classes)
    out = fake_torch.saved['state_dict']
    log = [f'mmdet upgrade_model_version: {line}' for line in printed.getvalue().splitlines()]
    # convert() emits one key per source key, in order: pair them to undo the bias rotation of
    # cls layers without a background channel (their weights it left as they were).
    if len(out) != len(state_dict):
        raise ConversionError(f'the v1 upgrade mapped {len(state_dict)} keys onto {len(out)}: two '
                              'source keys share a new name. Nothing was written.')
    pairs = dict(zip(out, state_dict, strict=True))
    for new_key in list(out):
        weight = out.get(new_key[:-len('bias')] + 'weight')
        if _CLS_BIAS.search(new_key) and weight is not None and \
                weight.shape[0] != num_classes and weight.shape[0] % num_classes:
            original = state_dict[pairs[new_key]]
            if not torch.equal(out[new_key], original):
                out[new_key] = original
                log.append(f'mmattn: kept {new_key} as it was: {weight.shape[0]} outputs, no '
                           'background channel (sigmoid), so there is nothing to reorder.')
        # its truncate_reg_channel drops the first class (background) of an fc_reg weight but the
        # last class of its bias: take the bias rows that match the weight's.
        source = state_dict[pairs[new_key]]
        if new_key.endswith('fc_reg.bias') and source.numel() % num_classes == 0 and \
                out[new_key].numel() != source.numel():
            out[new_key] = source.reshape(num_classes, -1)[1:].reshape(-1)
            log.append(f'mmattn: {new_key}: dropped the background (first) class, as for the '
                       'weight (the script drops the last class of the bias).')
    return out, log


def _rename_backbone(state_dict: dict) -> tuple[dict, dict]:
    rules = SOURCE_FORMATS['pytorchinsight'].rules
    out, renamed = {}, {}
    for key, value in state_dict.items():
        if key.startswith('backbone.'):
            placed = _place(key[len('backbone.'):], rules)
            if placed is not None:
                new_key, transform = placed
                value = transform(value) if transform else value
                if new_key != key:
                    renamed[key] = new_key
                key = new_key
        out[key] = value
    return out, renamed


def build_detector(model_cfg):
    """The config's mmdet model, with the backbone's pretrained init switched off."""
    import mmdet.models  # noqa: F401  (registers mmdet's modules)
    from mmdet.registry import MODELS

    import mmattn  # noqa: F401  (registers AttnResNet and the blocks)
    model_cfg = copy.deepcopy(model_cfg)
    model_cfg['backbone']['init_cfg'] = None
    return MODELS.build(model_cfg)


def verify_detector_state_dict(state_dict: dict, model) -> None:
    """Refuse unless ``state_dict`` loads into ``model`` with ``strict=True``."""
    expected = model.state_dict()
    missing = [key for key in expected if key not in state_dict]
    unexpected = [key for key in state_dict if key not in expected]
    shapes = [f'{key} {tuple(state_dict[key].shape)} (model: {tuple(value.shape)})'
              for key, value in expected.items()
              if key in state_dict and tuple(state_dict[key].shape) != tuple(value.shape)]
    problems = [f'{what} ({len(keys)}): {", ".join(keys[:8])}{", ..." if len(keys) > 8 else ""}'
                for what, keys in (('missing', missing), ('unexpected', unexpected),
                                   ('shape mismatch', shapes)) if keys]
    if problems:
        raise ConversionError('the converted weights do not fit the config\'s model: '
                              + '; '.join(problems) + '. Nothing was written.')
    model.load_state_dict(state_dict, strict=True)


def convert_detector_checkpoint(src: str | os.PathLike, dst: str | os.PathLike,
                                config: str | os.PathLike, *,
                                force: bool = False) -> DetectorConversion:
    """Convert the detector checkpoint ``src`` for ``config`` and write it to ``dst``.

    See the module docstring for the steps. Raises :class:`ConversionError` (or
    :class:`mmattn.checkpoint.CheckpointRefusedError` for pickled code) and writes nothing when
    any step fails.
    """
    from mmattn.apis.config import load_config
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise ConversionError(f'{src}: no such file.')
    if dst.exists() and not force:
        raise ConversionError(f'{dst} exists; pass --force to replace it.')
    model_cfg = load_config(str(config)).model
    checkpoint = load_checkpoint_file(str(src))
    if not isinstance(checkpoint, dict):
        raise ConversionError(f'{src}: holds a {type(checkpoint).__name__}, not a checkpoint.')
    meta = checkpoint.get('meta') if isinstance(checkpoint.get('meta'), dict) else {}
    state_dict = checkpoint.get('state_dict', checkpoint.get('model', checkpoint))
    if not isinstance(state_dict, dict) or not state_dict:
        raise ConversionError(f'{src}: no state dict found (keys: {list(checkpoint)[:5]}).')
    state_dict, _ = _unwrap(state_dict)
    version = meta.get('mmdet_version')
    major = _major(version)
    upgrade = major is not None and major < 2 or (
        major is None and 'rpn_head' in model_cfg
        and any(key.startswith('bbox_head.') for key in state_dict))
    log: list[str] = []
    if upgrade:
        state_dict, log = upgrade_v1_state_dict(state_dict, meta, model_cfg)
    state_dict, renamed = _rename_backbone(state_dict)
    verify_detector_state_dict(state_dict, build_detector(model_cfg))
    out_meta = {'mmattn_version': __version__, 'converted_from': str(src),
                'source_mmdet_version': str(version), 'config': str(config),
                'converter': 'mmattn.checkpoint.detector (mmdet upgrade_model_version)'}
    _save_atomically({'state_dict': state_dict, 'meta': out_meta}, dst, force)
    return DetectorConversion(state_dict, None if version is None else str(version), upgrade,
                              log, renamed)
