"""The authors' ImageNet checkpoints convert to AttnResNet classifiers that compute the same thing.

Each case builds an independent reference network under the authors' module names
(reference_nets.py, or MMPretrain's own SEResNet), saves it as the authors' training scripts do,
converts it, and checks the converted classifier's logits against the reference's.
"""
from __future__ import annotations

import importlib.util
import os
import pathlib
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn as nn
from mmdet.registry import MODELS as DET_MODELS
from mmengine.runner import load_checkpoint
from mmengine.runner.checkpoint import _load_checkpoint_with_prefix, load_state_dict
from mmpretrain.registry import MODELS as CLS_MODELS
from reference_nets import ReferenceResNet, randomise

from mmattn.checkpoint import (
    ConversionError,
    convert_checkpoint,
    convert_state_dict,
    detect_format,
    load_source,
)
from mmattn.checkpoint import convert as convert_module

ROOT = pathlib.Path(__file__).resolve().parents[2]
WIDTH = 16
INPUT_SHAPE = (2, 3, 64, 64)


@pytest.fixture(autouse=True)
def _small_network_settings():
    # oneDNN compiles a kernel per new convolution shape, and on a busy machine the intra-op
    # threads mostly wait for each other: at these widths one thread of torch's native kernels
    # is many times faster. Neither changes the results compared here.
    enabled, threads = torch.backends.mkldnn.enabled, torch.get_num_threads()
    torch.backends.mkldnn.enabled = False
    torch.set_num_threads(1)
    yield
    torch.backends.mkldnn.enabled = enabled
    torch.set_num_threads(threads)


def save_like_imagenet_scripts(model: nn.Module, path: pathlib.Path) -> None:
    """What PytorchInsight, CGD, GSoP and ECANet's training scripts save: DataParallel keys."""
    # An SGD state dict's shape (building a real optimizer would import torch._dynamo: 2 s).
    optimizer = {'state': {}, 'param_groups': [
        {'lr': 0.1, 'momentum': 0.9, 'params': list(range(len(list(model.parameters()))))}]}
    torch.save({'epoch': 100, 'arch': 'resnet50', 'state_dict': nn.DataParallel(model).state_dict(),
                'best_acc': torch.tensor(77.5), 'optimizer': optimizer}, path)


def save_raw(model: nn.Module, path: pathlib.Path) -> None:
    torch.save(model.state_dict(), path)


def save_mmpretrain(model: nn.Module, path: pathlib.Path) -> None:
    torch.save({'meta': {'epoch': 100, 'mmpretrain_version': '1.2.0'},
                'state_dict': model.state_dict()}, path)


def mmpretrain_se_resnet() -> nn.Module:
    return CLS_MODELS.build(dict(
        type='ImageClassifier',
        backbone=dict(type='SEResNet', depth=50, stem_channels=WIDTH, base_channels=WIDTH),
        neck=dict(type='GlobalAveragePooling'),
        head=dict(type='LinearClsHead', num_classes=1000, in_channels=WIDTH * 32)))


@dataclass(frozen=True)
class Case:
    source_format: str
    build: Callable[[], nn.Module]
    save: Callable[[nn.Module, pathlib.Path], None]
    plugins: list = field(default_factory=list)  # what the conversion must infer
    imagenet_backbone: dict = field(default_factory=dict)


def after_conv3(block_type: str, **args) -> dict:
    return dict(cfg=dict(type=block_type, **args), position='after_conv3')


CASES = {
    'pytorchinsight-se': Case(
        'pytorchinsight', lambda: ReferenceResNet('se'), save_like_imagenet_scripts,
        [after_conv3('SqueezeExcitation', rd_ratio=1 / 16)]),
    'pytorchinsight-sge': Case(
        'pytorchinsight', lambda: ReferenceResNet('sge', groups=16), save_like_imagenet_scripts,
        [after_conv3('SpatialGroupEnhance', groups=16)]),
    'pytorchinsight-cbam': Case(
        'pytorchinsight', lambda: ReferenceResNet('cbam'), save_like_imagenet_scripts,
        [after_conv3('ConvolutionalBlockAttention', rd_ratio=1 / 16)]),
    'pytorchinsight-bam': Case(
        'pytorchinsight', lambda: ReferenceResNet('bam'), save_like_imagenet_scripts,
        [dict(cfg=dict(type='BottleneckAttention', rd_ratio=1 / 16), position='after_stage',
              stages=(True, True, True, False))]),
    'cgd': Case(
        'cgd', lambda: ReferenceResNet('cgd'), save_like_imagenet_scripts,
        [dict(cfg=dict(type='CompactGlobalDescriptor', mode='cascade'),
              position='after_conv1_pre_norm')]),
    'gsop': Case(
        'gsop', lambda: ReferenceResNet('gsop', att_dim=32, last_stride=1),
        save_like_imagenet_scripts,
        [dict(after_conv3('GlobalSecondOrderPooling', mode='channel', att_dim=32),
              blocks='last')],
        imagenet_backbone=dict(strides=(1, 2, 2, 1))),
    # ECANet's released ResNet-50 uses k = 3, 5, 5, 7 per stage (eca_resnet50_k3557).
    'eca': Case(
        'eca', lambda: ReferenceResNet('eca', kernel_sizes=(3, 5, 5, 7)),
        save_like_imagenet_scripts,
        [dict(after_conv3('EfficientChannelAttention', kernel_size=3),
              stages=(True, False, False, False)),
         dict(after_conv3('EfficientChannelAttention', kernel_size=5),
              stages=(False, True, True, False)),
         dict(after_conv3('EfficientChannelAttention', kernel_size=7),
              stages=(False, False, False, True))]),
    'torchvision': Case('torchvision', lambda: ReferenceResNet(None), save_raw),
    # MMPretrain's SE width is make_divisible(C // 16, 8): 8 of 64 channels in stage 1.
    'mmpretrain-seresnet': Case(
        'mmpretrain', mmpretrain_se_resnet, save_mmpretrain,
        [dict(after_conv3('SqueezeExcitation', rd_ratio=1 / 8),
              stages=(True, False, False, False)),
         dict(after_conv3('SqueezeExcitation', rd_ratio=1 / 16),
              stages=(False, True, True, True))]),
}


@dataclass
class Converted:
    reference: nn.Module
    src: pathlib.Path
    dst: pathlib.Path
    conversion: convert_module.Conversion


@pytest.fixture(scope='module')
def converted(tmp_path_factory) -> Callable[[str], Converted]:
    """Each case's reference network, its saved file and its conversion, made once."""
    cache: dict[str, Converted] = {}

    def get(name: str) -> Converted:
        if name not in cache:
            case = CASES[name]
            folder = tmp_path_factory.mktemp(name)
            torch.manual_seed(0)
            reference = randomise(case.build())
            src, dst = folder / 'authors.pth.tar', folder / 'converted.pth'
            case.save(reference, src)
            cache[name] = Converted(reference, src, dst, convert_checkpoint(src, dst))
        return cache[name]

    return get


def build_classifier(conversion: convert_module.Conversion) -> nn.Module:
    return CLS_MODELS.build(conversion.classifier)


def reference_file(tmp_path: pathlib.Path, kind: str = 'sge', **options) -> pathlib.Path:
    src = tmp_path / f'{kind}.pth.tar'
    save_like_imagenet_scripts(ReferenceResNet(kind, **options), src)
    return src


@pytest.mark.parametrize('name', CASES)
def test_format_is_detected_from_the_keys(name, converted):
    item = converted(name)
    assert detect_format(load_source(item.src)).name == CASES[name].source_format
    assert item.conversion.source_format == CASES[name].source_format


@pytest.mark.parametrize('name', CASES)
def test_backbone_config_is_read_from_the_weights(name, converted):
    case, conversion = CASES[name], converted(name).conversion
    expected = dict(type='AttnResNet', depth=50, base_channels=WIDTH)
    if case.plugins:
        expected['plugins'] = case.plugins
    assert conversion.backbone == expected
    assert conversion.classifier['backbone'] == dict(expected, out_indices=(3, ),
                                                     **case.imagenet_backbone)
    assert conversion.classifier['head'] == dict(type='LinearClsHead', num_classes=1000,
                                                 in_channels=WIDTH * 32)


@pytest.mark.parametrize('name', CASES)
def test_converted_classifier_computes_the_authors_network(name, converted):
    item = converted(name)
    classifier = build_classifier(item.conversion)
    load_checkpoint(classifier, str(item.dst), strict=True)  # raises on missing/unexpected keys
    classifier.eval()
    x = torch.randn(INPUT_SHAPE)
    with torch.no_grad():
        expected, logits = item.reference(x), classifier(x)
    assert expected.abs().max() > 1e-2  # the comparison is not between two near-zero outputs
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4 * expected.abs().max())


@pytest.mark.parametrize('name', CASES)
def test_detector_backbone_loads_every_key(name, converted):
    item = converted(name)
    backbone = DET_MODELS.build(dict(item.conversion.backbone, out_indices=(0, 1, 2, 3)))
    # What init_cfg=dict(type='Pretrained', prefix='backbone.') hands to load_state_dict.
    loaded = _load_checkpoint_with_prefix('backbone.', str(item.dst), map_location='cpu')
    assert sorted(loaded) == sorted(backbone.state_dict())
    load_state_dict(backbone, loaded, strict=True)  # raises on a missing key or a wrong shape


def test_init_cfg_pretrained_loads_the_backbone(converted):
    item = converted('pytorchinsight-sge')
    init_cfg = dict(type='Pretrained', prefix='backbone.', checkpoint=str(item.dst))
    backbone = DET_MODELS.build(dict(item.conversion.backbone, out_indices=(0, 1, 2, 3),
                                     init_cfg=init_cfg))
    backbone.init_weights()
    for key, value in backbone.state_dict().items():
        expected = item.conversion.state_dict['backbone.' + key]
        torch.testing.assert_close(value, expected.to(value.dtype), rtol=0, atol=0, msg=key)


@pytest.mark.parametrize('wrap', [
    lambda state: state,
    lambda state: {'state_dict': state, 'epoch': 3},
    lambda state: {'model': state, 'args': {'lr': 0.1}},
], ids=['raw', 'state_dict', 'model'])
@pytest.mark.parametrize('zipfile', [True, False], ids=['zip', 'legacy'])
def test_state_dict_is_found_in_every_container(tmp_path, wrap, zipfile):
    state = ReferenceResNet(None).state_dict()
    path = tmp_path / 'resnet.pth'
    # legacy: the pre-1.6 format, as the authors' PyTorch 0.4 / 1.0 wrote it
    torch.save(wrap(state), path, _use_new_zipfile_serialization=zipfile)
    loaded = load_source(path)
    assert list(loaded) == list(state)
    assert all(torch.equal(loaded[key], value) for key, value in state.items())


def test_bn_without_num_batches_tracked_gets_a_counter(tmp_path):
    model = ReferenceResNet('se')
    state = {k: v for k, v in model.state_dict().items() if 'num_batches_tracked' not in k}
    conversion = convert_state_dict(state)
    assert not conversion.unplaced
    counters = [k for k in conversion.state_dict if k.endswith('num_batches_tracked')]
    assert len(counters) == sum(k.endswith('running_mean') for k in state)
    assert any('num_batches_tracked' in note for note in conversion.notes)
    convert_module.verify_conversion(conversion)


def test_unplaced_keys_are_reported_and_nothing_is_written(tmp_path):
    src, dst = tmp_path / 'sk.pth.tar', tmp_path / 'out.pth'
    state = nn.DataParallel(ReferenceResNet('sge', groups=16)).state_dict()
    state['module.layer2.1.sk.convs.0.weight'] = torch.zeros(3)
    state['module.layer_reduce.weight'] = torch.zeros(3)
    torch.save({'state_dict': state}, src)
    with pytest.raises(ConversionError) as error:
        convert_checkpoint(src, dst)
    message = str(error.value)
    assert 'module.layer2.1.sk.convs.0.weight' in message
    assert 'module.layer_reduce.weight' in message and '--allow-unplaced' in message
    assert not dst.exists()


def test_allow_unplaced_drops_them_and_records_them(tmp_path):
    src, dst = tmp_path / 'sk.pth.tar', tmp_path / 'out.pth'
    state = ReferenceResNet('eca', kernel_sizes=(3, 3, 3, 3)).state_dict()
    state['layer2.1.sk.convs.0.weight'] = torch.zeros(3)
    torch.save(state, src)
    conversion = convert_checkpoint(src, dst, allow_unplaced=True)
    assert list(conversion.unplaced) == ['layer2.1.sk.convs.0.weight']
    meta = torch.load(dst, weights_only=True)['meta']
    assert meta['unplaced'] == ['layer2.1.sk.convs.0.weight']
    assert meta['source_format'] == 'eca' and meta['backbone'] == conversion.backbone


def test_head_that_is_no_linear_on_pooled_features_is_unplaced():
    state = ReferenceResNet('se').state_dict()
    state['fc.weight'] = torch.zeros(1000, 7)  # GSoP-Net2's covariance head has such a shape
    conversion = convert_state_dict(state)
    assert set(conversion.unplaced) == {'fc.weight', 'fc.bias'}
    assert conversion.classifier is None
    assert not any(key.startswith('head.') for key in conversion.state_dict)
    convert_module.verify_conversion(conversion)  # the backbone alone still fits


@pytest.mark.parametrize('state', [
    {'encoder.layers.0.weight': torch.zeros(2), 'decoder.weight': torch.zeros(2)},
    {'module.features.0.weight': torch.zeros(2)},
], ids=['transformer', 'vgg'])
def test_unknown_format_is_refused(tmp_path, state):
    src, dst = tmp_path / 'other.pth', tmp_path / 'out.pth'
    torch.save(state, src)
    with pytest.raises(ConversionError, match=r'does not look like a .* checkpoint: first keys '
                                              r'.*; pass --format if you know it'):
        convert_checkpoint(src, dst)
    assert not dst.exists()


def test_explicit_format_is_checked():
    with pytest.raises(ConversionError, match='does not look like a mmpretrain checkpoint'):
        convert_state_dict(ReferenceResNet('cgd').state_dict(), 'mmpretrain')


def test_existing_destination_is_kept_without_force(tmp_path):
    src, dst = reference_file(tmp_path, groups=16), tmp_path / 'out.pth'
    dst.write_bytes(b'keep me')
    with pytest.raises(ConversionError, match='exists; pass --force'):
        convert_checkpoint(src, dst)
    assert dst.read_bytes() == b'keep me'
    convert_checkpoint(src, dst, force=True)
    assert 'state_dict' in torch.load(dst, weights_only=True)


def test_source_is_never_the_destination(tmp_path):
    src = reference_file(tmp_path, groups=16)
    with pytest.raises(ConversionError, match='is the source itself'):
        convert_checkpoint(src, src, force=True)


class Payload:
    """Unpickling this would create the marker file: the proof that pickled code ran."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), 'w')


def test_pickled_code_is_refused_and_never_runs(tmp_path, monkeypatch):
    marker, src, dst = tmp_path / 'payload-ran', tmp_path / 'evil.pth', tmp_path / 'out.pth'
    # weights_only=True is passed explicitly, so this variable cannot switch the check off.
    monkeypatch.setenv('TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD', '1')
    state = ReferenceResNet('sge', groups=16).state_dict()
    torch.save({'state_dict': state, 'extra': Payload(marker)}, src)
    with pytest.raises(ConversionError, match='refused: the file asks to run pickled code'):
        convert_checkpoint(src, dst)
    assert not marker.exists()
    assert not dst.exists()


def test_depth_other_than_the_keys_is_refused(tmp_path):
    src = reference_file(tmp_path, groups=16)
    with pytest.raises(ConversionError, match=r'--depth 101 was given, but the keys hold a '
                                              r'ResNet-50'):
        convert_checkpoint(src, tmp_path / 'out.pth', depth=101)


def test_weights_that_do_not_fit_are_refused_before_writing(tmp_path):
    src, dst = tmp_path / 'flat.pth', tmp_path / 'out.pth'
    state = ReferenceResNet('sge', groups=16).state_dict()
    state['layer3.2.sge.weight'] = state['layer3.2.sge.weight'].flatten(1)  # (1, G): no fit
    torch.save(state, src)
    with pytest.raises(ConversionError, match=r'do not fit .*shape \(1\): '
                                              r'backbone.layer3.2.sge.weight'):
        convert_checkpoint(src, dst)
    assert not dst.exists()


def test_a_crash_while_writing_leaves_no_file(tmp_path, monkeypatch):
    src, dst = reference_file(tmp_path, groups=16), tmp_path / 'out' / 'converted.pth'

    def crash(obj, file):
        file.write(b'half a checkpoint')
        raise KeyboardInterrupt

    monkeypatch.setattr(convert_module.torch, 'save', crash)
    with pytest.raises(KeyboardInterrupt):
        convert_checkpoint(src, dst)
    assert list(dst.parent.iterdir()) == []


def load_tool():
    spec = importlib.util.spec_from_file_location('convert_tool',
                                                  ROOT / 'tools' / 'convert_checkpoint.py')
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


def test_cli_refusal_exits_non_zero(tmp_path, capsys):
    src, dst = reference_file(tmp_path, groups=16), tmp_path / 'out.pth'
    dst.write_bytes(b'keep me')
    assert load_tool().main([str(src), str(dst)]) == 1
    assert 'exists; pass --force' in capsys.readouterr().err
    assert dst.read_bytes() == b'keep me'


def test_cli_end_to_end(tmp_path):
    src, dst = reference_file(tmp_path, 'eca', kernel_sizes=(3, 5, 5, 7)), tmp_path / 'out.pth'
    result = subprocess.run(
        [sys.executable, 'tools/convert_checkpoint.py', str(src), str(dst), '--format', 'eca',
         '--depth', '50'], cwd=ROOT, capture_output=True, text=True, timeout=120,
        env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert result.returncode == 0, result.stderr
    assert "type='AttnResNet'" in result.stdout
    assert "dict(type='EfficientChannelAttention', kernel_size=7)" in result.stdout
    assert (f"init_cfg=dict(type='Pretrained', prefix='backbone.', checkpoint='{dst}')"
            in result.stdout)
    assert set(torch.load(dst, weights_only=True)) == {'state_dict', 'meta'}
