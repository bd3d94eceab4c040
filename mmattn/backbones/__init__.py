"""The ResNet variant that offers the plugin placements mmdet's ResNet lacks.

Importing it registers ``AttnResNet`` in MMEngine's root MODELS registry.
"""
from .attn_resnet import AttnResNet
from .res_blocks import AttnBasicBlock, AttnBottleneck

__all__ = ['AttnBasicBlock', 'AttnBottleneck', 'AttnResNet']
