"""The benchmark's reference blocks compute the papers' math: the same outputs as mmattn's."""
import pytest
import torch
import torch.nn as nn

from mmattn.benchmark import references
from mmattn.blocks import (
    BottleneckAttention,
    CompactGlobalDescriptor,
    ConvolutionalBlockAttention,
    EfficientChannelAttention,
    GlobalSecondOrderPooling,
    SpatialGroupEnhance,
    SqueezeExcitation,
)


def copy_by_order(source: nn.Module, target: nn.Module) -> None:
    """Load source's state into target, matching tensors by order (names differ)."""
    values = list(source.state_dict().values())
    keys = list(target.state_dict())
    assert len(values) == len(keys)
    target.load_state_dict(dict(zip(keys, values, strict=True)))


def randomised(block: nn.Module) -> nn.Module:
    with torch.no_grad():
        for name, tensor in block.state_dict().items():
            if name.endswith('running_var'):
                tensor.uniform_(0.5, 2)
            elif tensor.is_floating_point():
                tensor.normal_(0, 0.3)
    return block


PAIRS = {
    'se': (lambda: SqueezeExcitation(64), lambda: references.ReferenceSE(64)),
    'eca': (lambda: EfficientChannelAttention(64), lambda: references.ReferenceECA(64)),
    'sge': (lambda: SpatialGroupEnhance(64, groups=8),
            lambda: references.ReferenceSGE(64, groups=8)),
    'cgd': (lambda: CompactGlobalDescriptor(64), lambda: references.ReferenceCGD(64)),
    'cbam': (lambda: ConvolutionalBlockAttention(64), lambda: references.ReferenceCBAM(64)),
    'gsop': (lambda: GlobalSecondOrderPooling(64, att_dim=16),
             lambda: references.ReferenceGSoP(64, att_dim=16)),
    'bam': (lambda: BottleneckAttention(64), lambda: references.ReferenceBAM(64)),
}


@pytest.mark.parametrize('training', [True, False], ids=['train', 'eval'])
@pytest.mark.parametrize('name', PAIRS)
def test_reference_matches_mmattn(name, training):
    ours, theirs = (make() for make in PAIRS[name])
    randomised(ours)
    copy_by_order(ours, theirs)
    ours.train(training)
    theirs.train(training)
    x = torch.randn(2, 64, 9, 11)
    torch.testing.assert_close(theirs(x), ours(x), rtol=1e-4, atol=1e-5)


def test_references_import_nothing_from_mmattn():
    with open(references.__file__) as f:
        imports = [line for line in f if line.startswith(('import ', 'from '))]
    assert imports and all(line.split()[1].split('.')[0] == 'torch' for line in imports)
