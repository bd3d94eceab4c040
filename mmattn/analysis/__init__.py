"""Measuring models: parameters and FLOPs in the papers' convention."""
from .complexity import Complexity, backbone_complexity, model_complexity

__all__ = ['Complexity', 'backbone_complexity', 'model_complexity']
