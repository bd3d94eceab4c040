"""The environment `make setup` builds is the pinned stack, with mmcv's compiled ops."""
import importlib.metadata as metadata

import pytest


@pytest.mark.parametrize('package, version', [
    ('torch', '2.13.0'), ('torchvision', '0.28.0'), ('mmengine', '0.10.7'), ('mmcv', '2.1.0'),
    ('mmdet', '3.3.0'), ('mmpretrain', '1.2.0'),
])
def test_pinned_versions(package, version):
    # Exact strings: a local build such as 2.13.0+cpu (which has no torchvision) must not slip in.
    assert metadata.version(package) == version


def test_one_torch_distribution():
    names = [dist.metadata['Name'].lower() for dist in metadata.distributions()]
    assert names.count('torch') == 1


def test_mmcv_has_its_compiled_ops():
    import torch
    from mmcv import _ext  # noqa: F401  (absent when mmcv was built without MMCV_WITH_OPS)
    from mmcv.ops import nms
    boxes = torch.tensor([[0., 0., 10., 10.], [1., 1., 10., 10.], [20., 20., 30., 30.]])
    _, keep = nms(boxes, torch.tensor([0.9, 0.8, 0.7]), iou_threshold=0.5)
    assert keep.tolist() == [0, 2]


def test_mmpretrain_models_import():
    import mmpretrain.models  # noqa: F401  (reaches torchvision.ops at import)
