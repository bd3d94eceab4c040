"""The papers' published model sizes, as data (from /work/shared/reference/papers.md).

Keyed by ``(block, depth)``: ``block`` is the short name of the attention block (``'SE'``,
``'SGE'``, ...; see :data:`BLOCK_NAMES`), ``None`` for the plain ResNet.

- :data:`DETECTION_BACKBONES`: the SGE paper's detection tables (papers.md 1.1 and 1.2): the
  backbone alone, fc removed, at 1333 x 800.
- :data:`IMAGENET_CLASSIFIERS`: the ImageNet table (papers.md 2): the whole classifier at
  224 x 224, with top-1 / top-5 accuracy.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

BLOCK_NAMES = {
    'SqueezeExcitation': 'SE',
    'SpatialGroupEnhance': 'SGE',
    'CompactGlobalDescriptor': 'CGD',
    'GlobalSecondOrderPooling': 'GSoP',
    'ConvolutionalBlockAttention': 'CBAM',
    'BottleneckAttention': 'BAM',
    'EfficientChannelAttention': 'ECA',
    'ContextBlock': 'GC',
}
"""Registry type -> the short name the papers print."""


@dataclass(frozen=True)
class PaperFigure:
    """One published row.

    Attributes:
        model (str): The name the paper prints.
        params_m (float, optional): Parameters in millions.
        gflops (float, optional): GFLOPs at the table's input size.
        source (str): Where the figure was published.
        top1 (float, optional): ImageNet top-1 accuracy (classifiers only).
        top5 (float, optional): ImageNet top-5 accuracy (classifiers only).
        note (str): What to know before comparing.
    """

    model: str
    params_m: float | None
    gflops: float | None
    source: str
    top1: float | None = None
    top5: float | None = None
    note: str = ''


_SGE = 'SGE paper (arXiv 1905.09646), detection tables'
_BAM_NOTE = ("PytorchInsight's BAM pools with F.avg_pool2d, which the authors' counter did not "
             'see; mmattn counts that pooling (1 per input element of bam1..bam3: 0.03 GFLOPs '
             'at 1333x800, 0.0014 at 224x224)')

DETECTION_BACKBONES: Mapping[tuple[str | None, int], PaperFigure] = {
    (None, 50): PaperFigure('ResNet50', 23.51, 88.032, _SGE),
    ('SE', 50): PaperFigure('SE-ResNet50', 26.04, 88.152, _SGE),
    ('SK', 50): PaperFigure('SK-ResNet50', 24.11, 89.414, _SGE),
    ('BAM', 50): PaperFigure('BAM-ResNet50', 23.87, 89.804, _SGE, note=_BAM_NOTE),
    ('CBAM', 50): PaperFigure('CBAM-ResNet50', 26.04, 88.302, _SGE),
    ('SGE', 50): PaperFigure('SGE-ResNet50', 23.51, 88.149, _SGE),
    (None, 101): PaperFigure('ResNet101', 42.50, 167.908, _SGE),
    ('SE', 101): PaperFigure(
        'SE-ResNet101', 47.28, 168.3, _SGE,
        note="published with one decimal; the papers' convention gives 168.10 and 168.3 is "
             "what also counting SE's gating arithmetic gives (168.29), unlike the SE-ResNet50 "
             'row (88.152, without it)'),
    ('SGE', 101): PaperFigure('SGE-ResNet101', 42.50, 168.099, _SGE),
}
"""Backbone #P and GFLOPs at 1333 x 800, fc removed (papers.md 1.1, 1.2)."""

_PI = 'PytorchInsight (SGE paper, ImageNet table)'

IMAGENET_CLASSIFIERS: Mapping[tuple[str | None, int], PaperFigure] = {
    (None, 50): PaperFigure('ResNet50', 25.56, 4.122, _PI, 76.384, 92.908),
    ('SE', 50): PaperFigure('SE-ResNet50', 28.09, 4.130, _PI, 77.184, 93.672),
    ('SK', 50): PaperFigure('SK-ResNet50*', 26.15, 4.185, _PI, 77.538, 93.700),
    ('BAM', 50): PaperFigure('BAM-ResNet50', 25.92, 4.205, _PI, 76.898, 93.402, _BAM_NOTE),
    ('CBAM', 50): PaperFigure('CBAM-ResNet50', 28.09, 4.139, _PI, 77.626, 93.660),
    ('SGE', 50): PaperFigure('SGE-ResNet50', 25.56, 4.127, _PI, 77.584, 93.664),
    (None, 101): PaperFigure('ResNet101', 44.55, 7.849, _PI, 78.200, 93.906),
    ('SE', 101): PaperFigure('SE-ResNet101', 49.33, 7.863, _PI, 78.468, 94.102),
    ('CBAM', 101): PaperFigure('CBAM-ResNet101', 49.33, 7.879, _PI, 78.354, 94.064),
    ('SGE', 101): PaperFigure('SGE-ResNet101', 44.55, 7.858, _PI, 78.798, 94.368),
    ('CGD', 50): PaperFigure(
        'ResNet50 + CGD', 25.58, None, 'CGD paper (arXiv 1907.09665)', 76.90, 93.51,
        'published as +0.02M params and +0.023M MACs over ResNet50 (25.58M derived); '
        'accuracy derived from errors 23.10 / 6.49'),
    ('GSoP', 50): PaperFigure(
        'GSoP-Net1 ResNet50', 28.05, 6.18, 'GSoP README; #P and GFLOPs cited by ECA',
        77.98, 94.12,
        "ECA's citation; a faithful build of the authors' four GSoP blocks counts 28.29M; "
        'stage 4 at stride 1 (14x14)'),
}
"""Whole-classifier #P, GFLOPs at 224 x 224, top-1 / top-5 (papers.md 2)."""


def block_name(plugin_types: set[str] | frozenset[str]) -> str | None:
    """The short name of a backbone's attention block from its plugins' registry types.

    ``None`` for no plugin; several kinds are joined with '+' (no paper has such a row).
    """
    names = sorted(BLOCK_NAMES.get(kind, kind) for kind in plugin_types)
    return '+'.join(names) if names else None


def paper_figure(block: str | None, depth: int | None,
                 task: str = 'detection') -> PaperFigure | None:
    """The published row for ``(block, depth)``: ``task`` is 'detection' or 'classification'."""
    table = DETECTION_BACKBONES if task == 'detection' else IMAGENET_CLASSIFIERS
    return table.get((block, depth))
