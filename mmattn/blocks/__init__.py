"""Attention blocks, one mechanism per file, each registered in MMEngine's root MODELS."""
from .se import SqueezeExcitation
from .sge import SpatialGroupEnhance

__all__ = ['SpatialGroupEnhance', 'SqueezeExcitation']
