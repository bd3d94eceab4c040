"""Attention blocks, one mechanism per file, each registered in MMEngine's root MODELS.

GC (GCNet) is mmcv's ``ContextBlock``, already registered by mmcv; mmattn does not duplicate it.
"""
from .bam import BottleneckAttention
from .cbam import ConvolutionalBlockAttention
from .cgd import CompactGlobalDescriptor
from .eca import EfficientChannelAttention
from .gsop import GlobalSecondOrderPooling
from .se import SqueezeExcitation
from .sge import SpatialGroupEnhance

__all__ = [
    'BottleneckAttention', 'CompactGlobalDescriptor', 'ConvolutionalBlockAttention',
    'EfficientChannelAttention', 'GlobalSecondOrderPooling', 'SpatialGroupEnhance',
    'SqueezeExcitation'
]
